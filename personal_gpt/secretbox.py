"""Encrypts secrets (provider API keys) before they reach the database.

The key comes from ``PERSONAL_GPT_SECRET_KEY`` or a file ``secret.key`` under
PERSONAL_GPT_HOME, created once with mode 0600. The database never holds a
secret in clear text; losing the key means re-entering the secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from personal_gpt.errors import InvalidInput


def _load_key(path: Path) -> bytes:
    env = os.environ.get("PERSONAL_GPT_SECRET_KEY", "").strip()
    if env:
        return env.encode()
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    try:
        os.link(tmp, path)  # never overwrite a key another process just made
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


class SecretBox:
    def __init__(self, key_file: Path):
        self._key_file = key_file
        self._fernet: Fernet | None = None

    def _f(self) -> Fernet:
        if self._fernet is None:
            try:
                self._fernet = Fernet(_load_key(self._key_file))
            except ValueError:
                raise InvalidInput("PERSONAL_GPT_SECRET_KEY is not a valid key (expected 32 url-safe base64 bytes).") from None
        return self._fernet

    def seal(self, secret: str) -> str:
        return self._f().encrypt(secret.encode()).decode() if secret else ""

    def open(self, sealed: str) -> str:
        if not sealed:
            return ""
        try:
            return self._f().decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise InvalidInput("A saved API key can no longer be read (the secret key changed); enter it again.") from None
