"""The embed widget over HTTP: ``/embed.js`` (the chat bubble a site adds with one
script tag), ``/embed/<gpt_id>`` (the chat page shown in the bubble's iframe, framed
only by the GPT's allowed sites: ``Content-Security-Policy: frame-ancestors``), the
page's JSON/SSE calls (Origin checked on every state-changing call), and the sign-in
popup that hands a short-lived token back to our own origin only.

HTTP only: access, limits and the chat path are the services' (``services_embed``).
Answers are JSON with a status, never a traceback. Nothing heavy is imported here.
"""

from __future__ import annotations

import html
import json
import logging
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from personal_gpt.embed_sites import origin_or_none
from personal_gpt.web.cookies import sign, unsign
from personal_gpt.web.ratelimit import WindowLimiter

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"embed-chat.js": "text/javascript", "embed-chat.css": "text/css", "embed-signin.js": "text/javascript"}

VISITOR_HEADER = "x-pgpt-visitor"
VISITOR_PURPOSE = "embed-visitor"
VISITOR_MAX_AGE = 365 * 24 * 3600
TOKEN_PURPOSE = "embed-token"
TOKEN_MAX_AGE = 30 * 60  # a widget sign-in lasts 30 minutes; then the popup again (instant if still signed in)
RETURN_COOKIE = "pgpt_embed_return"  # the popup's way back after /auth/login (read by web/oidc.py)
RETURN_PURPOSE = "embed-signin-return"
RETURN_MAX_AGE = 10 * 60
RETURN_PREFIX = "emb_"  # login_states.return_link_id for the popup: "emb_" + the GPT id's hex
MAX_BODY_BYTES = 64 * 1024
_GPT_ID_HEX = 32

BASE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
NOT_AVAILABLE = "This chat is not available here."
TROUBLE = "Something went wrong on our side. Please try again in a minute."


# --- small helpers -------------------------------------------------------------------


def _services():
    from personal_gpt.web import glue

    return glue.services()


def own_origin(request: Request) -> str:
    """Our origin as browsers see it: PERSONAL_GPT_BASE_URL's origin when set, else the
    request's scheme (X-Forwarded-Proto honoured) and Host."""
    configured = os.environ.get("PERSONAL_GPT_BASE_URL", "").strip()
    if configured:
        parts = urlsplit(configured)
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}".lower()
    scheme = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() or request.url.scheme
    host = request.headers.get("host") or request.url.netloc
    return f"{scheme}://{host}".lower()


def _json_error(status: int, message: str, code: str, retry_after: int | None = None,
                headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "code": code, "status": status}}
    extra = dict(BASE_HEADERS)
    if retry_after is not None:
        body["error"]["retry_after"] = int(retry_after)
        extra["Retry-After"] = str(int(retry_after))
    extra.update(headers or {})
    return JSONResponse(body, status_code=status, headers=extra)


def _from_exc(exc) -> JSONResponse:
    from personal_gpt.errors import RateLimited
    from personal_gpt.sharing import LinkRefused

    if isinstance(exc, LinkRefused) and exc.decision.outcome == "sign_in":
        return _json_error(401, str(exc), "sign_in")
    status = exc.status if exc.status in (400, 401, 403, 404, 409, 413, 415, 429, 502) else 500
    return _json_error(status, str(exc) if status != 500 else TROUBLE, exc.code,
                       retry_after=exc.retry_after if isinstance(exc, RateLimited) else None)


def _guarded(handler):
    """Our errors become their JSON status; anything unforeseen a 500 JSON (and a log line)."""

    async def run(request: Request) -> Response:
        from personal_gpt.errors import PersonalGptError

        try:
            return await handler(request)
        except PersonalGptError as exc:
            return _from_exc(exc)
        except Exception:  # noqa: BLE001 - the last line of defence: never a traceback to a visitor
            log.exception("embed route %s failed", request.url.path)
            return _json_error(500, TROUBLE, "server_error")

    return run


def _gpt_id(request: Request) -> str:
    return request.path_params.get("gpt_id", "")


def _page(svc, gpt_id: str):
    """The GPT's widget view, or None when not available (unknown, unpublished, embed off)."""
    from personal_gpt.errors import NotFound

    try:
        return svc.embed_page(gpt_id)
    except NotFound:
        return None


def _origin_allowed(request: Request, page) -> bool:
    """The iframe's own calls come from our origin; the bubble's from an allowed site."""
    origin = request.headers.get("origin")
    if not origin:
        return False
    if origin.lower() == own_origin(request):
        return True
    return origin_or_none(origin) in set(page.sites)


async def _json_body(request: Request) -> dict:
    """A JSON object from the body: 415 wrong type, 413 too large, 400 malformed."""
    from personal_gpt.errors import InvalidInput, TooLarge

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        exc = InvalidInput("Send the request as JSON (Content-Type: application/json).")
        exc.status, exc.code = 415, "unsupported_media_type"
        raise exc
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge("That request is too large.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise TooLarge("That request is too large.")
    except ClientDisconnect:
        raise InvalidInput("The request was cut off.") from None
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("The request is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidInput("The request must be a JSON object.")
    return data


def _string(data: dict, key: str, what: str) -> str:
    from personal_gpt.errors import InvalidInput

    value = data.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"The request needs a '{key}' ({what}).")
    return value


# --- visitors -----------------------------------------------------------------------


def new_visitor_id() -> str:
    """A fresh anonymous visitor id, signed (the iframe keeps it in localStorage)."""
    return sign(secrets.token_urlsafe(24), VISITOR_PURPOSE)


def mint_token(gpt_id: str, principal, signed_in_at: datetime) -> str:
    """A short-lived widget sign-in for one GPT: who, and when they signed in (signed, not secret)."""
    claims = {
        "g": gpt_id, "i": principal.issuer, "s": principal.subject, "e": principal.email,
        "v": bool(principal.email_verified), "n": principal.name, "t": signed_in_at.isoformat(),
    }
    return sign(json.dumps(claims, separators=(",", ":")), TOKEN_PURPOSE)


def read_token(token: str | None, gpt_id: str):
    """(Principal, signed_in_at) from a widget token for this GPT, or None (forged, expired,
    another GPT's)."""
    from personal_gpt.auth import Principal

    raw = unsign(token, TOKEN_PURPOSE, TOKEN_MAX_AGE)
    if raw is None:
        return None
    try:
        claims = json.loads(raw)
        if claims.get("g") != gpt_id or not claims.get("i") or not claims.get("s"):
            return None
        principal = Principal(issuer=str(claims["i"]), subject=str(claims["s"]), email=claims.get("e") or None,
                              email_verified=claims.get("v") is True, name=claims.get("n") or None)
        return principal, datetime.fromisoformat(claims["t"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _visitor(request: Request, gpt_id: str):
    """The Visitor of a widget call: a signed-in person from ``Authorization: Bearer``,
    else the anonymous id in the visitor header."""
    from personal_gpt.errors import InvalidInput, Unauthorized
    from personal_gpt.sharing import Visitor

    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        found = read_token(token.strip(), gpt_id) if scheme.lower() == "bearer" else None
        if found is None:
            raise Unauthorized("Your sign-in for this chat has expired: sign in again.")
        return Visitor(principal=found[0], signed_in_at=found[1])
    visitor = unsign(request.headers.get(VISITOR_HEADER), VISITOR_PURPOSE, VISITOR_MAX_AGE)
    if not visitor:
        raise InvalidInput("This chat could not recognise your browser: reload the page and try again.")
    return Visitor(visitor_id=visitor)


# --- citations and rendering -----------------------------------------------------------


def _render(text: str) -> str:
    from personal_gpt.markdown_safe import render_html

    return render_html(text)


def _citations(items: list[dict]) -> list[dict]:
    """What a visitor sees of a citation: number, file, page, section, and a short quote when present."""
    out = []
    for c in items or []:
        if not isinstance(c, dict):
            continue
        quote = c.get("quote") or c.get("text") or ""
        out.append({
            "n": c.get("n"), "file": str(c.get("file") or ""), "page": c.get("page"),
            "section": str(c.get("section") or ""),
            "quote": (quote[:297] + "…") if isinstance(quote, str) and len(quote) > 300 else (quote or ""),
        })
    return out


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


_END = object()


async def stream_reply(reply) -> AsyncIterator[bytes]:
    """The answer as server-sent events: ``piece`` events while the model writes, then
    ``done`` with the sanitized HTML and citations (or ``error``). Each piece is taken in a
    worker thread; when the client goes away the generator is closed (the partial answer
    is saved as cancelled by the chat path)."""
    from personal_gpt.errors import PersonalGptError

    pieces = reply.pieces
    finished = False
    try:
        while True:
            try:
                piece = await run_in_threadpool(next, pieces, _END)
            except PersonalGptError as exc:
                yield _sse("error", {"message": str(exc), "code": exc.code, "status": exc.status})
                finished = True
                return
            if piece is _END:
                break
            yield _sse("piece", {"text": piece})
        finished = True
        rendered = await run_in_threadpool(_render, reply.text)
        yield _sse("done", {"html": rendered, "citations": _citations(reply.citations),
                            "finish_reason": reply.usage.finish_reason, "id": reply.message_id})
    except Exception:  # noqa: BLE001 - mid-stream: say so in the stream, never a traceback
        if finished:
            raise
        log.exception("embed answer stream failed")
        finished = True
        yield _sse("error", {"message": TROUBLE, "code": "server_error", "status": 500})
    finally:
        if not finished:
            reply.cancel.set()
        pieces.close()  # not running in a thread any more: closing saves what was written


# --- pages ------------------------------------------------------------------------------


def _csp(frame_ancestors: str) -> str:
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        f"base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
    )


def _safe_json(data: dict) -> str:
    """JSON to place inside a <script type="application/json"> block."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def off_page() -> HTMLResponse:
    """One answer for unknown, unpublished and embed-off GPTs: framed by no one."""
    text = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>Chat not available</title><link rel=\"stylesheet\" href=\"/embed-assets/embed-chat.css\"></head>"
        "<body><main class=\"off\"><h1>This chat is not available</h1>"
        "<p>Embedding is off for this GPT, or it is not published.</p></main></body></html>"
    )
    return HTMLResponse(text, status_code=404, headers={**BASE_HEADERS, "Content-Security-Policy": _csp("'none'")})


def chat_page(page, request: Request) -> HTMLResponse:
    config = page.public()
    config["own_origin"] = own_origin(request)
    site = request.query_params.get("site") or ""
    config["site"] = origin_or_none(site) or ""
    config["widget"] = request.query_params.get("widget") == "1"
    title = html.escape(page.theme.get("title") or page.name)
    text = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{title}</title><link rel=\"stylesheet\" href=\"/embed-assets/embed-chat.css\">"
        f"<script id=\"pgpt-config\" type=\"application/json\">{_safe_json(config)}</script>"
        "<script src=\"/embed-assets/embed-chat.js\" defer></script></head>"
        "<body><div id=\"app\" class=\"app\" aria-live=\"polite\"></div>"
        "<noscript>This chat needs JavaScript.</noscript></body></html>"
    )
    return HTMLResponse(text, headers={**BASE_HEADERS, "Content-Security-Policy": _csp(page.frame_ancestors)})


def _popup_page(title: str, sentence: str, payload: dict | None = None, status: int = 200) -> HTMLResponse:
    script = ""
    if payload is not None:
        script = (f"<script id=\"pgpt-signin\" type=\"application/json\">{_safe_json(payload)}</script>"
                  "<script src=\"/embed-assets/embed-signin.js\" defer></script>")
    text = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><link rel=\"stylesheet\" href=\"/embed-assets/embed-chat.css\">"
        f"{script}</head><body><main class=\"off\"><h1>{html.escape(title)}</h1>"
        f"<p id=\"pgpt-signin-text\">{html.escape(sentence)}</p></main></body></html>"
    )
    return HTMLResponse(text, status_code=status, headers={
        **BASE_HEADERS, "Content-Security-Policy": _csp("'none'"), "X-Frame-Options": "DENY",
    })


# --- the popup's way back through /auth/login (used by web/oidc.py) -------------------------------


def return_ref(cookies) -> str | None:
    """``emb_<hex>`` from the popup's signed return cookie (what ``begin_login`` stores in
    ``login_states.return_link_id``), or None."""
    try:
        gpt_id = unsign(cookies.get(RETURN_COOKIE), RETURN_PURPOSE, RETURN_MAX_AGE)
    except Exception:  # noqa: BLE001 - an unreadable cookie (or secret) is simply no return target
        return None
    if not gpt_id or not gpt_id.startswith("gpt_"):
        return None
    hex_part = gpt_id[4:]
    if not (8 <= len(hex_part) <= _GPT_ID_HEX) or any(c not in "0123456789abcdef" for c in hex_part):
        return None
    return RETURN_PREFIX + hex_part


def return_path(ref: str | None) -> str | None:
    """Where the sign-in callback sends the popup back to, for a ``return_ref`` value; else None."""
    if not isinstance(ref, str) or not ref.startswith(RETURN_PREFIX):
        return None
    return f"/embed/gpt_{ref[len(RETURN_PREFIX):]}/signin"


# --- routes ------------------------------------------------------------------------------


async def embed_js(request: Request) -> Response:
    body = (STATIC / "embed.js").read_bytes()
    return Response(body, media_type="text/javascript; charset=utf-8", headers={
        "Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Resource-Policy": "cross-origin",
    })


async def asset(request: Request) -> Response:
    name = request.path_params.get("name", "")
    if name not in ASSETS:
        return _json_error(404, "Not found.", "not_found")
    return Response((STATIC / name).read_bytes(), media_type=f"{ASSETS[name]}; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})


async def widget_page(request: Request) -> Response:
    try:
        page = await run_in_threadpool(_page, _services(), _gpt_id(request))
    except Exception:  # noqa: BLE001
        log.exception("embed page failed")
        return off_page()
    if page is None:
        return off_page()
    return chat_page(page, request)


async def widget_settings(request: Request) -> Response:
    """``GET /embed/<id>/widget.json``: the bubble's look, for embed.js on an allowed site
    (CORS for that origin only). Not allowed or not available: 404 without CORS headers."""
    page = await run_in_threadpool(_page, _services(), _gpt_id(request))
    origin = request.headers.get("origin") or ""
    if page is None or not _origin_allowed(request, page):
        return _json_error(404, NOT_AVAILABLE, "not_found", headers={"Vary": "Origin"})
    theme = page.theme
    body = {"gpt": page.gpt_id, "name": page.name, "avatar": theme.get("avatar") or page.avatar,
            "title": theme.get("title") or page.name, "colour": theme["colour"], "position": theme["position"],
            "open_on_load": theme["open_on_load"]}
    return JSONResponse(body, headers={**BASE_HEADERS, "Access-Control-Allow-Origin": origin, "Vary": "Origin"})


async def config(request: Request) -> Response:
    page = await run_in_threadpool(_page, _services(), _gpt_id(request))
    if page is None:
        return _json_error(404, NOT_AVAILABLE, "not_found")
    return JSONResponse(page.public(), headers=BASE_HEADERS)


async def _checked(request: Request):
    """The page for a state-changing call whose Origin is ours or an allowed site; else the JSON refusal."""
    svc = _services()
    page = await run_in_threadpool(_page, svc, _gpt_id(request))
    if page is None:
        return svc, None, _json_error(404, NOT_AVAILABLE, "not_found")
    if not _origin_allowed(request, page):
        log.info("embed %s: refused Origin %r", page.gpt_id, (request.headers.get("origin") or "")[:100])
        return svc, None, _json_error(403, "This site is not allowed to use this chat.", "origin_not_allowed")
    return svc, page, None


# Anonymous visitor ids cost nothing to mint, so one address may mint only so many a minute,
# and may send only so many widget messages a minute whatever ids it rotates through (the
# durable per-visitor and per-GPT limits live in personal_gpt.limits). Per process, in memory.
NEW_VISITORS_PER_ADDRESS_MINUTE = 20
MESSAGES_PER_ADDRESS_MINUTE = 30
TOO_MANY = "You're sending messages quickly — please wait a minute and try again."


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _slowed(limiter: WindowLimiter, request: Request) -> JSONResponse | None:
    wait = limiter.take(_address(request))
    if wait is None:
        return None
    return _json_error(429, TOO_MANY, "rate_limited", retry_after=wait)


def make_visitor_id(limiter: WindowLimiter):
    async def visitor_id(request: Request) -> Response:
        _svc, _page_, refused = await _checked(request)
        if refused:
            return refused
        slowed = _slowed(limiter, request)
        if slowed:
            return slowed
        return JSONResponse({"visitor": new_visitor_id()}, headers=BASE_HEADERS)

    return visitor_id


async def conversations(request: Request) -> Response:
    gpt_id = _gpt_id(request)
    if request.method == "GET":
        svc = _services()
        visitor = _visitor(request, gpt_id)
        rows = await run_in_threadpool(svc.embed_visitor_conversations, gpt_id, visitor)
        return JSONResponse({"conversations": [
            {"id": r.id, "title": r.title, "updated_at": r.updated_at.isoformat()} for r in rows
        ]}, headers=BASE_HEADERS)
    svc, page, refused = await _checked(request)
    if refused:
        return refused
    data = await _json_body(request)
    site = _string(data, "site", "the address of the page showing the chat")
    visitor = _visitor(request, gpt_id)
    conv_id = await run_in_threadpool(svc.start_embed_conversation, gpt_id, visitor, site, own_origin(request))
    return JSONResponse({"conversation": conv_id}, status_code=201, headers=BASE_HEADERS)


async def conversation(request: Request) -> Response:
    gpt_id = _gpt_id(request)
    svc = _services()
    visitor = _visitor(request, gpt_id)
    conv_id = request.path_params["conv_id"]
    rows = await run_in_threadpool(svc.embed_visitor_messages, gpt_id, visitor, conv_id)
    rated = await run_in_threadpool(svc.embed_answer_feedback, gpt_id, visitor, conv_id)

    def shaped():
        return [
            {"id": m.id, "role": m.role, "text": m.content,
             "html": _render(m.content) if m.role == "assistant" else None,
             "citations": _citations(m.citations) if m.role == "assistant" else [], "stopped": m.stopped,
             "rating": rated[m.id].rating if m.id in rated else None}
            for m in rows
        ]

    return JSONResponse({"messages": await run_in_threadpool(shaped)}, headers=BASE_HEADERS)


def make_chat(limiter: WindowLimiter):
    async def chat_with_limit(request: Request) -> Response:
        svc, page, refused = await _checked(request)
        if refused:
            return refused
        return _slowed(limiter, request) or await chat(request, svc)

    return chat_with_limit


async def chat(request: Request, svc) -> Response:
    gpt_id = _gpt_id(request)
    data = await _json_body(request)
    conv_id = _string(data, "conversation", "the conversation id")
    message = data.get("message")
    visitor = _visitor(request, gpt_id)
    reply = await run_in_threadpool(svc.send_embed, gpt_id, visitor, conv_id, message, own_origin(request))
    return StreamingResponse(stream_reply(reply), media_type="text/event-stream", headers={
        **BASE_HEADERS, "X-Accel-Buffering": "no",
    })


RATINGS_PER_ADDRESS_MINUTE = 60


def make_feedback(limiter: WindowLimiter):
    async def rate(request: Request) -> Response:
        """``POST /embed/<id>/feedback`` {conversation, message, rating: 1|-1, comment?}: the
        visitor's thumbs on an answer of their own widget conversation (Origin checked)."""
        from personal_gpt.errors import InvalidInput

        svc, _page_, refused = await _checked(request)
        if refused:
            return refused
        slowed = _slowed(limiter, request)
        if slowed:
            return slowed
        gpt_id = _gpt_id(request)
        data = await _json_body(request)
        conv_id = _string(data, "conversation", "the conversation id")
        message_id, rating, comment = data.get("message"), data.get("rating"), data.get("comment", "")
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            raise InvalidInput("The request needs a 'message' (the answer's id).")
        visitor = _visitor(request, gpt_id)
        saved = await run_in_threadpool(svc.rate_embed_answer, gpt_id, visitor, conv_id, message_id, rating, comment)
        return JSONResponse({"message": saved.message_id, "rating": saved.rating, "comment": saved.comment},
                            headers=BASE_HEADERS)

    return rate


async def signin(request: Request) -> Response:
    """The first-party popup: signed in and admitted -> a token posted to our own origin;
    not signed in -> our OIDC flow, back here after the provider."""
    from personal_gpt.errors import PersonalGptError
    from personal_gpt.sharing import Visitor
    from personal_gpt.web.oidc import principal_from_cookies

    gpt_id = _gpt_id(request)
    svc = _services()
    try:
        page = await run_in_threadpool(_page, svc, gpt_id)
        if page is None or page.policy != "signin":
            return _popup_page("Chat not available", "This chat is not available, or it needs no sign-in.", status=404)
        found = await run_in_threadpool(principal_from_cookies, request.cookies, services=svc)
        visitor = Visitor(principal=found[0], signed_in_at=found[1]) if found else Visitor()
        decision = await run_in_threadpool(svc.embed_access, gpt_id, visitor)
    except PersonalGptError as exc:
        return _popup_page("Sign-in", str(exc), status=exc.status if exc.status in (400, 403, 404) else 503)
    except Exception:  # noqa: BLE001 - a page with one sentence, never a traceback
        log.exception("embed sign-in pop-up failed")
        return _popup_page("Sign-in", TROUBLE, status=503)
    if decision.outcome == "sign_in":
        if svc.auth_config is None:
            return _popup_page("Sign-in", "Sign-in is not set up on this server.", status=503)
        target = "/auth/login"
        provider = request.query_params.get("provider")
        if provider and provider in svc.auth_config.providers:
            from urllib.parse import urlencode

            target += "?" + urlencode({"provider": provider})
        response = RedirectResponse(target, status_code=303, headers=BASE_HEADERS)
        response.set_cookie(RETURN_COOKIE, sign(gpt_id, RETURN_PURPOSE), max_age=RETURN_MAX_AGE, path="/",
                            httponly=True, samesite="lax", secure=svc.auth_config.secure_cookies)
        return response
    if not decision.allowed:
        response = _popup_page("Sign-in", decision.message, status=403)
        response.delete_cookie(RETURN_COOKIE, path="/")
        return response
    token = mint_token(gpt_id, found[0], found[1])
    response = _popup_page(
        "Signed in", "You are signed in. This window closes by itself; if it does not, close it and go back to the chat.",
        payload={"type": "pgpt-embed-token", "gpt": gpt_id, "token": token, "origin": own_origin(request)},
    )
    response.delete_cookie(RETURN_COOKIE, path="/")
    return response


def embed_routes(new_visitors: WindowLimiter | None = None, messages: WindowLimiter | None = None,
                 ratings: WindowLimiter | None = None) -> list[Route]:
    """The widget's routes, to add to the app's route list (the limiters per address are
    made here unless given, so each app — and each test — has its own)."""
    new_visitors = new_visitors or WindowLimiter(NEW_VISITORS_PER_ADDRESS_MINUTE, 60)
    messages = messages or WindowLimiter(MESSAGES_PER_ADDRESS_MINUTE, 60)
    ratings = ratings or WindowLimiter(RATINGS_PER_ADDRESS_MINUTE, 60)
    return [
        Route("/embed.js", embed_js, methods=["GET"]),
        Route("/embed-assets/{name}", asset, methods=["GET"]),
        Route("/embed/{gpt_id}", widget_page, methods=["GET"]),
        Route("/embed/{gpt_id}/widget.json", _guarded(widget_settings), methods=["GET"]),
        Route("/embed/{gpt_id}/config", _guarded(config), methods=["GET"]),
        Route("/embed/{gpt_id}/visitor", _guarded(make_visitor_id(new_visitors)), methods=["POST"]),
        Route("/embed/{gpt_id}/conversations", _guarded(conversations), methods=["GET", "POST"]),
        Route("/embed/{gpt_id}/conversations/{conv_id}", _guarded(conversation), methods=["GET"]),
        Route("/embed/{gpt_id}/chat", _guarded(make_chat(messages)), methods=["POST"]),
        Route("/embed/{gpt_id}/feedback", _guarded(make_feedback(ratings)), methods=["POST"]),
        Route("/embed/{gpt_id}/signin", signin, methods=["GET"]),
    ]
