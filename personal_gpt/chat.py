"""One chat path for the builder preview, the chat page and the CLI (later the
share page, embed and API): instructions + history + message -> model stream.

It assembles the prompt, keeps it inside the model's context window by
dropping the oldest turns, and streams pieces while recording timings. It
never touches the store: the services layer saves what this returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from personal_gpt.errors import InvalidInput
from personal_gpt.gpts import GptSpec
from personal_gpt.models.base import ChatModel, Message, Usage

MAX_MESSAGE_CHARS = 8_000
DEFAULT_INSTRUCTIONS = "You are a helpful assistant."


def build_messages(spec: GptSpec, history: list[Message], message: str, context: str = "") -> list[Message]:
    """System instructions first (then any knowledge context, which never comes
    before them), then the conversation so far, then the new message."""
    system = spec.instructions.strip() or DEFAULT_INSTRUCTIONS
    if context:
        system = f"{system}\n\n{context}"
    out: list[Message] = [{"role": "system", "content": system}]
    for turn in history:
        if turn.get("role") in ("user", "assistant") and turn.get("content"):
            out.append({"role": turn["role"], "content": turn["content"]})
    out.append({"role": "user", "content": message})
    return out


def fit_to_window(model: ChatModel, messages: list[Message], max_new_tokens: int) -> list[Message]:
    """Drop the oldest user/assistant turns until the prompt and the answer fit.

    The system message and the newest user message always stay; if even they
    do not fit, the person gets a sentence saying what to shorten.
    """
    budget = model.context_window - max_new_tokens
    msgs = list(messages)
    while model.count_tokens(msgs) > budget:
        if len(msgs) <= 2:
            used = model.count_tokens(msgs)
            raise InvalidInput(
                f"The instructions and your message take {used:,} tokens, but this model reads at most "
                f"{model.context_window:,} including its {max_new_tokens:,}-token answer: shorten the "
                "instructions or the message, or lower the answer length."
            )
        # drop the oldest turn (a user message and the answer after it)
        del msgs[1]
        if len(msgs) > 2 and msgs[1]["role"] == "assistant":
            del msgs[1]
    return msgs


def check_message(message: str) -> str:
    message = (message or "").strip()
    if not message:
        raise InvalidInput("Type a message first.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise InvalidInput(f"That message is too long ({len(message):,} characters); keep it under {MAX_MESSAGE_CHARS:,}.")
    return message


@dataclass
class Reply:
    """The answer as it streams; ``text`` and ``usage`` are complete once iteration ends."""

    model_name: str
    pieces: Iterator[str] | None = None
    citations: list[dict] = field(default_factory=list)
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    # how a knowledge-only answer was judged against its evidence (action, reason, scores); None = not judged
    grounding: dict | None = None
    # what retrieval found for the question on a GPT with knowledge: passages kept, best evidence match (0..1)
    retrieval: dict | None = None
    # the saved answer's message id, once the stream has ended (feedback buttons need it)
    message_id: int | None = None

    @property
    def meta(self) -> dict:
        u = self.usage
        return {
            "model": self.model_name,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "first_token_s": None if u.first_token_s is None else round(u.first_token_s, 4),
            "total_s": None if u.total_s is None else round(u.total_s, 4),
            "finish_reason": u.finish_reason,
            **({"citations": self.citations} if self.citations else {}),
            **({"grounding": self.grounding} if self.grounding else {}),
            **({"retrieval": self.retrieval} if self.retrieval is not None else {}),
        }


def respond(
    model: ChatModel, spec: GptSpec, history: list[Message], message: str, reply: Reply, context: str = ""
) -> Iterator[str]:
    """Stream the answer to ``message``; fills ``reply.text`` and ``reply.usage``."""
    message = check_message(message)
    messages = fit_to_window(model, build_messages(spec, history, message, context), spec.generation.max_new_tokens)
    usage = reply.usage
    try:
        for piece in model.stream(messages, spec.generation, cancel=reply.cancel, usage=usage):
            if usage.first_token_s is None:
                usage.first_token_s = time.perf_counter() - reply.started
            reply.text += piece
            yield piece
    except GeneratorExit:
        reply.cancel.set()
        usage.finish_reason = "cancelled"
        raise
    finally:
        if usage.total_s is None:
            usage.total_s = time.perf_counter() - reply.started
        if reply.cancel.is_set():
            usage.finish_reason = "cancelled"


def fixed_answer(text: str, reply: Reply) -> Iterator[str]:
    """An answer that needs no model (e.g. "I don't know" when knowledge-only finds nothing)."""
    reply.text = text
    reply.usage.finish_reason = "stop"
    reply.usage.first_token_s = time.perf_counter() - reply.started
    reply.usage.total_s = reply.usage.first_token_s
    yield text


def checked(pieces: Iterator[str], reply: Reply, judge) -> Iterator[str]:
    """Generate the whole answer first, then stream what ``judge(text) -> text``
    makes of it (the answer itself, a quotation of the evidence, or a refusal).

    Knowledge-only GPTs answer through this: an answer is shown only once it has
    been checked against the files. ``reply.text`` ends as what was shown."""
    for _ in pieces:
        pass
    final = judge(reply.text)
    reply.text = final
    if final:
        yield final


def then(pieces: Iterator[str], reply: Reply, finish) -> Iterator[str]:
    """Pass ``pieces`` on; once the answer is complete (not stopped), call
    ``finish(reply.text)`` before the answer is saved."""
    yield from pieces
    if not reply.cancel.is_set():
        finish(reply.text)
