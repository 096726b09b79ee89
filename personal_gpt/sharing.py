"""Share links, the pure part: tokens, the facts of a link, who is visiting, and
the one access decision (``decide``), plus the checks of what a creator types
when making a link. No database, no HTTP, no clock of its own (``now`` comes in).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Iterable
from urllib.parse import urlsplit

from personal_gpt.auth import Principal
from personal_gpt.errors import Forbidden, InvalidInput

TOKEN_PREFIX = "pgs_"
_TOKEN_BYTES = 32  # 256 random bits -> exactly 43 URL-safe characters
_TOKEN = re.compile(r"^pgs_[A-Za-z0-9_-]{43}$")
_TOKEN_ANYWHERE = re.compile(r"pgs_[A-Za-z0-9_-]+")

POLICIES = ("public", "signin")
MAX_SESSION_AGE = timedelta(hours=12)  # a sign-in older than this must be renewed before a signin link lets you in
MAX_LABEL = 100
MAX_LIST_ENTRIES = 500
MAX_QUOTA = 1_000_000

NOT_AVAILABLE = (
    "This link is not available: it may have expired or been revoked. Ask the person who sent it for a new one."
)
# Reasons that must all look exactly like a link that never existed.
NOT_AVAILABLE_REASONS = frozenset({"unknown", "revoked", "expired", "unpublished"})

_MESSAGES = {
    "not_signed_in": "Sign in to chat with this GPT.",
    "session_too_old": "Your sign-in is too old for this link: sign in again to continue.",
    "unverified_email": (
        "Your account's e-mail address is not verified, so this link cannot let you in. Verify it with "
        "your sign-in provider, or ask the person who sent the link."
    ),
    "not_on_list": (
        "This link is for specific people, and the account you signed in with is not one of them. "
        "Sign in with another account, or ask the person who sent the link."
    ),
    "quota": "This link has reached its message limit. Ask the person who sent it for a new one.",
}


# --- tokens -----------------------------------------------------------------------


def new_token() -> str:
    """A fresh share token: ``pgs_`` + 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    """What the database keeps instead of the token: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(value: object) -> bool:
    """True only for the exact shape ``new_token`` makes; anything else (truncated,
    padded, other alphabets, non-strings) is refused before any lookup."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def redact_tokens(text: str) -> str:
    """Replace anything that looks like a share token (for log lines)."""
    return _TOKEN_ANYWHERE.sub("pgs_[redacted]", text)


def check_base_url(base_url: str) -> str:
    """The app's address without a trailing slash; an http(s) URL, no query or fragment."""
    base = (base_url or "").strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InvalidInput("The base URL must be the app's address, e.g. https://gpts.example.com.")
    return base


def link_url(token: str, base_url: str) -> str:
    """``BASE/s/<token>``, the address to send people."""
    base = check_base_url(base_url)
    if not looks_like_token(token):
        raise InvalidInput("That is not a share token.")
    return f"{base}/s/{token}"


# --- facts and the decision ------------------------------------------------------------


@dataclass(frozen=True)
class LinkFacts:
    """What ``decide`` needs to know about a link (read from the store)."""

    id: str
    gpt_id: str
    policy: str  # "public" | "signin"
    allowed_emails: tuple[str, ...] = ()  # normalised: lower case, IDNA domain
    allowed_domains: tuple[str, ...] = ()  # lower case, IDNA, no leading "@"
    expires_at: datetime | None = None  # aware
    message_quota: int | None = None
    messages_used: int = 0
    revoked_at: datetime | None = None
    gpt_published: bool = False


@dataclass(frozen=True)
class Visitor:
    """Who opened the link. ``principal`` is None when not signed in; ``visitor_id``
    is the random id of an anonymous browser (the web layer's ``pgpt_visitor``
    cookie), used only to keep an anonymous visitor's own history on public links."""

    principal: Principal | None = None
    signed_in_at: datetime | None = None
    visitor_id: str = ""


@dataclass(frozen=True)
class Decision:
    outcome: str  # "allow" | "sign_in" | "denied"
    reason: str  # "" for allow; otherwise a code for the creator's stats and the log
    message: str  # a sentence for the visitor; never anything about the GPT's insides

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    @property
    def not_available(self) -> bool:
        """Unknown, revoked, expired or unpublished: indistinguishable to the visitor."""
        return self.reason in NOT_AVAILABLE_REASONS


class LinkRefused(Forbidden):
    """A live link that does not let this visitor in (yet): sign in, wrong account,
    unverified e-mail, or its message limit reached. ``decision`` says which."""

    code = "link_refused"

    def __init__(self, decision: Decision):
        super().__init__(decision.message)
        self.decision = decision


ALLOW = Decision("allow", "", "")
QUOTA_REACHED = Decision("denied", "quota", _MESSAGES["quota"])


def _gone(reason: str) -> Decision:
    return Decision("denied", reason, NOT_AVAILABLE)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def decide(link: LinkFacts | None, visitor: Visitor, now: datetime, *, max_session_age: timedelta) -> Decision:
    """May ``visitor`` use ``link`` at ``now``? The only place this is decided.

    Order: the link itself (unknown, revoked, expired, GPT unpublished — all the same
    "not available" to the visitor), then its message limit, then its audience.
    A ``signin`` link needs a sign-in younger than ``max_session_age`` and a
    verified e-mail; when it has lists, the e-mail must be on the e-mail list or its
    domain exactly on the domain list. Subdomains do not count: ``example.com``
    does not admit ``x@mail.example.com`` (list each subdomain you want).
    Empty lists admit any verified signed-in person.
    """
    now = _utc(now)
    if link is None:
        return _gone("unknown")
    if link.revoked_at is not None:
        return _gone("revoked")
    if link.expires_at is not None and _utc(link.expires_at) <= now:
        return _gone("expired")
    if not link.gpt_published:
        return _gone("unpublished")
    if link.policy not in POLICIES:
        return _gone("unknown")  # fail closed on anything we did not write
    if link.message_quota is not None and link.messages_used >= link.message_quota:
        return QUOTA_REACHED
    if link.policy == "public":
        return ALLOW
    who = visitor.principal
    if who is None:
        return Decision("sign_in", "not_signed_in", _MESSAGES["not_signed_in"])
    if visitor.signed_in_at is None or now - _utc(visitor.signed_in_at) >= max_session_age:
        return Decision("sign_in", "session_too_old", _MESSAGES["session_too_old"])
    if who.email_verified is not True or not who.email:
        return Decision("denied", "unverified_email", _MESSAGES["unverified_email"])
    if not link.allowed_emails and not link.allowed_domains:
        return ALLOW
    email = visitor_email(who.email)
    if email is not None:
        domain = email.rsplit("@", 1)[1]
        if email in {e.lower() for e in link.allowed_emails} or domain in {d.lower() for d in link.allowed_domains}:
            return ALLOW
    return Decision("denied", "not_on_list", _MESSAGES["not_on_list"])


# --- what the creator types ------------------------------------------------------------

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LOCAL_BAD = re.compile(r"[\s@\"(),:;<>\[\]\\]")


def _short(value: str) -> str:
    value = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C")
    return value if len(value) <= 60 else value[:57] + "…"


def _domain_or_none(raw: str) -> str | None:
    """IDNA (punycode), lower case, trailing dot dropped; None when not a host name."""
    value = unicodedata.normalize("NFC", raw.strip()).rstrip(".")
    if not value or len(value) > 253:
        return None
    try:
        ascii_name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # an IP address is not a domain
        return None
    return ascii_name


def _email_or_none(raw: str) -> str | None:
    value = unicodedata.normalize("NFC", (raw or "").strip())
    if value.count("@") != 1 or len(value) > 254:
        return None
    local, domain = value.split("@")
    if not local or len(local) > 64 or _LOCAL_BAD.search(local) or local.startswith(".") or local.endswith("."):
        return None
    if ".." in local or any(unicodedata.category(ch)[0] == "C" for ch in local):
        return None
    host = _domain_or_none(domain)
    if host is None or domain.strip().endswith("."):
        return None
    return f"{local.lower()}@{host}"


def visitor_email(raw: str | None) -> str | None:
    """A signed-in visitor's e-mail in the form the lists are stored in; None if malformed."""
    return _email_or_none(raw) if isinstance(raw, str) else None


def split_items(values: str | Iterable[str] | None,
                not_text: str = "E-mail addresses and domains must be text.") -> list[str]:
    """A list from a list, or from one text (commas, semicolons, spaces or new lines between
    items); ``not_text`` is the sentence for an item that is not a string."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise InvalidInput(not_text)
        out += [part for part in re.split(r"[\s,;]+", value) if part]
    return out


def normalise_emails(values: str | Iterable[str] | None) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for raw in split_items(values):
        email = _email_or_none(raw)
        if email is None:
            raise InvalidInput(f"'{_short(raw)}' is not an e-mail address, e.g. name@example.com.")
        out[email] = None
    if len(out) > MAX_LIST_ENTRIES:
        raise InvalidInput(f"List at most {MAX_LIST_ENTRIES} e-mail addresses on one link.")
    return tuple(out)


def normalise_domains(values: str | Iterable[str] | None) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for raw in split_items(values):
        value = raw.strip()
        if "*" in value:
            raise InvalidInput(
                f"'{_short(raw)}': wildcards are not supported; write the domain itself, e.g. example.com "
                "(subdomains are listed one by one)."
            )
        if "/" in value or value.lower().startswith(("http:", "https:")):
            raise InvalidInput(f"'{_short(raw)}': write just the domain, e.g. example.com, not a web address.")
        if value.startswith("@"):
            value = value[1:]
        if "@" in value:
            raise InvalidInput(
                f"'{_short(raw)}' looks like an e-mail address: add it to the e-mail list, or write just the domain."
            )
        domain = _domain_or_none(value)
        if domain is None:
            raise InvalidInput(f"'{_short(raw)}' is not a domain name, e.g. example.com.")
        out[domain] = None
    if len(out) > MAX_LIST_ENTRIES:
        raise InvalidInput(f"List at most {MAX_LIST_ENTRIES} domains on one link.")
    return tuple(out)


def normalise_label(label: str | None) -> str:
    value = " ".join(unicodedata.normalize("NFC", label or "").split())
    value = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C")
    if len(value) > MAX_LABEL:
        raise InvalidInput(f"The label is too long: keep it under {MAX_LABEL} characters.")
    return value


def normalise_quota(quota: int | None) -> int | None:
    if quota is None:
        return None
    if isinstance(quota, bool) or not isinstance(quota, int) or not 1 <= quota <= MAX_QUOTA:
        raise InvalidInput(f"The message limit must be a whole number from 1 to {MAX_QUOTA:,}.")
    return quota


def normalise_expiry(expires: date | datetime | None, now: datetime) -> datetime | None:
    """An aware UTC datetime, or None for "never". A date means the end of that day
    in UTC (the link stops at midnight UTC after it); a naive datetime is read as UTC."""
    if expires is None:
        return None
    try:
        if isinstance(expires, datetime):
            at = _utc(expires)
        elif isinstance(expires, date):
            at = datetime.combine(expires + timedelta(days=1), time.min, tzinfo=timezone.utc)
        else:
            raise InvalidInput("The expiry must be a date like 2025-12-31.")
    except OverflowError:
        raise InvalidInput("That expiry date is too far in the future.") from None
    if at <= _utc(now):
        raise InvalidInput("The expiry date is in the past: pick today or a later date.")
    return at


def parse_expiry_date(text: str) -> date:
    """``YYYY-MM-DD`` (what the CLI takes) -> a date, or one sentence."""
    value = (text or "").strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise InvalidInput(f"'{_short(value)}' is not a date: write it as YYYY-MM-DD, e.g. 2025-12-31.")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"'{value}' is not a real date: write it as YYYY-MM-DD, e.g. 2025-12-31.") from None


def expiry_label(expires_at: datetime | None) -> str:
    """How an expiry reads: "never", "end of 2025-12-31 (UTC)" for a date-made expiry,
    else "2025-12-31 14:00 UTC"."""
    if expires_at is None:
        return "never"
    at = _utc(expires_at)
    if at.time() == time.min:
        return f"end of {(at - timedelta(days=1)).date().isoformat()} (UTC)"
    return at.strftime("%Y-%m-%d %H:%M UTC")
