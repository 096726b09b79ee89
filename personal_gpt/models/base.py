"""The ChatModel protocol every model backend implements.

A model takes chat messages (``{"role": ..., "content": ...}`` dicts, roles
system/user/assistant) and streams text pieces. It never touches the store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from personal_gpt.gpts import GenerationSettings

Message = dict[str, str]


@dataclass
class Usage:
    """Filled in by ``stream`` as it runs; read it after the stream ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None  # seconds from call to first piece
    total_s: float | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter to serve on a local base model (see ``models.adapters``)."""

    name: str  # unique and stable for these weights, e.g. the adapter version's id
    path: Path  # a peft folder: adapter_config.json + adapter_model.safetensors
    label: str = ""  # what people see, e.g. "fine-tune 3"; the name when empty


@runtime_checkable
class ChatModel(Protocol):
    name: str  # a human-readable name, e.g. "SmolLM2-135M-Instruct (bundled)"
    context_window: int  # tokens the model can see at once

    def count_tokens(self, messages: list[Message]) -> int:
        """Tokens the prompt for these messages takes (chat template included)."""
        ...

    def stream(
        self,
        messages: list[Message],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        """Yield the answer in pieces. Stops early when ``cancel`` is set
        (finish_reason "cancelled"). Raises ``ModelError`` with a sentence a
        creator understands when the model cannot be loaded or reached."""
        ...
