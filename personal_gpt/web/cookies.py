"""Signed cookie values: one server secret (env ``PERSONAL_GPT_COOKIE_SECRET``, or
generated once into ``<home>/cookie_secret``, mode 0600) and itsdangerous
timed signatures, separated by purpose so a value signed for one cookie is
never accepted for another. It signs and checks strings; it sets no cookies.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from itsdangerous import BadData, URLSafeTimedSerializer

from personal_gpt.config import Settings
from personal_gpt.errors import InvalidInput

SECRET_ENV = "PERSONAL_GPT_COOKIE_SECRET"
SECRET_FILE = "cookie_secret"
MIN_SECRET_CHARS = 32

_lock = threading.Lock()
_cache: dict[Path, str] = {}


def _secret_file() -> Path:
    return Settings.from_env().home / SECRET_FILE


def _read_or_create(path: Path) -> str:
    """The secret in ``path``, created (0600, exclusively: two processes agree) if absent."""
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    return value


def cookie_secret() -> str:
    """The key for signed cookies: the env var when set, else the home's secret file."""
    value = os.environ.get(SECRET_ENV, "").strip()
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise InvalidInput(f"{SECRET_ENV} is too short: use at least {MIN_SECRET_CHARS} random characters.")
        return value
    path = _secret_file()
    with _lock:
        if path not in _cache:
            secret = _read_or_create(path)
            if len(secret) < MIN_SECRET_CHARS:
                raise InvalidInput(f"{path} does not hold a usable secret: delete it and start again.")
            _cache[path] = secret
        return _cache[path]


def _serializer(purpose: str) -> URLSafeTimedSerializer:
    if not purpose:
        raise ValueError("a signed value needs a purpose")
    return URLSafeTimedSerializer(cookie_secret(), salt=f"personal-gpt:{purpose}")


def sign(value: str, purpose: str) -> str:
    """``value`` signed and time-stamped for ``purpose`` (URL- and cookie-safe)."""
    return _serializer(purpose).dumps(value)


def unsign(signed: str | None, purpose: str, max_age: int | float) -> str | None:
    """The original string if ``signed`` was made by ``sign`` for this ``purpose`` at
    most ``max_age`` seconds ago; None for anything else (tampered, expired, other
    purpose, other secret, not a string)."""
    if not isinstance(signed, str) or not signed or len(signed) > 4096:
        return None
    try:
        value = _serializer(purpose).loads(signed, max_age=max_age)
    except BadData:
        return None
    return value if isinstance(value, str) else None
