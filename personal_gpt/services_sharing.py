"""The sharing part of the services facade: share links (create, list, revoke,
rotate) for creators, and the client's side of a link (open, decide, chat).
Mixed into ``Services``; the access decision itself lives in ``sharing.py``.
"""

from __future__ import annotations


class SharingMethods:
    pass
