"""LoRA training of a local causal-LM folder on chat examples (loss on each
example's final assistant answer only), with complete checkpoints that survive a
kill, evaluation before and after, and the adapter published atomically as a
standard peft folder. Must not: touch the store or the network, load pickles, or
import torch/transformers/peft at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import pydantic
from pydantic import Field

from personal_gpt.errors import InvalidInput, ModelError, PersonalGptError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RESULT_FILE = "result.json"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
KEEP_CHECKPOINTS = 2
FORMAT = 1
MAX_GRAD_NORM = 1.0
# rows x longest row per forward pass: longer batches are split and their gradients summed
# (same result, bounded activation memory: about 3 MB per token on CPU)
MICRO_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}
MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate forward pass
SORT_WINDOW_BATCHES = 16  # examples are sorted by length within windows of this many batches
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


class Cancelled(PersonalGptError):
    """The training was stopped on request; nothing further was written."""

    code = "cancelled"

    def __init__(self, message: str = "The training was stopped before it finished."):
        super().__init__(message)


# --- settings ------------------------------------------------------------------------

class TrainSettings(pydantic.BaseModel, extra="forbid"):
    epochs: int = Field(3, ge=1, le=20)
    learning_rate: float = Field(2e-4, ge=1e-6, le=1e-2)
    rank: int = Field(16, ge=1, le=256)
    alpha: int | None = Field(None, ge=1, le=4096)  # None: twice the rank
    dropout: float = Field(0.05, ge=0.0, le=0.5)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    max_length: int = Field(512, ge=32, le=4096)
    eval_share: float = Field(0.1, ge=0.0, le=0.5)
    batch_size: int = Field(8, ge=1, le=64)
    checkpoint_every: int = Field(20, ge=1, le=10000)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @pydantic.field_validator("target_modules")
    @classmethod
    def _names(cls, value):
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) and _NAME.match(v) for v in value):
                raise ValueError("bad layer names")
        return value

    @pydantic.field_validator("epochs", "learning_rate", "rank", "alpha", "dropout", "max_length", "eval_share",
                              "batch_size", "checkpoint_every", "seed", mode="before")
    @classmethod
    def _no_booleans(cls, value):
        if isinstance(value, bool):  # pydantic would read True as 1; a yes/no is never a number here
            raise ValueError("a yes/no value is not a number")
        return value

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank


SENTENCES = {
    "epochs": "Epochs must be a whole number between 1 and 20.",
    "learning_rate": "Learning rate must be between 0.000001 and 0.01.",
    "rank": "Rank must be a whole number between 1 and 256.",
    "alpha": "Alpha must be a whole number between 1 and 4096, or left empty for twice the rank.",
    "dropout": "Dropout must be between 0 and 0.5.",
    "target_modules": 'Target modules must be "all-linear" or a list of layer names.',
    "max_length": "Maximum length must be a whole number of tokens between 32 and 4096.",
    "eval_share": "Evaluation share must be between 0 and 0.5.",
    "batch_size": "Batch size must be a whole number between 1 and 64.",
    "checkpoint_every": "Checkpoint interval must be a whole number of steps between 1 and 10000.",
    "seed": "Seed must be a whole number between 0 and 4294967295.",
}


def settings_from(data: dict) -> TrainSettings:
    """TrainSettings from plain data (a form, a job payload); raises InvalidInput
    with one sentence per bad value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput("Training settings must be a set of named values.")
    sentences: list[str] = []
    unknown = [str(k) for k in data if k not in TrainSettings.model_fields]
    sentences += [f'"{k}" is not a training setting.' for k in unknown]
    for key, value in data.items():
        if key in SENTENCES and isinstance(value, bool):
            sentences.append(SENTENCES[key])
    known = {k: v for k, v in data.items() if k in TrainSettings.model_fields and not isinstance(v, bool)}
    try:
        settings = TrainSettings(**known)
    except pydantic.ValidationError as exc:
        bad = []
        for error in exc.errors():
            loc = error.get("loc") or ()
            name = str(loc[0]) if loc else ""
            if name in SENTENCES and name not in bad:
                bad.append(name)
        sentences += [SENTENCES[name] for name in bad if SENTENCES[name] not in sentences]
        if not bad and not sentences:
            sentences.append("The training settings are not valid.")
        settings = None
    if sentences:
        raise InvalidInput(" ".join(sentences))
    return settings


# --- results -------------------------------------------------------------------------

@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict = field(default_factory=dict)


@dataclass
class _Encoded:
    ids: list[int]
    n_prompt: int  # tokens[n_prompt:] are the answer: the positions the loss is computed on


# --- examples and tokens ---------------------------------------------------------------

def _check_examples(examples, what: str) -> None:
    if not isinstance(examples, list):
        raise InvalidInput(f"The {what} examples must be a list of conversations.")
    for number, messages in enumerate(examples, 1):
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise InvalidInput(f"{what.capitalize()} example {number} is not a conversation of system, user and "
                               "assistant messages with text.")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise InvalidInput(f"{what.capitalize()} example {number} does not end with an answer to learn.")


def _chat_text(tokenizer, messages: list[dict], prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=False, add_generation_prompt=prompt,
    )


def encode_example(tokenizer, messages: list[dict], max_length: int) -> _Encoded | None:
    """Token ids of one conversation through the chat template and where its final
    answer starts; None when truncation to ``max_length`` leaves no answer token."""
    prompt_text = _chat_text(tokenizer, messages[:-1], prompt=True)
    full_text = _chat_text(tokenizer, messages, prompt=False)
    if full_text.startswith(prompt_text):
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    else:  # a template that renders the prompt differently on its own: split at the common prefix
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        alone = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(alone), len(full_ids)) and alone[n] == full_ids[n]:
            n += 1
        prompt_ids, answer_ids = full_ids[:n], full_ids[n:]
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and eos in answer_ids:  # what follows the end-of-turn token is never generated
        answer_ids = answer_ids[: len(answer_ids) - answer_ids[::-1].index(eos)]
    ids = (list(prompt_ids) + list(answer_ids))[:max_length]
    if len(ids) <= len(prompt_ids) or not prompt_ids:
        return None
    return _Encoded(ids=ids, n_prompt=len(prompt_ids))


def plan_batches(lengths: list[int], batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) for every optimizer step of the run: each epoch a
    fresh shuffle, sorted by length within windows (little padding), batch order
    shuffled again so lengths do not drift through the epoch."""
    rng = random.Random(seed)
    steps: list[tuple[int, list[int]]] = []
    window = batch_size * SORT_WINDOW_BATCHES
    for epoch in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: (lengths[i], i))
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        steps += [(epoch, b) for b in batches]
    return steps


def _learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then linear decay towards zero."""
    warmup = max(1, round(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def fingerprint(base_dir: Path, base_name: str, train: list, eval: list, settings: TrainSettings) -> str:
    """What a checkpoint must share with this run to be resumed by it."""
    h = hashlib.sha256()
    shaping = settings.model_dump(mode="json", exclude={"checkpoint_every"})  # how often to save changes nothing
    h.update(json.dumps({"format": FORMAT, "base": base_name, "settings": shaping}, sort_keys=True).encode())
    for name in ("config.json", "model.safetensors"):
        path = Path(base_dir) / name
        if path.is_file():
            h.update(f"{name}:{path.stat().st_size}".encode())
    h.update(json.dumps([train, eval], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


# --- devices, threads, memory ------------------------------------------------------------

def _cpu_has_fast_bf16(torch) -> bool:
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a private probe that fails means "no"
            continue
    return False


def _choose_device(torch, precision: str):
    """(device, autocast dtype or None, weights dtype)."""
    if torch.cuda.is_available():
        bf16 = precision != "fp32" and torch.cuda.is_bf16_supported()
        return torch.device("cuda"), (torch.bfloat16 if bf16 else None), (torch.bfloat16 if bf16 else torch.float32)
    bf16 = precision == "bf16" or (precision == "auto" and _cpu_has_fast_bf16(torch))
    return torch.device("cpu"), (torch.bfloat16 if bf16 else None), torch.float32


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _configured_threads() -> int:
    """PERSONAL_GPT_TORCH_THREADS, the operator's pin (0: not set)."""
    from personal_gpt.config import Settings

    try:
        return max(0, int(Settings.from_env().torch_threads))
    except Exception:  # noqa: BLE001 - a broken environment only loses the pin
        return 0


def _peak_memory_mb(torch, device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


class _ThreadGovernor:
    """Fewer threads while the machine is busy. On a shared CPU a step on every
    core waits at each parallel section for a core another process holds and can
    get many times slower; half the threads then wins. It times steps on both
    counts (seconds per token, a moving average), runs on the faster one,
    re-measures the other every PROBE_EVERY steps, and switches at once when the
    current count gets SWITCH_FACTOR times slower than the other's last figure."""

    PROBE_EVERY = 20
    PROBE_STEPS = 2
    SWITCH_FACTOR = 1.5

    def __init__(self, torch, full: int, adaptive: bool):
        self.torch = torch
        self.full = full
        self.options = [full, max(1, full // 2)] if adaptive and full >= 2 else [full]
        self.cost: dict[int, float] = {}
        self.current = full
        self.here = 0  # steps measured since the last switch
        self.last_probe = 0
        self.probing = False
        torch.set_num_threads(full)

    def _switch(self, n: int) -> None:
        if n != self.current:
            self.current, self.here = n, 0
            self.torch.set_num_threads(n)

    def after_step(self, done: int, seconds: float, tokens: int) -> None:
        """``done``: steps run in this process so far (the first pays for warm-up)."""
        if len(self.options) < 2 or tokens <= 0 or done < 2:
            return
        rate = seconds / tokens
        old = self.cost.get(self.current)
        self.cost[self.current] = rate if old is None else 0.5 * old + 0.5 * rate
        self.here += 1
        other = self.options[1] if self.current == self.options[0] else self.options[0]
        if other not in self.cost or self.probing:
            if self.here >= self.PROBE_STEPS:
                if other not in self.cost:
                    self.probing = True
                    self.last_probe = done
                    self._switch(other)
                else:
                    self.probing = False
                    self._switch(min(self.cost, key=self.cost.get))
        elif done - self.last_probe >= self.PROBE_EVERY:
            self.probing = True
            self.last_probe = done
            self._switch(other)
        elif self.cost[self.current] > self.SWITCH_FACTOR * self.cost[other]:
            self._switch(other)


_DROPOUT_CLASS = None


def _fast_dropout_class():
    """A Bernoulli dropout that draws 16 random bits per element (p rounded to
    1/65536) from 64-bit draws: on CPU the random numbers of ``nn.Dropout`` are a
    fifth of a LoRA step, this costs about half of that."""
    global _DROPOUT_CLASS
    if _DROPOUT_CLASS is not None:
        return _DROPOUT_CLASS
    import torch

    class FastDropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.threshold = min(65535, max(0, round(p * 65536)))
            self.p = self.threshold / 65536

        def forward(self, x):
            if not self.training or self.threshold == 0:
                return x
            n = x.numel()
            bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
            keep = bits.view(torch.int16)[:n].view(x.shape) >= (self.threshold - 32768)
            return x * keep * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    _DROPOUT_CLASS = FastDropout
    return FastDropout


def _use_fast_dropout(torch, model) -> int:
    cls = _fast_dropout_class()
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, drop in list(drops.items()):
                if type(drop) is torch.nn.Dropout and drop.p > 0:
                    drops[name] = cls(drop.p)
                    swapped += 1
    return swapped


def _store_frozen_linears_as(torch, model, dtype) -> int:
    """Keep the frozen weights under LoRA in ``dtype``: autocast multiplies in that
    dtype anyway, so the results are the same, without a fresh copy of every weight
    each step (and without the fp32 originals: about half a GB less for 135M)."""
    converted = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad and base.weight.dtype != dtype:
            base.weight.data = base.weight.data.to(dtype)
            if base.bias is not None and not base.bias.requires_grad:
                base.bias.data = base.bias.data.to(dtype)
            converted += 1
    return converted


# --- the forward pass ----------------------------------------------------------------------

class _Runner:
    """Loss over answer tokens for a batch of encoded examples. Logits are computed
    only where a label is (not over the prompt or padding), and a token prefix the
    whole batch shares (the system prompt, usually) runs once instead of once per row."""

    def __init__(self, torch, model, device, autocast_dtype, pad_id: int):
        import inspect

        self.torch = torch
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.pad_id = pad_id
        self.budget = MICRO_BATCH_TOKENS.get(device.type, 1024)
        base = model.get_base_model()
        config = base.config
        self.body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        self.head = base.get_output_embeddings()
        plain_head = (getattr(config, "final_logit_softcapping", None) is None
                      and getattr(config, "logit_scale", None) is None
                      and getattr(config, "logits_scaling", None) is None)
        self.fast = self.body is not None and self.head is not None and plain_head
        self.cache_arg = None
        if self.fast:
            params = inspect.signature(self.body.forward).parameters
            self.cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.config = config

    def _autocast(self):
        if self.autocast_dtype is None:
            import contextlib

            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss(self, batch: list[_Encoded], share_prefix: bool = True):
        """(summed loss over answer tokens, number of answer tokens)."""
        torch = self.torch
        with self._autocast():
            if not self.fast:
                return self._loss_full(batch)
            prefix = self._shared_prefix(batch) if share_prefix and self.cache_arg else 0
            longest = max(len(e.ids) for e in batch)
            hidden = self._prefixed_hidden(batch, prefix, longest) if prefix else None
            if hidden is None:
                prefix = 0
                rows = [e.ids + [self.pad_id] * (longest - len(e.ids)) for e in batch]
                ids = torch.tensor(rows, dtype=torch.long, device=self.device)
                # right padding needs no mask: causal attention never lets a real token see a later pad
                hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            # answer token t is predicted from the hidden state at t - 1
            rows_idx, cols_idx, targets = [], [], []
            for r, e in enumerate(batch):
                span = range(e.n_prompt, len(e.ids))
                rows_idx += [r] * len(span)
                cols_idx += [t - 1 - prefix for t in span]
                targets += e.ids[e.n_prompt:]
            rows_t = torch.tensor(rows_idx, device=self.device)
            cols_t = torch.tensor(cols_idx, device=self.device)
            logits = self.head(hidden[rows_t, cols_t])
        target = torch.tensor(targets, dtype=torch.long, device=self.device)
        loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        return loss, len(targets)

    def _prefixed_hidden(self, batch: list[_Encoded], prefix: int, longest: int):
        """Hidden states of positions ``prefix``.. of every row, the shared prefix
        run once (batch 1) and its keys/values broadcast to the batch; gradients
        flow back through the broadcast. None for a cache this does not know."""
        torch = self.torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        head_ids = torch.tensor([batch[0].ids[:prefix]], dtype=torch.long, device=self.device)
        self.body(input_ids=head_ids, use_cache=True, **{self.cache_arg: cache})
        layers = getattr(cache, "layers", None)
        if not layers or not all(torch.is_tensor(getattr(layer, "keys", None))
                                 and torch.is_tensor(getattr(layer, "values", None))
                                 and layer.keys.shape[-2] == prefix for layer in layers):
            log.info("this model's cache cannot be shared across a batch; running whole rows")
            self.cache_arg = None
            return None
        for layer in layers:
            layer.keys = layer.keys.expand(len(batch), -1, -1, -1)
            layer.values = layer.values.expand(len(batch), -1, -1, -1)
        rows = [e.ids[prefix:] + [self.pad_id] * (longest - len(e.ids)) for e in batch]
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        positions = torch.arange(prefix, longest, device=self.device).unsqueeze(0)
        return self.body(input_ids=ids, position_ids=positions, use_cache=True,
                         **{self.cache_arg: cache}).last_hidden_state

    def _shared_prefix(self, batch: list[_Encoded]) -> int:
        if len(batch) < 2:
            return 0
        limit = min(e.n_prompt for e in batch) - 1  # the first answer's predictor stays in the per-row part
        first = batch[0].ids
        n = 0
        while n < limit and all(e.ids[n] == first[n] for e in batch[1:]):
            n += 1
        return n if n >= MIN_SHARED_PREFIX else 0

    def _loss_full(self, batch: list[_Encoded]):
        torch = self.torch
        longest = max(len(e.ids) for e in batch)
        ids = torch.tensor([e.ids + [self.pad_id] * (longest - len(e.ids)) for e in batch], device=self.device)
        mask = torch.tensor([[1] * len(e.ids) + [0] * (longest - len(e.ids)) for e in batch], device=self.device)
        labels = torch.full_like(ids, -100)
        for r, e in enumerate(batch):
            labels[r, e.n_prompt:len(e.ids)] = ids[r, e.n_prompt:len(e.ids)]
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        shifted = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=-100, reduction="sum")
        return loss, int((shifted != -100).sum())


def micro_batches(batch: list[_Encoded], budget: int) -> list[list[_Encoded]]:
    """``batch`` split into runs of rows whose padded size (rows x longest) fits ``budget``."""
    chunks: list[list[_Encoded]] = []
    current: list[_Encoded] = []
    longest = 0
    for e in sorted(batch, key=lambda e: len(e.ids)):
        grown = max(longest, len(e.ids))
        if current and (len(current) + 1) * grown > budget:
            chunks.append(current)
            current, grown = [], len(e.ids)
        current.append(e)
        longest = grown
    if current:
        chunks.append(current)
    return chunks


def _eval_loss(runner: _Runner, examples: list[_Encoded], batch_size: int, should_stop, adapter: bool) -> float | None:
    """Mean loss per answer token over ``examples`` (None when there are none)."""
    if not examples:
        return None
    torch = runner.torch
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    total, count = 0.0, 0
    runner.model.eval()
    import contextlib

    off = contextlib.nullcontext() if adapter else runner.model.disable_adapter()
    with torch.inference_mode(), off:
        for start in range(0, len(order), batch_size):
            if should_stop():
                raise Cancelled()
            for chunk in micro_batches([examples[i] for i in order[start:start + batch_size]], runner.budget):
                loss, n = runner.loss(chunk)
                total += float(loss)
                count += n
    return total / max(count, 1)


# --- checkpoints ------------------------------------------------------------------------

def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{6,}", p.name)),
                  key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _read_checkpoint(path: Path, fp: str) -> dict | None:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fp or state.get("format") != FORMAT:
        return None
    if not (path / WEIGHTS_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        return None
    return state


def _write_checkpoint(torch, root: Path, step: int, model, optimizer, state: dict, fp: str) -> Path:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        lora = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(lora, str(tmp / WEIGHTS_FILE))
        opt = optimizer.state_dict()
        tensors: dict[str, Any] = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        for index, slots in opt["state"].items():
            for name, value in slots.items():
                tensors[f"opt.{index}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)) \
                    .detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / TENSORS_FILE))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        meta = {**state, "format": FORMAT, "fingerprint": fp, "step": step, "optimizer_groups": groups}
        (tmp / STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")
        for name in (WEIGHTS_FILE, TENSORS_FILE, STATE_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        target = _step_dir(root, step)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # keep the newest KEEP_CHECKPOINTS of this run; other runs' checkpoints can never resume here
    ours = [p for p in _list_checkpoints(root) if _read_checkpoint(p, fp) is not None]
    for old in ours[KEEP_CHECKPOINTS:] + [p for p in _list_checkpoints(root) if p not in ours]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_checkpoint(torch, path: Path, model, optimizer, device) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    set_peft_model_state_dict(model, load_file(str(path / WEIGHTS_FILE), device=str(device)))
    tensors = load_file(str(path / TENSORS_FILE))
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["optimizer_groups"]]
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --- publishing --------------------------------------------------------------------------

def adapter_complete(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def _publish_adapter(model, work_dir: Path, base_name: str) -> Path:
    target = work_dir / ADAPTER
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=work_dir))
    old = None
    try:
        # embedding layers are never trained here; saying so spares peft a look-up of the base's config
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        readme = tmp / "README.md"  # peft's generated model card: nothing a creator needs
        if readme.is_file():
            readme.unlink()
        config_path = tmp / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("base_model_name_or_path") != base_name:
            config["base_model_name_or_path"] = base_name
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        if not adapter_complete(tmp):
            raise ModelError("The trained adapter could not be saved completely.")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():
            old = work_dir / f".old-adapter-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _finished(work_dir: Path, fp: str) -> TrainResult | None:
    try:
        saved = json.loads((work_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("fingerprint") == fp and adapter_complete(work_dir / ADAPTER):
        return TrainResult(adapter_dir=work_dir / ADAPTER, metrics=dict(saved.get("metrics") or {}))
    return None


def _sweep(work_dir: Path) -> None:
    """Leftovers of a run that was killed while writing."""
    for parent in (work_dir, work_dir / CHECKPOINTS):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith((".tmp-", ".old-adapter-")):
                    shutil.rmtree(p, ignore_errors=True)


# --- training -----------------------------------------------------------------------------

def train_lora(
    base_dir: Path,
    train: list[list[dict]],
    eval: list[list[dict]],
    settings: TrainSettings,
    work_dir: Path,
    on_progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    base_name: str | None = None,
    threads: int = 0,
    precision: str = "auto",
) -> TrainResult:
    """Train a LoRA adapter of the model in ``base_dir`` on ``train``; measure the
    answer-token loss on ``eval`` before and after; publish ``work_dir/adapter``.

    Resumes from the newest complete checkpoint in ``work_dir`` made by the same
    settings, data and base; returns at once when ``work_dir`` already holds this
    run's finished adapter. ``should_stop`` is polled every step: when it says
    True, ``Cancelled`` is raised and nothing further is written. ``threads`` 0
    uses every core this process may run on; ``precision`` is "auto", "fp32" or "bf16".
    """
    if not isinstance(settings, TrainSettings):
        settings = settings_from(dict(settings or {}))
    if precision not in ("auto", "fp32", "bf16"):
        raise InvalidInput('Precision must be "auto", "fp32" or "bf16".')
    _check_examples(train, "training")
    _check_examples(eval, "evaluation")
    if not train:
        raise InvalidInput("There are no training examples.")
    base_dir, work_dir = Path(base_dir), Path(work_dir)
    base_name = base_name or base_dir.name
    progress = on_progress or (lambda info: None)
    stop = should_stop or (lambda: False)
    started = time.monotonic()

    fp = fingerprint(base_dir, base_name, train, eval, settings)
    work_dir.mkdir(parents=True, exist_ok=True)
    done = _finished(work_dir, fp)
    if done is not None:
        log.info("training in %s had already finished", work_dir)
        return done
    _sweep(work_dir)

    import torch

    pinned = threads if threads > 0 else _configured_threads()
    previous_threads = torch.get_num_threads()
    governor = _ThreadGovernor(torch, pinned or _cpu_count(), adaptive=not pinned)
    try:
        device, autocast_dtype, weights_dtype = _choose_device(torch, precision)
        tokenizer, model = _load(torch, base_dir, device, weights_dtype)
        train_enc = [e for e in (encode_example(tokenizer, m, settings.max_length) for m in train) if e is not None]
        eval_enc = [e for e in (encode_example(tokenizer, m, settings.max_length) for m in eval) if e is not None]
        if not train_enc:
            raise InvalidInput("No training example has an answer left within the maximum length; raise the maximum "
                               "length or shorten the prompts.")

        from peft import LoraConfig, get_peft_model

        torch.manual_seed(settings.seed)
        lora = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
                          target_modules=settings.target_modules, task_type="CAUSAL_LM", bias="none")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise InvalidInput("The target modules do not name layers of this model; use \"all-linear\".") from exc
        if device.type == "cpu":
            _use_fast_dropout(torch, model)
            if autocast_dtype is not None:
                _store_frozen_linears_as(torch, model, autocast_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        runner = _Runner(torch, model, device, autocast_dtype, pad_id)
        eval_batch = max(settings.batch_size, 16)

        lengths = [len(e.ids) for e in train_enc]
        plan = plan_batches(lengths, settings.batch_size, settings.epochs, settings.seed)
        total = len(plan)
        epoch_steps = [sum(1 for e, _ in plan if e == k) for k in range(settings.epochs)]
        epoch_start = [sum(epoch_steps[:k]) for k in range(settings.epochs)]
        ckpt_root = work_dir / CHECKPOINTS
        state = {"history": [], "train_tokens": 0, "train_seconds": 0.0, "eval_loss_before": None,
                 "order": [b for _, b in plan]}
        resumed_from = 0
        for path in _list_checkpoints(ckpt_root):
            saved = _read_checkpoint(path, fp)
            if saved is None or saved.get("order") != state["order"]:
                continue
            try:
                _load_checkpoint(torch, path, model, optimizer, device)
            except Exception:  # noqa: BLE001 - a damaged checkpoint: try the one before it
                log.warning("checkpoint %s cannot be loaded; trying an older one", path, exc_info=True)
                continue
            state.update({k: saved[k] for k in ("history", "train_tokens", "train_seconds", "eval_loss_before")})
            resumed_from = int(saved["step"])
            log.info("resuming %s from step %d", work_dir, resumed_from)
            break

        def report(phase: str, step: int, **extra) -> None:
            progress({"phase": phase, "step": step, "total_steps": total, "resumed_from_step": resumed_from, **extra})

        if resumed_from == 0:
            report("eval-before", 0, epoch=0.0)
            before = _eval_loss(runner, eval_enc, eval_batch, stop, adapter=False)
            state["eval_loss_before"] = before
            if before is not None:
                state["history"].append({"step": 0, "eval_loss": before})
            report("eval-before", 0, epoch=0.0, eval_loss=before, perplexity=_perplexity(before))

        model.train()
        session_tokens, session_start = 0, time.monotonic()
        for step in range(resumed_from, total):
            if stop():
                raise Cancelled()
            epoch, indices = plan[step]
            batch = [train_enc[i] for i in indices]
            lr = _learning_rate(step, total, settings.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.monotonic()
            n_labels = max(1, sum(len(e.ids) - e.n_prompt for e in batch))
            loss_total = 0.0
            for chunk in micro_batches(batch, runner.budget):
                loss_sum, _ = runner.loss(chunk)
                (loss_sum / n_labels).backward()
                loss_total += float(loss_sum.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = loss_total / n_labels
            if not math.isfinite(train_loss):
                raise ModelError("The training became unstable (the loss is not a number); lower the learning rate.")
            tokens = sum(len(e.ids) for e in batch)
            state["train_tokens"] += tokens
            took = time.monotonic() - t0
            state["train_seconds"] += took
            governor.after_step(step + 1 - resumed_from, took, tokens)
            session_tokens += tokens
            state["history"].append({"step": step + 1, "train_loss": round(train_loss, 5)})
            elapsed = time.monotonic() - session_start
            per_step = elapsed / (step + 1 - resumed_from)
            report("train", step + 1, epoch=round(epoch + (step + 1 - epoch_start[epoch]) / epoch_steps[epoch], 4),
                   train_loss=train_loss, loss=train_loss, learning_rate=lr, grad_norm=grad_norm,
                   tokens=state["train_tokens"], tokens_per_s=round(session_tokens / max(elapsed, 1e-9), 1),
                   eta_s=round(per_step * (total - step - 1), 1))
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < total:
                if stop():
                    raise Cancelled()
                _write_checkpoint(torch, ckpt_root, step + 1, model, optimizer, state, fp)

        if stop():
            raise Cancelled()
        report("eval-after", total, epoch=float(settings.epochs))
        after = _eval_loss(runner, eval_enc, eval_batch, stop, adapter=True)
        if after is not None:
            if state["history"] and state["history"][-1].get("step") == total:
                state["history"][-1]["eval_loss"] = after
            else:
                state["history"].append({"step": total, "eval_loss": after})
        report("eval-after", total, epoch=float(settings.epochs), eval_loss=after, perplexity=_perplexity(after))

        if stop():
            raise Cancelled()
        report("saving", total, epoch=float(settings.epochs))
        metrics = {
            "eval_loss_before": _round(state["eval_loss_before"]),
            "eval_loss_after": _round(after),
            "perplexity_before": _round(_perplexity(state["eval_loss_before"])),
            "perplexity_after": _round(_perplexity(after)),
            "train_tokens": state["train_tokens"],
            "train_seconds": round(state["train_seconds"], 2),
            "tokens_per_s": round(state["train_tokens"] / max(state["train_seconds"], 1e-9), 1),
            "steps": total,
            "resumed_from_step": resumed_from,
            "device": device.type,
            "dtype": "bfloat16" if autocast_dtype is not None else "float32",
            "peak_memory_mb": _peak_memory_mb(torch, device),
            "history": state["history"],
            "examples": len(train_enc),
            "eval_examples": len(eval_enc),
            "skipped_examples": len(train) - len(train_enc) + len(eval) - len(eval_enc),
            "wall_seconds": round(time.monotonic() - started, 2),
            "threads": governor.full,
        }
        adapter_dir = _publish_adapter(model, work_dir, base_name)
        _write_json(work_dir / RESULT_FILE, {"fingerprint": fp, "metrics": metrics})
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the adapter and result.json replace them
        return TrainResult(adapter_dir=adapter_dir, metrics=metrics)
    finally:
        torch.set_num_threads(previous_threads)  # the governor changed a process-wide setting


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def _round(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _load(torch, base_dir: Path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        log.exception("cannot load %s for training", base_dir)
        raise ModelError(f"The base model in {base_dir} could not be loaded for training.") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"The base model in {base_dir} is not a chat model: it has no chat template.")
    model.to(device)
    model.config.use_cache = False
    return tokenizer, model
