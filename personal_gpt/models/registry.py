"""Model references -> one shared ChatModel per reference.

Owns: parsing references ("bundled:<id>", "hf:/absolute/dir", "openai:<provider_id>";
"" = the install's default), creating each model once (thread-safe), LoRA adapter
views over a shared local model, and closing them.
Must not: store provider secrets (the caller's lookup supplies them) or load weights on import.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from personal_gpt.errors import InvalidInput
from personal_gpt.models.base import AdapterRef, ChatModel

BUNDLED_MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct (bundled)"}
KINDS = ("bundled", "hf", "openai")

ProviderLookup = Callable[[str], Any]  # provider id -> object or dict with base_url, api_key, model, name


@dataclass(frozen=True)
class ModelInfo:
    """What the UI shows about a reference, without loading anything."""

    ref: str  # normalised reference
    kind: str  # "bundled", "hf" or "openai"
    label: str  # e.g. "SmolLM2-135M-Instruct (bundled)"
    target: str  # bundled id, folder, or provider id


def parse_ref(ref: str, default: str) -> tuple[str, str, str]:
    """(normalised ref, kind, target); raises InvalidInput with a sentence."""
    ref = (ref or "").strip() or default
    kind, sep, target = ref.partition(":")
    target = target.strip()
    if not sep or kind not in KINDS or not target:
        raise InvalidInput(
            f"'{ref}' is not a model this app knows. Use the bundled model, a local model folder "
            "(hf:/path/to/folder) or a model server set up by the operator (openai:<name>)."
        )
    if kind == "bundled" and target not in BUNDLED_MODELS:
        known = ", ".join(BUNDLED_MODELS)
        raise InvalidInput(f"There is no bundled model called '{target}'. Bundled models: {known}.")
    if kind == "hf":
        if not Path(target).is_absolute():
            raise InvalidInput(f"A local model folder must be given as a full path (hf:/…), not '{target}'.")
        target = str(Path(target).resolve())
    return f"{kind}:{target}", kind, target


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class ModelRegistry:
    """One shared instance per model reference for the whole process."""

    def __init__(self, settings):
        self.settings = settings
        self._models: dict[str, tuple[Any, ChatModel]] = {}  # ref -> (fingerprint, model)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(
        self, ref: str, provider_lookup: ProviderLookup | None = None, adapter: AdapterRef | None = None
    ) -> ChatModel:
        """The model for ``ref`` (created on first use; the same object afterwards).

        For "openai:" references ``provider_lookup(provider_id)`` supplies the
        connection; if it changes (new key, new address) a new client replaces the old.

        With ``adapter`` (local models only): a light ``AdaptedModel`` view that
        answers with that LoRA adapter on the one shared instance of ``ref``; the
        adapter folder is checked now (files, format, base model: ``ModelError``),
        its weights load on first use. An adapter's ``base_model_name_or_path``
        must be ``describe(ref).ref`` (e.g. "bundled:smollm2-135m-instruct")."""
        key, kind, target = parse_ref(ref, self.settings.default_model)
        if adapter is not None:
            if kind == "openai":
                label = self.describe(ref, provider_lookup).label
                raise InvalidInput(
                    f"A fine-tuned version can only run on a model on this computer, and {label} is a model "
                    "server; switch the GPT to a local model or turn its fine-tuned version off."
                )
            from personal_gpt.models.adapters import AdaptedModel, check_adapter

            base = self.get(ref, provider_lookup)
            check_adapter(adapter, base.base_names(), base.name)
            return AdaptedModel(base, adapter)
        provider = None
        fingerprint: Any = None
        if kind == "openai":
            provider = self._provider(target, provider_lookup)
            fingerprint = _provider_fingerprint(provider)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one creation per reference; other references are not held up
            with self._lock:
                cached = self._models.get(key)
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            model = self._create(kind, target, provider)
            with self._lock:
                # a replaced client is not closed: chats still streaming from it finish
                self._models[key] = (fingerprint, model)
            return model

    def describe(self, ref: str, provider_lookup: ProviderLookup | None = None) -> ModelInfo:
        key, kind, target = parse_ref(ref, self.settings.default_model)
        if kind == "bundled":
            label = BUNDLED_MODELS[target]
        elif kind == "hf":
            label = f"{Path(target).name} (local folder)"
        else:
            provider = provider_lookup(target) if provider_lookup else None
            name = _field(provider, "name") if provider else None
            model = _field(provider, "model") if provider else None
            label = name or (f"{model} (model server)" if model else f"{target} (model server)")
        return ModelInfo(ref=key, kind=kind, label=label, target=target)

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def forget_adapter(self, name: str) -> bool:
        """Take the adapter ``name`` out of every loaded local model (call it when
        an adapter version is deleted); chats using it finish first. True if any held it."""
        with self._lock:
            models = [m for _, m in self._models.values()]
        forgotten = False
        for model in models:
            forget = getattr(model, "forget_adapter", None)
            if callable(forget):
                forgotten = bool(forget(name)) or forgotten
        return forgotten

    def close(self) -> None:
        """Close every model (local models stop their scheduler and free memory)."""
        with self._lock:
            models = [m for _, m in self._models.values()]
            self._models.clear()
        for model in models:
            _close(model)

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _provider(provider_id: str, lookup: ProviderLookup | None) -> Any:
        if lookup is None:
            raise InvalidInput(f"The model server '{provider_id}' cannot be used here: no model servers are set up.")
        provider = lookup(provider_id)
        if provider is None:
            raise InvalidInput(f"There is no model server called '{provider_id}'; ask the operator to set it up.")
        if not _field(provider, "base_url") or not _field(provider, "model"):
            raise InvalidInput(f"The model server '{provider_id}' is missing its address or model name.")
        return provider

    def _create(self, kind: str, target: str, provider: Any) -> ChatModel:
        if kind == "bundled":
            from personal_gpt.models.bundled import bundled_local_model

            model = bundled_local_model(self.settings)
            model.base_id = f"bundled:{target}"  # the stable name adapters record as their base
            return model
        if kind == "hf":
            from personal_gpt.models.local import LocalModel

            return LocalModel(
                Path(target),
                f"{Path(target).name} (local folder)",
                threads=self.settings.torch_threads,
                max_batch=self.settings.max_batch,
                base_id=f"hf:{target}",
            )
        from personal_gpt.models.openai_compat import OpenAICompatModel

        kwargs = {}
        for name in ("context_window", "timeout"):
            value = _field(provider, name)
            if value:
                kwargs[name] = value
        return OpenAICompatModel(
            base_url=_field(provider, "base_url"),
            api_key=_field(provider, "api_key"),
            model=_field(provider, "model"),
            name=_field(provider, "name"),
            **kwargs,
        )


def _provider_fingerprint(provider: Any) -> tuple:
    key = _field(provider, "api_key") or ""
    return (
        _field(provider, "base_url"),
        _field(provider, "model"),
        _field(provider, "name"),
        _field(provider, "context_window"),
        hashlib.sha256(key.encode()).hexdigest(),  # the key itself is never kept here
    )


def _close(model: Any) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        close()
