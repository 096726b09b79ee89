"""The OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/v1/models``, ``/v1/openapi.json``):
OpenAI's request/response and error shapes, bounded body reading, and the blocking model
stream run in a worker thread. Keys, GPTs and limits are decided by ``Services`` only;
callers get OpenAI's JSON error shape, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personal_gpt.errors import (
    InvalidInput,
    ModelError,
    PersonalGptError,
    RateLimited,
    TooLarge,
    Unauthorized,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
MAX_CONCURRENT_CALLS = 64  # chat calls in flight in this process; more get 429 with a short Retry-After
PATHS = ("/v1/chat/completions", "/v1/models", "/v1/openapi.json")
_COMMON = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error",
}
_CODES = {401: "invalid_api_key", 403: "model_not_allowed", 404: "model_not_found", 429: "rate_limit_exceeded"}
TROUBLE = "Something went wrong on our side; please try again in a minute."

_calls = 0
_calls_lock = threading.Lock()


# --- errors -----------------------------------------------------------------------


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {
        "message": message, "type": _TYPES.get(status, "server_error"), "param": param,
        "code": code or _CODES.get(status),
    }}
    return JSONResponse(body, status_code=status, headers={**_COMMON, **(headers or {})})


def _error_body(exc: PersonalGptError) -> dict:
    status = exc.status
    return {"error": {
        "message": str(exc), "type": _TYPES.get(status, "server_error"), "param": getattr(exc, "param", None),
        "code": _CODES.get(status, exc.code),
    }}


def _from_exc(exc: PersonalGptError) -> JSONResponse:
    headers = dict(_COMMON)
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="personal-gpts"'
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)


def _bad(message: str, param: str | None = None) -> InvalidInput:
    exc = InvalidInput(message)
    exc.param = param
    return exc


# --- request ----------------------------------------------------------------------


def _services():
    from personal_gpt.web import glue

    return glue.services()


def bearer_key(request: Request) -> str:
    """The key from ``Authorization: Bearer <key>``; Unauthorized when absent or not a bearer token.
    Its shape is checked by ``Services.api_caller`` before any look-up."""
    from personal_gpt.services_api import BAD_KEY, NO_KEY

    header = request.headers.get("authorization", "")
    if not header.strip():
        raise Unauthorized(NO_KEY)
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized(BAD_KEY)
    return value.strip()


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """The request's JSON object, read with a bound: a declared or actual body over
    ``limit`` bytes is TooLarge without reading the rest; not JSON -> InvalidInput."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise _bad("Send the request body as JSON, with the header 'Content-Type: application/json'.")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise TooLarge(f"The request body is too large: keep it under {limit // 1000:,} kB.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"The request body is too large: keep it under {limit // 1000:,} kB.")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object, e.g. {\"model\": \"gpt_…\", \"messages\": [...]}.")
    return data


def _content(value: Any, index: int) -> Any:
    """OpenAI content: a string, or a list of parts of which only text parts are understood."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content: only text parts are supported (no images, audio or files).",
                           "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    return value  # strings pass; anything else is refused by the service with a sentence


def _messages(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [{**m, "content": _content(m.get("content"), i)} if isinstance(m, dict) else m
            for i, m in enumerate(value)]


def _chat_options(body: dict) -> dict:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise _bad("Only one answer per call is supported: leave out 'n' or set it to 1.", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "model": body.get("model"), "messages": _messages(body.get("messages")), "user": body.get("user"),
        "max_tokens": max_tokens, "stream": bool(stream), "include_usage": bool(options.get("include_usage")),
    }


# --- responses --------------------------------------------------------------------


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(reply) -> dict:
    u = reply.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _completion_id(conv_id: str) -> str:
    return "chatcmpl-" + conv_id.removeprefix("conv_")


def _worker(svc, key: str, opts: dict, put: Callable, stop: threading.Event, holder: dict) -> None:
    """In a thread of its own: the call (up to the first piece), then the rest of the stream.
    A stop (the client went away) cancels the model and closes the stream, which saves
    the partial answer as cancelled."""
    try:
        turn = svc.api_chat(key, opts["model"], opts["messages"], user=opts["user"], max_tokens=opts["max_tokens"])
    except PersonalGptError as exc:
        put(("error", exc))
        return
    except Exception:  # noqa: BLE001 - never a traceback to the caller
        log.exception("API chat call failed")
        put(("error", ModelError(TROUBLE)))
        return
    holder["reply"] = turn.reply
    if stop.is_set():
        turn.reply.cancel.set()
    put(("turn", turn))
    pieces = turn.reply.pieces
    try:
        for piece in pieces:
            put(("piece", piece))
            if stop.is_set():
                break
    except PersonalGptError as exc:
        put(("error", exc))
    except Exception:  # noqa: BLE001
        log.exception("API chat stream failed")
        put(("error", ModelError(TROUBLE)))
    finally:
        pieces.close()
        put(("end", None))


class ChatCall:
    """The ASGI response of one chat call. It starts the worker thread, listens for the
    client going away the whole time (stopping the model when it does), and answers with
    an error, one ``chat.completion`` object, or a stream of ``chat.completion.chunk`` events."""

    def __init__(self, svc, key: str, opts: dict):
        self.svc, self.key, self.opts = svc, key, opts

    async def __call__(self, scope, receive, send) -> None:
        global _calls
        with _calls_lock:
            busy = _calls >= MAX_CONCURRENT_CALLS
            if not busy:
                _calls += 1
        if busy:
            exc = RateLimited("The server is busy answering other calls; try again in a few seconds.", 5)
            await _from_exc(exc)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop, holder = threading.Event(), {}

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the server is shutting down
                stop.set()

        def gone() -> None:
            stop.set()
            reply = holder.get("reply")
            if reply is not None:
                reply.cancel.set()
            queue.put_nowait(("gone", None))

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone()
                    return

        threading.Thread(target=_worker, args=(self.svc, self.key, self.opts, put, stop, holder),
                         name="api-chat", daemon=True).start()
        listener = asyncio.create_task(listen())
        finished = False
        try:
            kind, value = await queue.get()
            if kind == "gone":
                return
            if kind == "error":
                finished = True
                await _from_exc(value)(scope, receive, send)
                return
            if self.opts["stream"]:
                finished = await self._stream(value, queue, send)
            else:
                finished = await self._complete(value, queue, scope, receive, send)
        except OSError:  # the client went away while we were writing
            pass
        finally:
            listener.cancel()
            if not finished:
                gone()
            with _calls_lock:
                _calls -= 1

    async def _complete(self, turn, queue, scope, receive, send) -> bool:
        while True:
            kind, value = await queue.get()
            if kind == "gone":
                return False
            if kind == "error":
                await _from_exc(value)(scope, receive, send)
                return True
            if kind == "end":
                break
        reply = turn.reply
        body = {
            "id": _completion_id(turn.conversation_id), "object": "chat.completion", "created": turn.created,
            "model": turn.gpt_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": _finish(reply.usage.finish_reason), "logprobs": None}],
            "usage": _usage(reply),
            "citations": _visible(reply.citations),
        }
        await JSONResponse(body, headers=_COMMON)(scope, receive, send)
        return True

    async def _stream(self, turn, queue, send) -> bool:
        base = {"id": _completion_id(turn.conversation_id), "object": "chat.completion.chunk",
                "created": turn.created, "model": turn.gpt_id}

        def event(data) -> bytes:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            return f"data: {text}\n\n".encode("utf-8")

        def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
            return event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"), (b"x-content-type-options", b"nosniff"),
        ]})
        await body(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await queue.get()
            if kind == "gone":
                return False
            if kind == "piece":
                await body(chunk({"content": value}))
            elif kind == "error":  # after the stream began: an error event, as OpenAI sends
                await body(event(_error_body(value)))
                await body(event("[DONE]"), more=False)
                return True
            elif kind == "end":
                break
        reply = turn.reply
        await body(chunk({}, _finish(reply.usage.finish_reason), citations=_visible(reply.citations)))
        if self.opts["include_usage"]:
            await body(event({**base, "choices": [], "usage": _usage(reply)}))
        await body(event("[DONE]"), more=False)
        return True


# --- routes -----------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    try:
        key = bearer_key(request)
        svc = _services()
        await run_in_threadpool(svc.api_caller, key)  # a bad key is refused before the body is read
        opts = _chat_options(await read_json(request))
        return ChatCall(svc, key, opts)
    except PersonalGptError as exc:
        return _from_exc(exc)
    except ClientDisconnect:
        return Response(status_code=400)
    except Exception:  # noqa: BLE001 - never a traceback
        log.exception("API: chat call could not start")
        return error_response(500, TROUBLE, code="server_error")


async def list_models(request: Request) -> Response:
    try:
        key = bearer_key(request)
        models = await run_in_threadpool(_services().api_models, key)
    except PersonalGptError as exc:
        return _from_exc(exc)
    except Exception:  # noqa: BLE001
        log.exception("API: listing models failed")
        return error_response(500, TROUBLE, code="server_error")
    data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by, "name": m.name,
             "description": m.description} for m in models]
    return JSONResponse({"object": "list", "data": data}, headers=_COMMON)


async def openapi_schema(request: Request) -> Response:
    return JSONResponse(OPENAPI, headers={"Cache-Control": "no-cache"})


async def not_here(request: Request) -> Response:
    path = request.url.path.rstrip("/")
    if path in PATHS:
        return error_response(405, f"{request.method} is not supported on {path}.", code="method_not_allowed")
    return error_response(404, f"There is no API route {path}. This server offers " + ", ".join(PATHS) + ".",
                          code="unknown_url")


def _visible(citations: list[dict]) -> list[dict]:
    """What a caller sees of the sources (only when the creator shows them): number, file,
    page and evidence sentence; never whole passages, ids or scores."""
    from personal_gpt.knowledge.retrieval import visitor_citations

    return visitor_citations(citations)


def api_routes() -> list[Route]:
    """The API routes, to add to the app's route list."""
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/openapi.json", openapi_schema, methods=["GET"]),
        Route("/v1/{rest:path}", not_here, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]


def _error_schema() -> dict:
    return {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}


_ERRORS = {
    str(status): {"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for status, what in (
        (400, "Malformed JSON, wrong content type, bad or missing messages, unknown role"),
        (401, "Missing, malformed, unknown or revoked API key"),
        (403, "The key is not for this model (GPT)"),
        (404, "The key's GPT is not published"),
        (413, "Body over 1 MB, or a message or conversation over the GPT's limits"),
        (429, "Rate limit reached (see the Retry-After header)"),
        (502, "The model failed"),
    )
}

OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "Personal GPTs API", "version": "1",
             "description": "OpenAI-compatible chat with one GPT per API key. See docs/api.md."},
    "servers": [{"url": "/v1"}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "pgk_…"}},
        "schemas": {
            "Error": _error_schema(),
            "Message": {"type": "object", "required": ["role", "content"], "properties": {
                "role": {"enum": ["user", "assistant", "system", "developer"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
                    "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}},
            "ChatRequest": {"type": "object", "required": ["model", "messages"], "properties": {
                "model": {"type": "string", "description": "The GPT's id (gpt_…)"},
                "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}, "minItems": 1},
                "stream": {"type": "boolean", "default": False},
                "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                "max_tokens": {"type": "integer", "minimum": 1,
                               "description": "May lower, never raise, the GPT's answer length"},
                "user": {"type": "string", "maxLength": 64,
                         "description": "Your end user's id: limits per visitor apply to it"},
            }},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/chat/completions": {"post": {
            "summary": "Chat with the GPT (OpenAI chat completions)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
            "responses": {
                "200": {"description": "A chat.completion object, or (stream: true) server-sent "
                                       "chat.completion.chunk events ending with data: [DONE]. Both carry "
                                       "a top-level 'citations' list (the final chunk when streaming).",
                        "content": {"application/json": {}, "text/event-stream": {}}},
                **_ERRORS,
            },
        }},
        "/models": {"get": {
            "summary": "The GPTs this key may call",
            "responses": {"200": {"description": "{object: list, data: [{id, object: model, created, owned_by, "
                                                 "name, description}]}"},
                          "401": _ERRORS["401"]},
        }},
    },
}
