"""Continuous batching for local chat models: requests, the running batch, one
prefill or decode step over a shared KV cache of growing layers, sampling, and
the cache of recent prompt prefixes (kept apart per LoRA adapter; rows of a batch
may each use another adapter, see ``adapters``).
Must not: own the scheduler thread or its queue (LocalModel does), touch the store,
or import torch/transformers at import time.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from personal_gpt.gpts import GenerationSettings

MIN_PREFIX_TOKENS = 64  # shorter shared prefixes are cheaper to recompute than to copy


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
    adapter: Any = None  # the adapters._Slot this request answers with (counted while it runs); None = base

    @property
    def stopped(self) -> bool:
        return self.abandoned or self.cancel.is_set()

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None

    def finish(self, reason: str, error: str | None = None) -> None:
        if not self.done:
            self.done = True
            if self.adapter is not None:
                self.adapter.release()
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
    adapters: Any = None  # adapters.AdapterSet; once it holds adapters, every forward goes through its select()


# --- one scheduler step: prefill new requests, decode the running batch ------------

def _prefill(rt: _Runtime, prefix: _PrefixCache, requests: list[_Request]) -> _Batch | None:
    """Compute the prompts of newly admitted requests: those that share a
    long prefix with a recent prompt start from its cached keys/values;
    the others are prefilled together, left-padded."""
    fresh: list[_Request] = []
    batch: _Batch | None = None
    for request in requests:
        hit = prefix.lookup(request.prompt, request.adapter_key)
        if hit is None:
            fresh.append(request)
        else:
            batch = _merge(batch, _prefill_group(rt, prefix, [request], hit))
    if fresh:
        batch = _merge(_prefill_group(rt, prefix, fresh, None), batch)
    return batch


def _prefill_group(rt: _Runtime, prefix: _PrefixCache, requests: list[_Request], hit) -> _Batch | None:
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
    logits = _forward(rt, ids, mask, positions, cache, requests)
    _remember_prompts(prefix, requests, cache)
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
    return _advance(rt, batch, logits)


def _remember_prompts(prefix: _PrefixCache, requests: list[_Request], cache) -> None:
    if not prefix.enabled or not _is_plain_kv(cache):
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
        prefix.store(r.prompt, kv, r.adapter_key)


def _decode_step(rt: _Runtime, batch: _Batch) -> _Batch | None:
    import torch

    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
    logits = _forward(rt, batch.last[:, None], batch.mask, batch.pos[:, None], batch.cache, batch.rows)
    batch.pos = batch.pos + 1
    return _advance(rt, batch, logits)


def _forward(rt: _Runtime, ids, mask, positions, cache, rows: list[_Request]):
    kwargs = {rt.cache_arg: cache, "use_cache": True}
    if rt.keep_logits:
        kwargs["logits_to_keep"] = 1
    adapters = rt.adapters
    if adapters is None or not adapters.injected:  # no adapter loaded: the plain model
        out = rt.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    else:  # each row with its own adapter; no adapter row at all: the plain layers
        adapters.select([r.adapter_key for r in rows], rt.device)
        try:
            out = rt.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        finally:
            adapters.done()
    return out.logits[:, -1, :].float()


def _advance(rt: _Runtime, batch: _Batch, logits) -> _Batch | None:
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


_Key = tuple  # (adapter key or None, prompt token ids)


class _PrefixCache:
    """Keys/values of recent prompts (batch of one each), least recently used
    dropped first, so a new prompt that shares a long prefix with one of them
    (the same GPT instructions, the earlier turns of a conversation) only
    computes its new part. Entries are kept per adapter: keys/values computed
    under one adapter (or none) are never reused under another. Cached tensors
    are shared read-only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_Key, list] = OrderedDict()
        self._sizes: dict[_Key, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _best(self, prompt: list[int], adapter: str | None) -> tuple[_Key | None, int]:
        wanted = tuple(prompt)
        best_key, best = None, 0
        for key in self._entries:
            if key[0] != adapter:
                continue
            n = _common_prefix(key[1], wanted)
            if n > best:
                best_key, best = key, n
        best = min(best, len(prompt) - 1)  # at least one token must be computed for the next logits
        return (best_key, best) if best >= MIN_PREFIX_TOKENS else (None, 0)

    def match_length(self, prompt: list[int], adapter: str | None = None) -> int:
        with self._lock:
            return self._best(prompt, adapter)[1]

    def lookup(self, prompt: list[int], adapter: str | None = None):
        """(prefix length, per-layer (keys, values) views) or None."""
        with self._lock:
            key, n = self._best(prompt, adapter)
            if key is None:
                return None
            self._entries.move_to_end(key)
            return n, [(k[:, :, :n], v[:, :, :n]) for k, v in self._entries[key]]

    def store(self, prompt: list[int], kv: list, adapter: str | None = None) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        tokens = tuple(prompt)
        key = (adapter, tokens)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            for old in [o for o in self._entries
                        if o[0] == adapter and len(o[1]) < len(tokens) and tokens[: len(o[1])] == o[1]]:
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

    def drop_adapter(self, adapter: str) -> None:
        """Forget the prefixes computed under this adapter."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == adapter]:
                self._drop(key)


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
