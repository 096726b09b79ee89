"""Original knowledge files on disk, content-addressed under their GPT's folder.

``<home>/gpts/<gpt_id>/blobs/<sha256>``: names are generated (never taken from
the upload), writes go to a temp file and are published with ``os.replace``,
so a crash leaves either the whole file or a temp file that ``sweep`` removes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_GPT_ID = re.compile(r"^gpt_[0-9a-f]{8,32}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, home: Path):
        self.root = Path(home) / "gpts"

    def _dir(self, gpt_id: str) -> Path:
        if not _GPT_ID.match(gpt_id):  # ids are ours, but never let one build a path elsewhere
            raise ValueError("bad GPT id")
        return self.root / gpt_id / "blobs"

    def path(self, gpt_id: str, content_hash: str) -> Path:
        if not _HASH.match(content_hash):
            raise ValueError("bad content hash")
        return self._dir(gpt_id) / content_hash

    def put(self, gpt_id: str, data: bytes) -> str:
        """Store ``data``; returns its SHA-256. Storing the same bytes twice is a no-op."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(gpt_id, digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def delete(self, gpt_id: str, content_hash: str) -> None:
        self.path(gpt_id, content_hash).unlink(missing_ok=True)

    def delete_gpt(self, gpt_id: str) -> None:
        shutil.rmtree(self.root / gpt_id, ignore_errors=True) if _GPT_ID.match(gpt_id) else None

    def sweep(self) -> int:
        """Remove temp files left by a crash mid-upload; returns how many."""
        n = 0
        if self.root.exists():
            for tmp in self.root.glob("*/blobs/.upload-*.tmp"):
                tmp.unlink(missing_ok=True)
                n += 1
        return n
