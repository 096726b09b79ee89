"""A ChatModel backed by any OpenAI-compatible HTTP server (vLLM, Ollama, TGI, OpenAI).

Owns: the streaming chat-completions call (server-sent events), cancel, and
turning every network or server failure into a ModelError sentence.
Must not: log or repeat the API key anywhere, touch the store, or import torch.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from personal_gpt.errors import ModelError
from personal_gpt.gpts import GenerationSettings
from personal_gpt.models.base import Message, Usage

log = logging.getLogger(__name__)

MAX_SERVER_MESSAGE = 300


def public_url(url: str) -> str:
    """The URL without any user:password part, safe to show and log."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class OpenAICompatModel:
    """Chat through ``POST {base_url}/chat/completions`` with ``stream=true``.

    ``base_url`` is the API root, e.g. ``http://localhost:11434/v1``.
    ``count_tokens`` is an approximation (characters / 4, rounded up): the
    server's tokenizer is not available here, so context checks stay rough.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        name: str | None = None,
        context_window: int = 8192,
        timeout: float = 60,
    ):
        base_url = (base_url or "").strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ModelError("The model server address must start with http:// or https://.")
        if not (model or "").strip():
            raise ModelError("Say which model the server should use (the model name is empty).")
        self.base_url = base_url
        self.model = model.strip()
        self.name = name or f"{self.model} ({urlsplit(base_url).hostname})"
        self.context_window = int(context_window)
        self.timeout = float(timeout)
        self._api_key = api_key or ""
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            follow_redirects=False,
        )

    def __repr__(self) -> str:  # never the key
        return f"OpenAICompatModel({public_url(self.base_url)!r}, model={self.model!r})"

    # -- ChatModel ------------------------------------------------------------------

    def count_tokens(self, messages: list[Message]) -> int:
        """Approximate: len(text) / 4 rounded up, plus 4 per message for the roles."""
        text = "".join(m.get("content") or "" for m in messages)
        return math.ceil(len(text) / 4) + 4 * len(messages)

    def stream(
        self,
        messages: list[Message],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        usage = usage if usage is not None else Usage()
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "seed": settings.seed,
        }
        if not settings.greedy:
            payload["top_p"] = settings.top_p
        return self._stream(payload, cancel or threading.Event(), usage, messages)

    def _stream(self, payload: dict, cancel: threading.Event, usage: Usage, messages) -> Iterator[str]:
        started = time.perf_counter()
        pieces = 0
        usage.prompt_tokens = self.count_tokens(messages)
        url = f"{self.base_url}/chat/completions"
        try:
            with self._client.stream("POST", url, json=payload, headers=self._headers()) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._http_error(response, "/chat/completions")
                for line in response.iter_lines():
                    if cancel.is_set():
                        usage.finish_reason = "cancelled"
                        return  # leaving the block closes the response: the server sees the disconnect
                    data = _sse_data(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = self._parse_chunk(data)
                    if chunk.get("usage"):
                        usage.prompt_tokens = chunk["usage"].get("prompt_tokens") or usage.prompt_tokens
                        usage.completion_tokens = chunk["usage"].get("completion_tokens") or usage.completion_tokens
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or choice.get("message") or {}
                        piece = delta.get("content")
                        if choice.get("finish_reason"):
                            usage.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                        if piece:
                            pieces += 1
                            if usage.first_token_s is None:
                                usage.first_token_s = time.perf_counter() - started
                            try:
                                yield piece
                            except GeneratorExit:  # the caller stopped reading
                                usage.finish_reason = "cancelled"
                                raise
                            if cancel.is_set():
                                usage.finish_reason = "cancelled"
                                return
            usage.finish_reason = usage.finish_reason or "stop"
        except httpx.HTTPError as exc:
            raise self._network_error(exc) from None
        finally:
            usage.completion_tokens = usage.completion_tokens or pieces
            usage.total_s = time.perf_counter() - started

    def test_connection(self) -> list[str]:
        """The model ids the server offers (``GET {base_url}/models``); raises
        ModelError when it cannot be reached, refuses the key, or does not
        offer the configured model."""
        try:
            response = self._client.get(f"{self.base_url}/models", headers=self._headers())
        except httpx.HTTPError as exc:
            raise self._network_error(exc) from None
        if response.status_code >= 400:
            raise self._http_error(response, "/models")
        try:
            body = response.json()
            ids = [str(item["id"]) for item in body.get("data", [])]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ModelError(
                f"The server at {public_url(self.base_url)} did not answer like an OpenAI-compatible API "
                "(its model list could not be read); check the address ends in /v1."
            ) from None
        if not any(i == self.model or i == f"{self.model}:latest" for i in ids):
            offered = ", ".join(ids[:10]) + (", …" if len(ids) > 10 else "") if ids else "none"
            raise ModelError(
                f"The model server does not offer the model '{self.model}'. It offers: {offered}."
            )
        return ids

    def close(self) -> None:
        self._client.close()

    # -- helpers ------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _scrub(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def _parse_chunk(self, data: str) -> dict:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ModelError("The model server sent an answer this app cannot read.") from None
        if not isinstance(chunk, dict):
            raise ModelError("The model server sent an answer this app cannot read.")
        if chunk.get("error"):
            message = _error_message(chunk) or "no details"
            raise ModelError(f"The model server stopped with an error: {self._scrub(message)}")
        return chunk

    def _network_error(self, exc: httpx.HTTPError) -> ModelError:
        where = public_url(self.base_url)
        if isinstance(exc, httpx.TimeoutException):
            reason = "it did not answer in time"
        elif isinstance(exc, httpx.ConnectError):
            text = str(exc).lower()
            if "name or service" in text or "nodename" in text or "getaddrinfo" in text or "resolution" in text:
                reason = "the server name could not be found"
            elif "refused" in text:
                reason = "the connection was refused (is the server running?)"
            else:
                reason = "the connection failed"
        elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            reason = "the connection broke while it was answering"
        else:
            reason = "the request failed"
        log.warning("model server %s: %s: %s", where, type(exc).__name__, self._scrub(str(exc)))
        return ModelError(f"Could not reach the model server at {where}: {reason}.")

    def _http_error(self, response: httpx.Response, path: str) -> ModelError:
        status = response.status_code
        message = self._scrub(_error_message_from(response))
        log.warning("model server %s%s answered %s: %s", public_url(self.base_url), path, status, message)
        if status in (401, 403):
            return ModelError("The model server refused the API key; check the key in the model settings.")
        if status == 404:
            if "model" in message.lower():
                return ModelError(f"The model server does not know the model '{self.model}'.")
            return ModelError(
                f"The model server at {public_url(self.base_url)} has no {path} endpoint; "
                "check the address (it usually ends in /v1)."
            )
        if status == 429:
            return ModelError("The model server is busy (too many requests); try again in a moment.")
        detail = f": {message}" if message else ""
        return ModelError(f"The model server answered with an error (HTTP {status}){detail}")


def _sse_data(line: str) -> str | None:
    """The payload of a server-sent-events ``data:`` line, else None."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message") or error.get("code")
        if isinstance(error, str):
            return error[:MAX_SERVER_MESSAGE]
    return ""


def _error_message_from(response: httpx.Response) -> str:
    try:
        return _error_message(response.json())
    except ValueError:
        return ""
