"""LoRA adapters served on one shared local base model.

Owns: checking an adapter folder (safetensors only, trained for this base, layer
sizes that fit), putting each adapter once into the loaded model with peft,
applying each batch row's own adapter at forward time (a batch with no adapter
row runs the plain base layers, swapped back in place),
taking adapters out again, and ``AdaptedModel``, the ChatModel view callers get.
Must not: load pickles, own the scheduler thread, touch the store, or import
torch/peft/safetensors at import time.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from personal_gpt.errors import ModelError
from personal_gpt.gpts import GenerationSettings
from personal_gpt.models.base import AdapterRef, Message, Usage

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def unsafe_files(folder: Path) -> list[str]:
    """Names of pickle-format files anywhere under ``folder`` (we load safetensors only).
    Raises OSError when the folder cannot be read."""
    return sorted(p.name for p in Path(folder).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
MAX_LOADED = 16  # adapters kept in memory per base model; the least recently used idle one leaves first
# options peft supports but a shared, mixed-batch server cannot (they change the base or need other inputs)
UNSUPPORTED = {
    "use_dora": "DoRA",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained extra layers (modules_to_save)",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA",
}
_WEIGHT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<leaf>weight|bias))?$"
)


def adapter_label(adapter: AdapterRef) -> str:
    return adapter.label or adapter.name


# --- checks that load nothing --------------------------------------------------------

def check_adapter(adapter: AdapterRef, base_names: set[str], model_name: str) -> dict:
    """The adapter's config, after checking its folder: only safetensors weights,
    no pickles, a plain LoRA adapter, trained for one of ``base_names``.
    Raises ``ModelError`` with a sentence a creator understands."""
    label = adapter_label(adapter)
    folder = Path(adapter.path)
    if not folder.is_dir():
        raise ModelError(f"The fine-tuned version '{label}' cannot be found on this computer; train it again.")
    try:
        unsafe = unsafe_files(folder)
    except OSError as exc:
        raise ModelError(f"The fine-tuned version '{label}' cannot be read ({exc.strerror or exc}).") from exc
    if unsafe:
        raise ModelError(
            f"The fine-tuned version '{label}' was refused: it holds files in an unsafe format ({', '.join(unsafe)}); "
            "only adapters saved as safetensors are loaded."
        )
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelError(
            f"The fine-tuned version '{label}' is incomplete: it needs {CONFIG_FILE} and {WEIGHTS_FILE}; train it again."
        )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"The fine-tuned version '{label}' is damaged: its {CONFIG_FILE} cannot be read.") from exc
    if not isinstance(config, dict):
        raise ModelError(f"The fine-tuned version '{label}' is damaged: its {CONFIG_FILE} cannot be read.")
    if config.get("peft_type") != "LORA":
        raise ModelError(
            f"The fine-tuned version '{label}' is not a LoRA adapter ({config.get('peft_type') or 'unknown kind'}); "
            "this app serves LoRA adapters only."
        )
    used = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    if used:
        raise ModelError(
            f"The fine-tuned version '{label}' uses {', '.join(used)}, which this app cannot serve beside other chats; "
            "train it again as a plain LoRA adapter."
        )
    trained_for = config.get("base_model_name_or_path")
    if trained_for not in base_names:
        raise ModelError(
            f"The fine-tuned version '{label}' was trained for another model ({trained_for or 'not recorded'}), "
            f"not for {model_name}; train it again on this model or switch the GPT back to its model."
        )
    return config


def check_shapes(adapter: AdapterRef, model: Any, model_name: str) -> int:
    """Check that every LoRA weight fits a layer of ``model`` (read from the
    safetensors header only); returns the number of weights."""
    from safetensors import safe_open

    label = adapter_label(adapter)
    misfit = ModelError(
        f"The fine-tuned version '{label}' does not fit {model_name}: its layers have other names or sizes; "
        "train it again on this model."
    )
    try:
        with safe_open(str(Path(adapter.path) / WEIGHTS_FILE), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as exc:  # safetensors raises its own errors for damaged headers
        log.warning("adapter %s: unreadable weights: %s", adapter.name, exc)
        raise ModelError(f"The fine-tuned version '{label}' is damaged: its weights cannot be read.") from exc
    if not shapes:
        raise ModelError(f"The fine-tuned version '{label}' is empty: it holds no weights.")
    for key, shape in shapes.items():
        match = _WEIGHT_KEY.match(key)
        if match is None:
            log.warning("adapter %s: unexpected weight %s", adapter.name, key)
            raise misfit
        try:
            module = model.get_submodule(match["module"])
        except AttributeError:
            log.warning("adapter %s: no layer %s in the base model", adapter.name, match["module"])
            raise misfit from None
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not _fits(layer, match["part"], match["leaf"], shape):
            log.warning("adapter %s: %s %s does not fit %s", adapter.name, key, shape, layer)
            raise misfit
    return len(shapes)


def _fits(layer: Any, part: str, leaf: str | None, shape: tuple[int, ...]) -> bool:
    if part in ("lora_A", "lora_B"):
        size_in, size_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if size_in is None or size_out is None:
            return False
        if part == "lora_A":
            return leaf == "weight" and len(shape) == 2 and shape[1] == size_in
        if leaf == "bias":
            return shape == (size_out,)
        return leaf == "weight" and len(shape) == 2 and shape[0] == size_out
    rows, dim = getattr(layer, "num_embeddings", None), getattr(layer, "embedding_dim", None)
    if rows is None or dim is None or leaf is not None or len(shape) != 2:
        return False
    return shape[1] == rows if part == "lora_embedding_A" else shape[0] == dim


# --- adapters inside the loaded model -----------------------------------------------------

_ROWS_LAYER: type | None = None


def _rows_layer():
    """The layer put in place of a LoRA-wrapped one for steps with adapter rows:
    the plain layer's output plus, for each adapter in the batch, B(A(x)) * scaling
    on that adapter's rows (the whole batch at once when they all use it). The
    weights are peft's own; only the batching is ours: peft's generic mixed-batch
    forward gathers and scatters rows in every layer even when one adapter serves
    the whole batch (adapter decoding ran about half as fast with it on an H200).
    Built lazily: torch stays unimported."""
    global _ROWS_LAYER
    if _ROWS_LAYER is not None:
        return _ROWS_LAYER
    from torch import nn

    class RowsLora(nn.Module):
        def __init__(self, plain, owner: "AdapterSet"):
            super().__init__()
            self.plain = plain
            self.owner = owner  # plain attribute (not a submodule): the per-step row groups
            self.weights: dict[str, tuple[Any, Any, float]] = {}  # adapter key -> (A, B, scaling)

        def get_base_layer(self):
            return self.plain

        def forward(self, x, *args, **kwargs):
            out = self.plain(x, *args, **kwargs)
            for key, index in self.owner.groups:
                weights = self.weights.get(key)
                if weights is None:  # this adapter leaves this layer alone
                    continue
                lora_a, lora_b, scaling = weights
                part = x if index is None else x.index_select(0, index)
                if part.dtype != lora_a.weight.dtype:
                    part = part.to(lora_a.weight.dtype)
                delta = lora_b(lora_a(part)) * scaling
                if delta.dtype != out.dtype:
                    delta = delta.to(out.dtype)
                if index is None:
                    out = out + delta
                else:
                    out = out.index_add(0, index, delta)
            return out

    _ROWS_LAYER = RowsLora
    return RowsLora


def retire_idle(loaded: dict, newest: Any, keep: int, retired: list) -> None:
    """Drop the least recently used of ``loaded``'s idle entries (``users == 0``, not
    ``newest``) until at most ``keep`` remain; each dropped one is marked ``retired``
    and appended to ``retired`` for the owner to free once nothing uses it. The caller
    holds the lock that guards ``loaded``."""
    idle = sorted((x for x in loaded.values() if x.users == 0 and x is not newest), key=lambda x: x.last_used)
    for old in idle[: max(0, len(loaded) - keep)]:
        del loaded[old.name]
        old.retired = True
        retired.append(old)


class _Slot:
    """One adapter inside the model. ``key`` is its peft adapter name, unique
    per load, so prefix-cache entries never outlive the weights they came from."""

    __slots__ = ("name", "key", "users", "retired", "removed", "last_used", "_owner")

    def __init__(self, name: str, key: str, owner: "AdapterSet"):
        self.name, self.key, self._owner = name, key, owner
        self.users = 0  # requests submitted and not finished
        self.retired = False  # forgotten or evicted: leaves once idle
        self.removed = False
        self.last_used = time.monotonic()

    def release(self) -> None:
        self._owner._release(self)

    def __repr__(self) -> str:
        return f"_Slot({self.name!r}, key={self.key!r}, users={self.users})"


class AdapterSet:
    """The adapters of one LocalModel. Loading and removing change the model's
    layers, so they hold ``step_lock``, which the scheduler holds for each
    prefill/decode step. Lock order: load lock, then step lock, then the small lock.

    peft loads an adapter by wrapping each targeted layer in a LoRA layer. Between
    steps each targeted place holds one of three layers (``_place``): "plain", the
    original layer, for steps where no row uses an adapter (requests without one
    run exactly the plain model, at its speed, while adapters stay loaded);
    "rows", our ``RowsLora`` over peft's weights, for steps with adapter rows; and
    "peft", peft's own layers, only while peft adds or deletes an adapter. A switch
    costs one pass over the targeted layers, and happens only when the batch
    changes between "some adapter rows" and "none"."""

    def __init__(self, step_lock, on_removed: Callable[[str], None] | None = None, max_loaded: int = MAX_LOADED):
        self._step_lock = step_lock
        self._on_removed = on_removed
        self.max_loaded = max(1, int(max_loaded))
        self._lock = threading.Lock()  # the maps and counters below; held briefly
        self._load_lock = threading.Lock()  # one load or removal at a time; never held by a step
        self._slots: dict[str, _Slot] = {}  # adapter name -> its live slot
        self._retired: list[_Slot] = []  # to remove once idle
        self._peft: Any = None  # the PeftModel around the base while adapters are in it
        self._places: list[tuple[Any, str, dict[str, Any]]] = []  # (parent, attribute, {mode: layer})
        self._mode = "plain"
        self._serial = 0
        self._last_keys: tuple | None = None
        self._last_groups: list[tuple[str, Any]] = []
        self.groups: list[tuple[str, Any]] = []  # during a step: (adapter key, its rows' index or None = all)
        self.injected = False  # adapters are loaded: the scheduler must route each step through select()

    # -- the scheduler's side ----------------------------------------------------------

    @property
    def removal_due(self) -> bool:
        return bool(self._retired)

    def select(self, keys: list[str | None], device: Any) -> None:
        """Prepare the model for a step whose rows use these adapter keys (None:
        no adapter); ``done()`` after the forward."""
        if all(key is None for key in keys):
            self._place("plain")
            return
        self._place("rows")
        signature = tuple(keys)
        if signature != self._last_keys:  # else: decode steps of an unchanged batch, same groups
            import torch

            used = list(dict.fromkeys(key for key in keys if key is not None))
            if len(used) == 1 and None not in keys:
                self._last_groups = [(used[0], None)]
            else:
                self._last_groups = [
                    (key, torch.tensor([i for i, k in enumerate(keys) if k == key], dtype=torch.long, device=device))
                    for key in used
                ]
            self._last_keys = signature
        self.groups = self._last_groups

    def done(self) -> None:
        """After a step's forward: any other forward sees plain layers' outputs only."""
        self.groups = []

    def _place(self, mode: str) -> None:
        """Put the ``mode`` layers ("plain", "rows" or "peft") in every targeted place.
        Only between steps: under the step lock."""
        if mode == self._mode:
            return
        for parent, attribute, layers in self._places:
            setattr(parent, attribute, layers[mode])
        self._mode = mode

    def _collect(self, model: Any) -> None:
        """With peft's layers in place: note every targeted place, its plain layer,
        and a ``RowsLora`` over the adapters' weights there."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        rows_layer = _rows_layer()
        places = []
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            rows = rows_layer(module.get_base_layer(), self)
            rows.weights = {key: (module.lora_A[key], module.lora_B[key], float(module.scaling[key]))
                            for key in module.lora_A}
            places.append((parent, attribute, {"peft": module, "plain": module.get_base_layer(), "rows": rows}))
        self._places = places
        self._mode = "peft"
        self._last_keys = None

    # -- loading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def get(self, adapter: AdapterRef, model: Any, device: Any, base_names: set[str], model_name: str) -> _Slot:
        """The adapter's slot, loading it on first use (callers' threads; the
        scheduler pauses only while peft changes the layers)."""
        with self._lock:
            slot = self._slots.get(adapter.name)
            if slot is not None:
                slot.last_used = time.monotonic()
                return slot
        with self._load_lock:
            with self._lock:
                slot = self._slots.get(adapter.name)
                if slot is not None:
                    return slot
                self._serial += 1
                key = f"pgpt_adapter_{self._serial}"
            check_adapter(adapter, base_names, model_name)
            check_shapes(adapter, model, model_name)
            started = time.perf_counter()
            with self._step_lock:
                self._inject(adapter, key, model, device, model_name)
            log.info("adapter %s loaded as %s in %.2fs", adapter.name, key, time.perf_counter() - started)
            slot = _Slot(adapter.name, key, self)
            with self._lock:
                self._slots[adapter.name] = slot
                retire_idle(self._slots, slot, self.max_loaded, self._retired)
        self.sweep()
        return slot

    def _inject(self, adapter: AdapterRef, key: str, model: Any, device: Any, model_name: str) -> None:
        from peft import PeftModel

        label = adapter_label(adapter)
        self._place("peft")  # peft must find its layers where it put them
        # the adapter's weights in the base model's dtype (peft's default keeps float32 beside a
        # bfloat16 base, which costs two casts per layer and step); on the CPU both are float32
        options = dict(adapter_name=key, is_trainable=False, torch_device=str(device), autocast_adapter_dtype=False)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(model, str(adapter.path), **options)
            else:
                self._peft.load_adapter(str(adapter.path), **options)
        except Exception as exc:
            log.exception("adapter %s could not be loaded", adapter.name)
            self._undo(key, model)
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ModelError(f"There is not enough memory to load the fine-tuned version '{label}'.") from exc
            raise ModelError(f"The fine-tuned version '{label}' could not be loaded into {model_name}.") from exc
        model.eval()
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        plain_lora = all(hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "scaling") for m in layers)
        variant = any(key in getattr(m, "lora_variant", {}) for m in layers)
        if not layers or not plain_lora or variant or any(key in getattr(m, "lora_embedding_A", {}) for m in layers):
            self._undo(key, model)
            raise ModelError(
                f"The fine-tuned version '{label}' uses a kind of LoRA this app cannot serve beside other chats; "
                "train it again as a plain LoRA adapter on the model's linear layers."
            )
        self._collect(model)
        self._place("plain")
        self.injected = True

    def _undo(self, key: str, model: Any) -> None:
        """Take a half-loaded adapter out again, leaving the model as it was."""
        try:
            if self._peft is not None and key in self._peft.peft_config and len(self._peft.peft_config) > 1:
                self._peft.delete_adapter(key)
                self._collect(model)
                self._place("plain")
                return
            if self._peft is None or key in getattr(self._peft, "peft_config", {}):
                self._restore_base(model)
        except Exception:  # pragma: no cover - last resort; the model is then unusable for adapters
            log.exception("could not take adapter %s out again", key)

    def _restore_base(self, model: Any) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        self._forget_layers()

    def _forget_layers(self) -> None:
        self._places, self._mode, self._last_keys, self._last_groups, self.groups = [], "plain", None, [], []
        self._peft = None
        self.injected = False

    # -- using and removing ---------------------------------------------------------------

    def acquire(self, slot: _Slot) -> bool:
        """Count a request that will use ``slot``; False if it was removed meanwhile."""
        with self._lock:
            if slot.removed:
                return False
            slot.users += 1
            slot.last_used = time.monotonic()
            return True

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users = max(0, slot.users - 1)

    def forget(self, name: str) -> bool:
        """Take the adapter out now, or once the chats using it finish.
        False if it was not loaded."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if slot is None:
                return False
            slot.retired = True
            self._retired.append(slot)
        self.sweep(block=True)
        return True

    def sweep(self, block: bool = False) -> None:
        """Remove retired adapters no request uses (the scheduler calls this
        between steps without waiting; ``forget`` waits)."""
        if not self._retired:
            return
        if not self._load_lock.acquire(blocking=block):
            return
        try:
            with self._lock:
                ready = [s for s in self._retired if s.users == 0]
                for slot in ready:
                    slot.removed = True
                self._retired = [s for s in self._retired if not s.removed]
            if not ready:
                return
            with self._step_lock:
                for slot in ready:
                    self._remove(slot.key)
            for slot in ready:
                log.info("adapter %s (%s) removed", slot.name, slot.key)
                if self._on_removed is not None:
                    self._on_removed(slot.key)
        finally:
            self._load_lock.release()

    def _remove(self, key: str) -> None:
        peft = self._peft
        if peft is None or key not in peft.peft_config:
            return
        self._place("peft")  # peft must find its layers where it put them
        model = peft.get_base_model()
        if len(peft.peft_config) > 1:
            with warnings.catch_warnings():  # "adapter ... was active": we never use peft's active adapter
                warnings.simplefilter("ignore", UserWarning)
                peft.delete_adapter(key)
            self._collect(model)
            self._place("plain")
            return
        peft.unload()  # the last one: the plain layers go back in place for good
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in model.__dict__:
                delattr(model, attribute)
        self._forget_layers()

    def reset(self) -> None:
        """The model is gone (closed): forget everything."""
        with self._lock:
            for slot in self._slots.values():
                slot.removed = True
            for slot in self._retired:
                slot.removed = True
            self._slots.clear()
            self._retired.clear()
            self._forget_layers()


# --- the view callers get --------------------------------------------------------------------

class AdaptedModel:
    """A ChatModel: the shared local base model answering with one adapter.
    Light: any number of views share the base and its scheduler."""

    def __init__(self, base: Any, adapter: AdapterRef):
        self.base = base
        self.adapter = adapter
        self.name = f"{base.name} + {adapter_label(adapter)}"
        self.context_window = base.context_window

    def __repr__(self) -> str:
        return f"AdaptedModel({self.base!r}, adapter={self.adapter.name!r})"

    def load(self) -> None:
        """Load the base model and this adapter now (otherwise the first answer does)."""
        self.base.load_adapter(self.adapter)

    def count_tokens(self, messages: list[Message]) -> int:
        return self.base.count_tokens(messages)

    def stream(
        self,
        messages: list[Message],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        return self.base.stream(messages, settings, cancel=cancel, usage=usage, adapter=self.adapter)
