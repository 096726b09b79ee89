"""The embed widget, the pure part: the sites a creator lists (normalised to exact
web origins), the widget's theme, and the Content-Security-Policy source list
derived from them. No database, no HTTP, no clock.

Origins are compared exactly: ``https://www.example.com`` and ``https://example.com``
are different sites (list both if both serve the widget). An empty list means
the embed is off.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable
from urllib.parse import urlsplit

from personal_gpt.errors import InvalidInput
from personal_gpt.sharing import split_items

MAX_SITES = 50
LOCAL_HOSTS = ("localhost", "127.0.0.1")  # plain http is accepted only for these (testing on your own machine)
POSITIONS = ("bottom-right", "bottom-left")
DEFAULT_COLOUR = "#2563eb"
MAX_TITLE = 60
MAX_GREETING = 300
MAX_AVATAR = 16

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_HEX = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")


def _short(value: str) -> str:
    value = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C")
    return value if len(value) <= 60 else value[:57] + "…"


def _host(raw: str) -> str | None:
    """IDNA lower-case host name, or one of LOCAL_HOSTS; None otherwise (IPs other than
    127.0.0.1 are refused: a public site has a name)."""
    value = unicodedata.normalize("NFC", raw).rstrip(".")
    if value in LOCAL_HOSTS:
        return value
    if not value or len(value) > 253:
        return None
    try:
        name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if name in LOCAL_HOSTS:
        return name
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def origin_or_none(value: object, *, strict: bool = True) -> str | None:
    """The exact origin (``scheme://host[:port]``) of ``value``, or None when it is not an
    acceptable one: https, or http only for localhost / 127.0.0.1 (any port).

    ``strict`` (what browsers send in ``Origin`` or ``location.origin``): the value must
    already be an origin (a scheme, no path, no query). Not strict (what a creator types):
    a missing scheme means https, and a path, query or fragment is dropped."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > 300 or any(ch.isspace() for ch in text):
        return None
    if not strict and "://" not in text:
        text = "https://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.password is not None:
        return None
    if strict and (parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith("/")):
        return None
    if "*" in parts.netloc:
        return None
    host = _host(parts.hostname)
    if host is None:
        return None
    if parts.scheme == "http" and host not in LOCAL_HOSTS:
        return None
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def normalise_site(raw: str) -> str:
    """What a creator typed ("www.example.com", "https://example.com/page") -> its origin,
    or InvalidInput with one sentence."""
    value = (raw or "").strip()
    if "*" in value:
        raise InvalidInput(
            f"'{_short(value)}': wildcards are not supported; list each site, e.g. https://www.example.com "
            "and https://example.com."
        )
    if value.lower().startswith("http://") and origin_or_none(value, strict=False) is None:
        parts = urlsplit(value)
        if parts.hostname and _host(parts.hostname):
            raise InvalidInput(
                f"'{_short(value)}': the widget only runs on https sites (plain http is allowed for "
                "localhost and 127.0.0.1 while testing)."
            )
    origin = origin_or_none(value, strict=False)
    if origin is None:
        raise InvalidInput(f"'{_short(value)}' is not a web site address, e.g. https://www.example.com.")
    return origin


def split_lines(values: str | Iterable[str] | None) -> list[str]:
    """A list from a list, or from one text (new lines, commas or spaces between items)."""
    return split_items(values, "Sites must be text, e.g. https://www.example.com.")


def normalise_sites(values: str | Iterable[str] | None) -> tuple[str, ...]:
    """Every site as an origin, duplicates dropped, order kept. Empty: the embed is off."""
    out: dict[str, None] = {}
    for raw in split_lines(values):
        out[normalise_site(raw)] = None
    if len(out) > MAX_SITES:
        raise InvalidInput(f"List at most {MAX_SITES} sites.")
    return tuple(out)


def site_allowed(sites: Iterable[str], origin: object) -> bool:
    """Whether a browser-sent origin is exactly one of ``sites`` (already normalised)."""
    found = origin_or_none(origin)
    return found is not None and found in set(sites)


def frame_ancestors(sites: Iterable[str]) -> str:
    """The ``frame-ancestors`` source list: the sites and our own origin (the Share tab's
    preview), or ``'none'`` when the list is empty (the embed is off)."""
    listed = [s for s in sites if origin_or_none(s) == s]
    return " ".join([*listed, "'self'"]) if listed else "'none'"


# --- theme -----------------------------------------------------------------------------


def _text(value: object, limit: int, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"The {what} must be text.")
    text = " ".join(unicodedata.normalize("NFC", value).split()) if what != "greeting" else value.strip()
    text = "".join(ch for ch in text if ch in "\n" or unicodedata.category(ch)[0] != "C")
    if len(text) > limit:
        raise InvalidInput(f"The {what} is too long: keep it under {limit} characters.")
    return text


def normalise_colour(value: object) -> str:
    text = (value or "").strip() if isinstance(value, str) else ""
    if not text:
        return DEFAULT_COLOUR
    if not _HEX.match(text):
        raise InvalidInput(f"'{_short(text)}' is not a colour: write it as a hex code like #2563eb.")
    if len(text) == 4:
        text = "#" + "".join(ch * 2 for ch in text[1:])
    return text.lower()


def default_theme() -> dict:
    return {"colour": DEFAULT_COLOUR, "title": "", "greeting": "", "avatar": "", "position": POSITIONS[0],
            "open_on_load": False}


def normalise_theme(data: dict | None) -> dict:
    """The creator's theme fields, checked: colour (hex), title, greeting, avatar (an
    emoji or a few letters), position (bottom-right | bottom-left), open_on_load.
    Missing fields take the defaults; unknown fields are refused."""
    data = dict(data or {})
    unknown = set(data) - set(default_theme())
    if unknown:
        raise InvalidInput(f"Unknown theme setting '{sorted(unknown)[0]}'.")
    position = data.get("position") or POSITIONS[0]
    if position not in POSITIONS:
        raise InvalidInput("The position must be bottom-right or bottom-left.")
    open_on_load = data.get("open_on_load", False)
    if not isinstance(open_on_load, bool):
        raise InvalidInput("'Open on load' must be on or off.")
    avatar = _text(data.get("avatar"), MAX_AVATAR, "avatar")
    if "<" in avatar or ">" in avatar or "/" in avatar:
        raise InvalidInput("The avatar must be an emoji or a few letters.")
    return {
        "colour": normalise_colour(data.get("colour")),
        "title": _text(data.get("title"), MAX_TITLE, "title"),
        "greeting": _text(data.get("greeting"), MAX_GREETING, "greeting"),
        "avatar": avatar,
        "position": position,
        "open_on_load": open_on_load,
    }


def stored_theme(data: object) -> dict:
    """A theme read back from the store: whatever does not check out falls back to the default."""
    try:
        return normalise_theme(data if isinstance(data, dict) else None)
    except InvalidInput:
        return default_theme()
