"""A stand-in ChatModel for page and service tests.

Why a stand-in: page and service tests check our flow (what is saved, what is
shown, what errors say), not the language model; the real bundled model runs in
tests/unit/test_models_local.py, tests/unit/test_chat_real.py and the browser test.
It echoes the prompt so tests can assert what the model was given.
"""

from __future__ import annotations

import threading
import time

from personal_gpt.models.base import Usage


class EchoModel:
    name = "echo (test stand-in)"

    def __init__(self, context_window: int = 8192, delay: float = 0.0):
        self.context_window = context_window
        self.delay = delay
        self.calls: list[list[dict]] = []

    def count_tokens(self, messages) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    def stream(self, messages, settings, cancel: threading.Event | None = None, usage: Usage | None = None):
        self.calls.append(messages)
        usage = usage or Usage()
        usage.prompt_tokens = self.count_tokens(messages)
        words = f"You said: {messages[-1]['content']}".split(" ")
        for i, word in enumerate(words):
            if cancel is not None and cancel.is_set():
                usage.finish_reason = "cancelled"
                return
            if self.delay:
                time.sleep(self.delay)
            usage.completion_tokens += 1
            yield word if i == 0 else " " + word
        usage.finish_reason = "stop"


class FakeRegistry:
    """Hands out one EchoModel for every reference."""

    def __init__(self, model: EchoModel | None = None):
        self.model = model or EchoModel()
        self.refs: list[str] = []

    def get(self, ref, provider_lookup=None):
        self.refs.append(ref)
        if ref.startswith("openai:") and provider_lookup is not None:
            provider_lookup(ref.split(":", 1)[1])  # raises NotFound for someone else's provider
        return self.model

    def close(self):
        pass
