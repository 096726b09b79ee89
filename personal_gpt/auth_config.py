"""Sign-in settings: the ``[auth]`` and ``[personal_gpt]`` sections of a secrets TOML
file in Streamlit's own format, read into plain, validated data (``AuthConfig``).

It owns finding, parsing and checking that file; it makes no network call and never
imports Streamlit. A misconfigured file is an ``InvalidInput`` with one sentence.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from personal_gpt.errors import InvalidInput

SECRETS_ENV = "PERSONAL_GPT_SECRETS"
CALLBACK_PATH = "/auth/callback"
DEFAULT_SCOPE = "openid email profile"
DEFAULT_SESSION_HOURS = 12
MAX_SESSION_HOURS = 24 * 30
UNNAMED_PROVIDER = "default"
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"

# [auth] keys that are not provider settings (expose_tokens is Streamlit's own; ignored here).
_AUTH_SHARED_KEYS = {"redirect_uri", "cookie_secret", "expose_tokens"}
_PROVIDER_KEYS = {"client_id", "client_secret", "server_metadata_url", "label", "client_kwargs", "scope"}
# Extra parameters a provider may want on its authorization request; the protocol's own
# (state, nonce, redirect_uri, code_challenge, response_type, client_id) can never be overridden.
_AUTHORIZE_PARAMS = {
    "prompt", "hd", "domain_hint", "login_hint", "acr_values", "ui_locales", "display", "max_age",
    "audience", "organization", "connection", "resource",
}
_CLIENT_KWARGS = _AUTHORIZE_PARAMS | {"scope", "token_endpoint_auth_method", "code_challenge_method"}
_AUTH_METHODS = {"client_secret_basic", "client_secret_post"}
_PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")
_EMAIL = re.compile(r"^[^@\s]+@([a-z0-9-]+\.)+[a-z0-9-]+$")
_DOMAIN = re.compile(r"^@([a-z0-9-]+\.)+[a-z0-9-]+$")


@dataclass(frozen=True)
class ProviderConfig:
    """One OpenID Connect provider (``[auth.<name>]``, or ``[auth]`` itself)."""

    name: str
    label: str
    client_id: str
    client_secret: str = field(repr=False)
    server_metadata_url: str
    scope: str = DEFAULT_SCOPE
    token_endpoint_auth_method: str | None = None
    authorize_params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthConfig:
    """Everything sign-in needs; ``providers`` keeps the file's order."""

    source: Path
    redirect_uri: str
    cookie_secret: str = field(repr=False)
    providers: Mapping[str, ProviderConfig]
    creators: tuple[str, ...] = ()
    session_max_age: timedelta = timedelta(hours=DEFAULT_SESSION_HOURS)

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` when the site is served over HTTPS."""
        return self.redirect_uri.startswith("https://")

    def provider(self, name: str) -> ProviderConfig | None:
        return self.providers.get(name) if isinstance(name, str) else None

    def is_creator_email(self, email: str | None) -> bool:
        """Is this (already verified) e-mail listed, or inside a listed ``@domain``?
        Exact matches only: ``@client.example`` does not admit ``evilclient.example``
        nor ``client.example.evil.test``."""
        if not isinstance(email, str) or not _EMAIL.fullmatch(email.strip().lower()):
            return False
        address = email.strip().lower()
        domain = "@" + address.rsplit("@", 1)[1]
        return any(entry == address or entry == domain for entry in self.creators)


# --- finding the file --------------------------------------------------------


def secrets_path() -> Path | None:
    """``$PERSONAL_GPT_SECRETS``, else ``./.streamlit/secrets.toml``, else
    ``~/.streamlit/secrets.toml``; None when none of them exists. A path named by
    the environment variable must exist (a typo must not silently turn sign-in off)."""
    named = os.environ.get(SECRETS_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise InvalidInput(f"{SECRETS_ENV} points to {path}, which is not a file: fix the path or unset it.")
        return path
    for candidate in (Path.cwd() / ".streamlit" / "secrets.toml", Path.home() / ".streamlit" / "secrets.toml"):
        if candidate.is_file():
            return candidate
    return None


_cache: dict[Path, tuple[tuple[int, int], AuthConfig | None]] = {}
_cache_lock = threading.Lock()


def load_auth_config(path: Path | None = None) -> AuthConfig | None:
    """The sign-in settings, or None when sign-in is not configured (no secrets file,
    or no ``[auth]`` section in it). Re-read when the file changes."""
    path = path or secrets_path()
    if path is None:
        return None
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise InvalidInput(f"The secrets file {path} cannot be read.") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"The secrets file {path} is not valid TOML ({exc}).") from None
    except (OSError, UnicodeDecodeError):
        raise InvalidInput(f"The secrets file {path} cannot be read as UTF-8 text.") from None
    config = parse_auth_config(data, source=path)
    with _cache_lock:
        _cache[path] = (stamp, config)
    return config


# --- checking it ---------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: object, where: str, *, https_unless_loopback: bool = True) -> str:
    """An absolute http(s) URL without user info or fragment; plain http only for
    this machine (localhost, 127.0.0.1, ::1). Used for the file and for provider metadata."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where} is missing: it must be a full web address starting with https://.")
    url = value.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidInput(f"{where} ({url!r}) is not a valid web address.") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidInput(f"{where} ({url!r}) must be a full web address starting with https://.")
    if parts.username or parts.password or parts.fragment:
        raise InvalidInput(f"{where} ({url!r}) must not contain a user name, password or '#' part.")
    if https_unless_loopback and parts.scheme == "http" and not _is_loopback(host):
        raise InvalidInput(
            f"{where} ({url!r}) must use https:// (plain http:// is only allowed for localhost)."
        )
    return url


def _text(section: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = section.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidInput(f"{where} has no {key}: copy it from your sign-in provider's app registration.")
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{key} in {where} must be text in quotes.")
    return value.strip()


def _provider(name: str, section: Mapping[str, Any], where: str) -> ProviderConfig:
    unknown = sorted(set(section) - _PROVIDER_KEYS - (_AUTH_SHARED_KEYS if where == "[auth]" else set()))
    if unknown:
        raise InvalidInput(
            f"Unknown setting '{unknown[0]}' in {where}; allowed are: {', '.join(sorted(_PROVIDER_KEYS))}."
        )
    client_id = _text(section, "client_id", where)
    client_secret = _text(section, "client_secret", where)
    metadata_url = check_url(section.get("server_metadata_url"), f"server_metadata_url in {where}")
    if not metadata_url.rstrip("/").endswith(DISCOVERY_SUFFIX):
        raise InvalidInput(
            f"server_metadata_url in {where} must end with {DISCOVERY_SUFFIX} "
            f"(for example https://accounts.google.com{DISCOVERY_SUFFIX})."
        )
    label = _text(section, "label", where, required=False) or name.replace("_", " ").replace("-", " ").title()
    kwargs = section.get("client_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise InvalidInput(f"client_kwargs in {where} must be a table, like client_kwargs = {{ prompt = \"login\" }}.")
    bad = sorted(set(kwargs) - _CLIENT_KWARGS)
    if bad:
        raise InvalidInput(
            f"client_kwargs in {where} has '{bad[0]}', which cannot be set; allowed are: "
            f"{', '.join(sorted(_CLIENT_KWARGS))}."
        )
    scope = section.get("scope", kwargs.get("scope", DEFAULT_SCOPE))
    if not isinstance(scope, str) or not scope.strip():
        raise InvalidInput(f"scope in {where} must be text such as \"{DEFAULT_SCOPE}\".")
    words = scope.split()
    if "openid" not in words:
        words.insert(0, "openid")
    method = kwargs.get("token_endpoint_auth_method")
    if method is not None and method not in _AUTH_METHODS:
        raise InvalidInput(
            f"token_endpoint_auth_method in {where} must be one of: {', '.join(sorted(_AUTH_METHODS))}."
        )
    challenge = kwargs.get("code_challenge_method", "S256")
    if challenge != "S256":
        raise InvalidInput(f"code_challenge_method in {where} can only be \"S256\".")
    params: dict[str, str] = {}
    for key in sorted(set(kwargs) & _AUTHORIZE_PARAMS):
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidInput(f"client_kwargs.{key} in {where} must be text or a whole number.")
        params[key] = str(value)
    return ProviderConfig(
        name=name, label=label[:100], client_id=client_id, client_secret=client_secret,
        server_metadata_url=metadata_url, scope=" ".join(dict.fromkeys(words)),
        token_endpoint_auth_method=method, authorize_params=params,
    )


def _creators(section: Mapping[str, Any]) -> tuple[str, ...]:
    raw = section.get("creators", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise InvalidInput("creators in [personal_gpt] must be a list, like creators = [\"ana@example.com\", \"@example.com\"].")
    out = []
    for entry in raw:
        value = entry.strip().lower() if isinstance(entry, str) else ""
        if not (_EMAIL.fullmatch(value) or _DOMAIN.fullmatch(value)):
            raise InvalidInput(
                f"creators in [personal_gpt] has {entry!r}: write an e-mail address (ana@example.com) "
                "or a whole domain starting with @ (@example.com)."
            )
        out.append(value)
    return tuple(dict.fromkeys(out))


def _session_hours(section: Mapping[str, Any]) -> float:
    hours = section.get("session_max_age_hours", DEFAULT_SESSION_HOURS)
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not (0 < hours <= MAX_SESSION_HOURS):
        raise InvalidInput(
            f"session_max_age_hours in [personal_gpt] must be a number of hours above 0 and at most {MAX_SESSION_HOURS}."
        )
    return float(hours)


def parse_auth_config(data: Mapping[str, Any], source: Path | str = "secrets.toml") -> AuthConfig | None:
    """Validate the parsed TOML. None when there is no ``[auth]`` section."""
    auth = data.get("auth")
    if auth is None:
        return None
    if not isinstance(auth, Mapping):
        raise InvalidInput("auth in the secrets file must be a section: [auth].")
    redirect_uri = check_url(auth.get("redirect_uri"), "redirect_uri in [auth]")
    if urlsplit(redirect_uri).query or not urlsplit(redirect_uri).path.endswith(CALLBACK_PATH):
        raise InvalidInput(
            f"redirect_uri in [auth] must be your site's address followed by {CALLBACK_PATH}, "
            f"for example https://gpts.example.com{CALLBACK_PATH} (not Streamlit's /oauth2callback)."
        )
    # Streamlit's format has it; our signed cookies use web/cookies.py's key. Optional, but never weak.
    cookie_secret = _text(auth, "cookie_secret", "[auth]", required=False)
    if cookie_secret and len(cookie_secret) < 32:
        raise InvalidInput(
            "cookie_secret in [auth] must be a random text of at least 32 characters; make one with: "
            "python -c \"import secrets; print(secrets.token_hex(32))\"."
        )
    providers: dict[str, ProviderConfig] = {}
    tables = {k: v for k, v in auth.items() if isinstance(v, Mapping) and k != "client_kwargs"}
    flat = {k: v for k, v in auth.items() if k not in tables}
    if any(k in flat for k in ("client_id", "client_secret", "server_metadata_url")):
        providers[UNNAMED_PROVIDER] = _provider(UNNAMED_PROVIDER, {k: v for k, v in flat.items() if k not in _AUTH_SHARED_KEYS}, "[auth]")
    else:
        stray = sorted(set(flat) - _AUTH_SHARED_KEYS)
        if stray:
            raise InvalidInput(
                f"Unknown setting '{stray[0]}' in [auth]: provider settings belong in a section like [auth.google]."
            )
    for name, section in tables.items():
        if not _PROVIDER_NAME.fullmatch(name) or name == UNNAMED_PROVIDER and name in providers:
            raise InvalidInput(
                f"[auth.{name}] is not a usable provider name: use letters, digits, '-' or '_' (like [auth.google])."
            )
        providers[name] = _provider(name, section, f"[auth.{name}]")
    if not providers:
        raise InvalidInput(
            "[auth] names no sign-in provider: add a section like [auth.google] with client_id, client_secret "
            "and server_metadata_url."
        )
    ours = data.get("personal_gpt", {})
    if not isinstance(ours, Mapping):
        raise InvalidInput("personal_gpt in the secrets file must be a section: [personal_gpt].")
    return AuthConfig(
        source=Path(source),
        redirect_uri=redirect_uri,
        cookie_secret=cookie_secret,
        providers=providers,
        creators=_creators(ours),
        session_max_age=timedelta(hours=_session_hours(ours)),
    )
