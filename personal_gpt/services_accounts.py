"""The accounts part of the services facade: people who sign in with OpenID
Connect, their sessions (stored hashed, with a maximum age) and single-use login
states. Mixed into ``Services``; the OIDC protocol itself lives in ``web/oidc.py``.
"""

from __future__ import annotations


class AccountMethods:
    pass
