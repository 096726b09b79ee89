"""``GET /s/{token}``: the door of a share link. A valid token is exchanged for a
signed ``pgpt_link`` cookie and a redirect to the fixed ``/shared`` page, so the
token leaves the address bar at once; everything else gets one identical "not
available" page. Failed guesses are rate-limited per client address. The token
is never logged. Services are reached lazily through ``glue`` (no torch here).
"""

from __future__ import annotations

import logging
import secrets
from typing import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from personal_gpt.sharing import hash_token, looks_like_token, redact_tokens
from personal_gpt.web.cookies import sign, unsign
from personal_gpt.web.ratelimit import WindowLimiter

log = logging.getLogger(__name__)

LINK_COOKIE = "pgpt_link"
VISITOR_COOKIE = "pgpt_visitor"
LINK_COOKIE_MAX_AGE = 14 * 24 * 3600  # the link itself is re-checked on every turn
VISITOR_COOKIE_MAX_AGE = 365 * 24 * 3600
SHARED_PATH = "/shared"
_LINK_PURPOSE = "share-link"
_VISITOR_PURPOSE = "visitor"

COMMON_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
}


def _page(title: str, text: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta name=\"referrer\" content=\"no-referrer\">"
        f"<title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:34rem;margin:4rem auto;"
        "padding:0 1rem;color:#222}h1{font-size:1.4rem}</style></head>"
        f"<body><main><h1>{title}</h1><p>{text}</p></main></body></html>\n"
    )


NOT_AVAILABLE_PAGE = _page(
    "This link is not available",
    "It may have expired or been revoked, or the address may be incomplete. "
    "Ask the person who sent it to you for a new one.",
)
TOO_MANY_PAGE = _page("Too many tries", "Please wait a minute, then open your link again.")
TROUBLE_PAGE = _page("Something went wrong on our side", "Please try your link again in a minute.")


class FailureLimiter(WindowLimiter):
    """At most ``limit`` failed link opens per client in any ``window`` seconds; past
    that every request from the client is refused until the window frees up.
    In memory, per process; the oldest clients are forgotten beyond ``max_clients``."""

    def failed(self, key: str) -> None:
        self.hit(key)


def _client(request: Request) -> str:
    # The peer address as the server sees it; X-Forwarded-For is not trusted (anyone can send it).
    return request.client.host if request.client else "unknown"


def _is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _not_available() -> HTMLResponse:
    return HTMLResponse(NOT_AVAILABLE_PAGE, status_code=404, headers=COMMON_HEADERS)


def _open_token(token: str) -> str:
    from personal_gpt.web import glue

    return glue.services().open_share_token(token)


def link_cookie_value(link_id: str, token: str) -> str:
    """The signed ``pgpt_link`` value: the link id and a fingerprint of the token it was
    opened with, so rotating the link also shuts out browsers that opened the old URL."""
    return sign(f"{link_id}.{hash_token(token)[:16]}", _LINK_PURPOSE)


def shared_link_ref(cookies: Mapping[str, str]) -> tuple[str, str] | None:
    """(link id, token fingerprint) from a request's ``pgpt_link`` cookie, or None when
    absent, tampered with or too old. Check the fingerprint with
    ``Services.share_link_current`` before trusting the link id."""
    value = unsign(cookies.get(LINK_COOKIE), _LINK_PURPOSE, LINK_COOKIE_MAX_AGE)
    if not value or "." not in value:
        return None
    link_id, _, fingerprint = value.partition(".")
    return link_id, fingerprint


def shared_link_id(cookies: Mapping[str, str]) -> str | None:
    """The link id in a request's ``pgpt_link`` cookie (e.g. ``st.context.cookies``),
    or None when absent, tampered with or too old."""
    ref = shared_link_ref(cookies)
    return ref[0] if ref else None


def visitor_id(cookies: Mapping[str, str]) -> str | None:
    """The anonymous browser id in ``pgpt_visitor`` (for ``Visitor(visitor_id=...)``), or None."""
    return unsign(cookies.get(VISITOR_COOKIE), _VISITOR_PURPOSE, VISITOR_COOKIE_MAX_AGE)


def make_share_door(limiter: FailureLimiter):
    async def share_door(request: Request) -> Response:
        from personal_gpt.errors import NotFound, PersonalGptError

        client = _client(request)
        wait = limiter.retry_after(client)
        if wait is not None:
            log.warning("share link door: too many failed tries from %s", client)
            return HTMLResponse(TOO_MANY_PAGE, status_code=429, headers={**COMMON_HEADERS, "Retry-After": str(wait)})
        token = request.path_params.get("token", "")
        if not looks_like_token(token):
            limiter.failed(client)
            return _not_available()
        try:
            link_id = await run_in_threadpool(_open_token, token)
        except NotFound:
            limiter.failed(client)
            return _not_available()
        except PersonalGptError as exc:  # e.g. the database is unreachable: not the visitor's fault
            log.error("share link door: %s", exc)
            return HTMLResponse(TROUBLE_PAGE, status_code=503, headers={**COMMON_HEADERS, "Retry-After": "60"})
        secure = _is_https(request)
        response = RedirectResponse(SHARED_PATH, status_code=303, headers=COMMON_HEADERS)
        response.set_cookie(
            LINK_COOKIE, link_cookie_value(link_id, token), max_age=LINK_COOKIE_MAX_AGE, path="/",
            secure=secure, httponly=True, samesite="lax",
        )
        if visitor_id(request.cookies) is None:
            response.set_cookie(
                VISITOR_COOKIE, sign(secrets.token_urlsafe(24), _VISITOR_PURPOSE), max_age=VISITOR_COOKIE_MAX_AGE,
                path="/", secure=secure, httponly=True, samesite="lax",
            )
        log.info("share link %s opened", link_id)
        return response

    return share_door


class RedactShareTokens(logging.Filter):
    """Keeps share tokens out of server log lines (e.g. an access log of ``/s/<token>``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        if "pgs_" in message:
            record.msg, record.args = redact_tokens(message), None
        return True


_REDACT = RedactShareTokens()


def _install_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def share_routes(limiter: FailureLimiter | None = None) -> list[Route]:
    """The share link routes, to add to the app's route list."""
    _install_redaction()
    return [Route("/s/{token:path}", make_share_door(limiter or FailureLimiter()), methods=["GET"])]
