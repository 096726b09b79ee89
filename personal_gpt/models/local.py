"""Local Hugging Face causal-LM chat models, served from one copy of the weights.

Owns: loading any HF causal-LM folder, the ChatModel API (encode, count_tokens,
stream, optionally with a LoRA adapter), and one scheduler thread per model that
admits requests into the batch steps of ``batching`` (continuous batching over a
shared KV cache; rows with different adapters share the batch, see ``adapters``).
Must not: touch the store, download anything, or import torch/transformers at import time.
"""

from __future__ import annotations

import inspect
import json
import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator

from personal_gpt.errors import InvalidInput, ModelError
from personal_gpt.gpts import GenerationSettings
from personal_gpt.models.adapters import AdapterSet
from personal_gpt.models.base import AdapterRef, Message, Usage
from personal_gpt.models.batching import (
    _Batch,
    _decode_step,
    _Done,
    _merge,
    _prefill,
    _PrefixCache,
    _Request,
    _Runtime,
)

log = logging.getLogger(__name__)

EXTRA_EOS_TOKENS = ("<|im_end|>",)
DEFAULT_CONTEXT = 2048
CPU_PREFILL_TOKENS = 1024  # prompt tokens prefilled per scheduler turn on CPU (at least one request)
GPU_PREFILL_TOKENS = 16384


# --- the model -------------------------------------------------------------------

class LocalModel:
    """A Hugging Face causal LM in a local folder, implementing ``ChatModel``.

    One instance serves every session: ``stream`` hands requests to a single
    scheduler thread that prefills new ones and decodes all running ones
    together, step by step, from one KV cache (continuous batching). A request
    may name a LoRA adapter (``stream(..., adapter=AdapterRef)``): each adapter
    is loaded into these weights once, and rows with different adapters (or
    none) run in the same batch.

    ``base_id`` is the stable name of this base model that an adapter's
    ``base_model_name_or_path`` must carry (the registry sets the model
    reference, e.g. "bundled:smollm2-135m-instruct"); the folder's path is
    accepted too (what peft writes by default).
    """

    def __init__(
        self, model_dir: Path, name: str, threads: int = 0, max_batch: int = 8, prefix_cache_mb: int = 256,
        base_id: str | None = None, max_adapters: int = 16,
    ):
        self.model_dir = Path(model_dir)
        self.name = name
        self.base_id = base_id or f"hf:{self.model_dir.resolve()}"
        self.threads = int(threads)
        self.max_batch = max(1, int(max_batch))
        self._prefix = _PrefixCache(max(0, int(prefix_cache_mb)) * 2**20)
        self.context_window = _read_context_window(self.model_dir)
        self._rt: _Runtime | None = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._step_lock = threading.RLock()  # held by the scheduler for each step; adapters change layers under it
        self._adapters = AdapterSet(self._step_lock, on_removed=self._prefix.drop_adapter, max_loaded=max_adapters)

    def __repr__(self) -> str:
        return f"LocalModel({str(self.model_dir)!r}, name={self.name!r})"

    # -- loading --------------------------------------------------------------

    def load(self) -> None:
        """Load the weights now (otherwise the first call does it)."""
        self._runtime()

    def _runtime(self) -> _Runtime:
        rt = self._rt
        if rt is not None:
            return rt
        with self._load_lock:
            if self._closed:
                raise ModelError("This model has been shut down; reload the page to start it again.")
            if self._rt is None:
                self._rt = self._load()
            return self._rt

    def _load(self) -> _Runtime:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the CLI's output or the server log
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        where = self.model_dir
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            log.exception("tokenizer load failed for %s", where)
            raise ModelError(f"The model in {where} could not be loaded: its tokenizer files are missing or damaged.") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(f"The model in {where} is not a chat model: it has no chat template.")
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where,
                trust_remote_code=False,
                local_files_only=True,
                dtype=torch.bfloat16 if cuda else torch.float32,
            )
            model.to(device).eval()
        except ValueError as exc:
            log.exception("model load failed for %s", where)
            raise ModelError(f"The model in {where} is not a text-generation model this app can run.") from exc
        except Exception as exc:
            log.exception("model load failed for %s", where)
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ModelError(f"There is not enough memory to load the model in {where}.") from exc
            raise ModelError(f"The model in {where} could not be loaded: its weight files are missing or damaged.") from exc

        eos: set[int] = set()
        for source in (model.config, getattr(model, "generation_config", None), tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value if v is not None)
        vocab = tokenizer.get_vocab()
        eos.update(vocab[t] for t in EXTRA_EOS_TOKENS if t in vocab)
        if not eos:
            raise ModelError(f"The model in {where} does not say how it ends an answer (no end-of-text token).")
        pad = tokenizer.pad_token_id
        params = inspect.signature(model.forward).parameters
        return _Runtime(
            model=model,
            tokenizer=tokenizer,
            device=device,
            eos_ids=frozenset(eos),
            pad_id=int(pad if pad is not None else min(eos)),
            cache_arg="cache" if "cache" in params else "past_key_values",
            keep_logits="logits_to_keep" in params,
            adapters=self._adapters,
        )

    # -- adapters -------------------------------------------------------------------

    def base_names(self) -> set[str]:
        """The names an adapter for this model may give as its base model."""
        return {self.base_id, str(self.model_dir), str(self.model_dir.resolve())}

    def load_adapter(self, adapter: AdapterRef) -> None:
        """Load the base model and this adapter now, once (thread-safe); later
        calls return at once. Raises ``ModelError`` with a sentence when the
        adapter is unsafe, damaged, or made for another model."""
        self._adapter_slot(adapter)

    def _adapter_slot(self, adapter: AdapterRef):
        rt = self._runtime()
        return self._adapters.get(adapter, rt.model, rt.device, self.base_names(), self.name)

    def forget_adapter(self, name: str) -> bool:
        """Take the adapter ``name`` out of memory (when its version is deleted):
        now if no chat uses it, else as soon as those chats finish. Its cached
        prefixes go too. False if it was not loaded."""
        return self._adapters.forget(name)

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters in memory now."""
        return self._adapters.names()

    # -- ChatModel ---------------------------------------------------------------

    def encode(self, messages: list[Message]) -> list[int]:
        """Token ids of the prompt for these messages (chat template, generation prompt)."""
        rt = self._runtime()
        return chat_token_ids(rt.tokenizer, self._encode_lock, messages, self.name)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def stream(
        self,
        messages: list[Message],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        usage: Usage | None = None,
        adapter: AdapterRef | None = None,
    ) -> Iterator[str]:
        """Yield the answer in pieces, with ``adapter`` if given (loaded on first
        use). Errors about the input, the model or the adapter are raised here,
        before the first piece; see ``ChatModel.stream``."""
        started = time.perf_counter()
        slot = self._adapter_slot(adapter) if adapter is not None else None
        ids = self.encode(messages)
        needed = len(ids) + settings.max_new_tokens
        if needed > self.context_window:
            raise InvalidInput(
                f"This conversation is too long for the model ({needed:,} tokens of {self.context_window:,}, "
                "counting room for the answer); start a new chat or shorten the instructions."
            )
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(ids)
        request = _Request(prompt=ids, settings=settings, cancel=cancel or threading.Event())
        return self._answer(request, usage, started, slot)

    def _answer(self, request: _Request, usage: Usage, started: float, slot=None) -> Iterator[str]:
        tokenizer = self._runtime().tokenizer
        if slot is not None:  # counted from here: an unread generator holds nothing
            if not self._adapters.acquire(slot):
                raise ModelError("This fine-tuned version was removed while the answer was starting; try again.")
            request.adapter = slot
        try:
            self._submit(request)
        except BaseException:
            request.finish("error")
            raise
        yield from relay(request, tokenizer, usage, started, lambda: self._next_item(request))

    def _next_item(self, request: _Request):
        while True:
            try:
                return request.out.get(timeout=1.0)
            except queue.Empty:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return _Done("error", "The model stopped unexpectedly; try again.")

    def close(self) -> None:
        """Stop the scheduler thread and free the weights; pending chats fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._cond:
            for request in self._pending:
                request.finish("error", "The model was shut down before answering; try again.")
            self._pending.clear()
        with self._load_lock:
            self._rt = None
            self._adapters.reset()

    # -- the scheduler --------------------------------------------------------------

    def _submit(self, request: _Request) -> None:
        with self._cond:
            if self._closed:
                raise ModelError("This model has been shut down; reload the page to start it again.")
            self._pending.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"local-model:{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        import torch

        rt = self._runtime()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        budget = GPU_PREFILL_TOKENS if rt.device.type == "cuda" else CPU_PREFILL_TOKENS
        batch: _Batch | None = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._pending and batch is None:
                        self._cond.wait()
                    if self._closed:
                        break
                    admit: list[_Request] = []
                    room = self.max_batch - (len(batch.rows) if batch else 0)
                    tokens = 0
                    while self._pending and len(admit) < room:  # FIFO, within a prefill budget
                        head = self._pending[0]
                        size = len(head.prompt) - self._prefix.match_length(head.prompt, head.adapter_key)
                        if admit and tokens + size > budget:
                            break
                        admit.append(self._pending.popleft())
                        tokens += size
                try:
                    with self._step_lock:  # adapters are loaded and removed between steps
                        admit = [r for r in admit if not self._finish_if_stopped(r)]
                        if admit:
                            batch = _merge(batch, _prefill(rt, self._prefix, admit))
                        if batch is not None:
                            batch = _decode_step(rt, batch)
                except Exception as exc:  # keep serving: fail the affected chats only
                    log.exception("local model step failed")
                    message = _runtime_error_sentence(exc)
                    for request in admit + (batch.rows if batch else []):
                        request.finish("error", message)
                    batch = None
                if self._adapters.removal_due:  # forgotten adapters whose last chat just ended
                    self._adapters.sweep()
        for request in batch.rows if batch else []:
            request.finish("error", "The model was shut down before finishing; try again.")

    @staticmethod
    def _finish_if_stopped(request: _Request) -> bool:
        if request.stopped:
            request.finish("cancelled")
            return True
        return False

    def clear_prefix_cache(self) -> None:
        """Forget the cached prompt prefixes (the next prompts are computed in full)."""
        self._prefix.clear()


def relay(request: _Request, tokenizer, usage: Usage, started: float, next_item) -> Iterator[str]:
    """Turn the token ids a scheduler puts on ``request.out`` into text pieces (whole
    UTF-8 characters only), filling ``usage``; the request is marked abandoned if the
    caller stops reading. ``next_item()`` blocks for the next id or ``_Done``."""
    ids: list[int] = []
    emitted = ""
    done: _Done | None = None
    try:
        while done is None:
            items = [next_item()]
            while True:  # take everything already there, decode once
                try:
                    items.append(request.out.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if isinstance(item, _Done):
                    done = item
                else:
                    ids.append(item)
            if done is not None and done.reason == "error":
                raise ModelError(done.error or "The model stopped unexpectedly; try again.")
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if done is None:
                text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the rest
            if len(text) > len(emitted):
                if not text.startswith(emitted):
                    log.debug("decoded text changed under already streamed text")
                piece = text[len(emitted):]
                emitted = text
                if usage.first_token_s is None:
                    usage.first_token_s = time.perf_counter() - started
                yield piece
        usage.finish_reason = done.reason
    finally:
        if done is None:  # the caller stopped reading: free the row
            request.abandoned = True
            usage.finish_reason = usage.finish_reason or "cancelled"
        usage.completion_tokens = len(ids)
        usage.total_s = time.perf_counter() - started


# --- helpers ------------------------------------------------------------------------

def _read_context_window(model_dir: Path) -> int:
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelError(f"The model folder {model_dir} does not exist.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"The folder {model_dir} is not a Hugging Face model: it has no config.json.") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"The model in {model_dir} could not be loaded: its config.json is damaged.") from exc
    if not isinstance(config, dict):
        raise ModelError(f"The model in {model_dir} could not be loaded: its config.json is damaged.")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for source in (config, text_config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT


def chat_token_ids(tokenizer, lock: threading.Lock, messages: list[Message], name: str) -> list[int]:
    """Prompt token ids for ``messages`` with the model's chat template and the generation
    prompt (shared by the torch and llama.cpp paths, so both see the same ids); a template
    that refuses the conversation becomes InvalidInput."""
    clean = _check_messages(messages)
    try:
        with lock:
            text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # jinja errors: e.g. a template that refuses system messages
        log.warning("chat template failed for %s: %s", name, exc)
        raise InvalidInput(f"The model {name} cannot read this conversation: {exc}") from exc


def _check_messages(messages: list[Message]) -> list[dict[str, str]]:
    if not messages:
        raise InvalidInput("The conversation is empty: write a message first.")
    clean = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InvalidInput("A message in this conversation is not valid (unknown role or no text).")
        clean.append({"role": role, "content": content})
    return clean


def _runtime_error_sentence(exc: Exception) -> str:
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "The model ran out of memory while answering; try a shorter conversation or fewer chats at once."
    return "The model failed while answering; try again."
