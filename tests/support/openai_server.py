"""A small, real OpenAI-compatible HTTP server for tests (Starlette + uvicorn).

Owns: GET /v1/models and POST /v1/chat/completions (streaming and not) with a
Bearer key check, answering deterministically by echoing the last user message
word by word. Runs in a background thread on a free 127.0.0.1 port. Not a model.

    with running_openai_server(api_key="sk-test") as server:
        OpenAICompatModel(server.base_url, "sk-test", "echo")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODELS = ("echo", "slow-echo")  # slow-echo waits between words (for cancel tests)
SLOW_DELAY_S = 0.05


def echo_words(messages: list[dict]) -> list[str]:
    """The pieces the server answers with: the last user message, word by word."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    words = last.split()
    return [w if i == 0 else " " + w for i, w in enumerate(words)] or ["(empty)"]


@dataclass
class ServerState:
    api_key: str
    models: tuple[str, ...]
    requests: list[dict] = field(default_factory=list)  # the JSON bodies received
    disconnects: int = 0  # streams the client closed before the end


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)


def build_app(state: ServerState) -> Starlette:
    def authorised(request: Request) -> bool:
        return request.headers.get("authorization", "") == f"Bearer {state.api_key}"

    async def models(request: Request):
        if not authorised(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in state.models]})

    async def chat(request: Request):
        if not authorised(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not JSON.")
        state.requests.append(body)
        model = body.get("model")
        if model not in state.models:
            return _error(404, f"The model `{model}` does not exist.", "model_not_found")
        words = echo_words(body.get("messages") or [])
        limit = int(body.get("max_tokens") or 1_000_000)
        finish = "length" if len(words) > limit else "stop"
        words = words[:limit]
        created, ident = int(time.time()), f"chatcmpl-{len(state.requests)}"
        if not body.get("stream"):
            return JSONResponse({
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": "".join(words)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)},
            })
        delay = SLOW_DELAY_S if model == "slow-echo" else 0.0

        def chunk(delta: dict, finish_reason=None) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            completed = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                for word in words:
                    if delay:
                        await asyncio.sleep(delay)
                    yield chunk({"content": word})
                yield chunk({}, finish)
                yield "data: [DONE]\n\n"
                completed = True
            finally:
                if not completed:
                    state.disconnects += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])


@dataclass
class RunningOpenAIServer:
    url: str  # http://127.0.0.1:PORT
    state: ServerState
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_openai_server(api_key: str = "sk-test-key", models: tuple[str, ...] = MODELS) -> RunningOpenAIServer:
    state = ServerState(api_key=api_key, models=tuple(models))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="openai-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test OpenAI server did not start")
        time.sleep(0.01)
    return RunningOpenAIServer(url=f"http://127.0.0.1:{port}", state=state, _server=server, _thread=thread)


@contextlib.contextmanager
def running_openai_server(api_key: str = "sk-test-key", models: tuple[str, ...] = MODELS) -> Iterator[RunningOpenAIServer]:
    server = start_openai_server(api_key, models)
    try:
        yield server
    finally:
        server.stop()
