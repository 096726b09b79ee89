"""Checking and exporting a trained LoRA adapter: the adapter folder as it is
(config + safetensors weights), or a full model folder with the adapter merged
into its base. Both appear at their destination complete or not at all.
Must not: accept pickle-format weights, touch the store, or import torch/transformers/peft at import time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from personal_gpt.errors import InvalidInput, ModelError
from personal_gpt.models.adapters import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, unsafe_files  # noqa: F401

log = logging.getLogger(__name__)

# what a clean peft adapter folder may carry besides its two files
ADAPTER_EXTRAS = ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def check_adapter_dir(path) -> None:
    """Raise InvalidInput unless ``path`` is a LoRA adapter folder with
    ``adapter_config.json`` and ``adapter_model.safetensors`` and no pickle files."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidInput(f"The adapter folder {folder} does not exist.")
    try:
        unsafe = unsafe_files(folder)
    except OSError as exc:
        raise InvalidInput(f"The adapter folder {folder} cannot be read ({exc.strerror or exc}).") from exc
    if unsafe:
        raise InvalidInput(f"The adapter folder holds files in an unsafe format ({', '.join(unsafe)}); "
                           "only adapters saved as safetensors are accepted.")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise InvalidInput(f"The adapter folder is incomplete: {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"The adapter folder is damaged: its {CONFIG_FILE} cannot be read.") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidInput("The adapter folder does not hold a LoRA adapter.")


def _empty_destination(dest) -> Path:
    dest = Path(dest).expanduser()
    if dest.exists():
        if not dest.is_dir():
            raise InvalidInput(f"{dest} exists and is not a folder; choose a new folder to export to.")
        if any(dest.iterdir()):
            raise InvalidInput(f"The folder {dest} is not empty; choose a new or empty folder to export to.")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"The folder {parent} cannot be created ({exc.strerror or exc}).") from exc
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    for item in tmp.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, dest)  # onto nothing or an empty folder: one atomic rename on POSIX


@contextmanager
def _staged(dest: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to write into; published to ``dest`` when
    the block ends, removed on any error (a disk error becomes one sentence)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publish(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InvalidInput(f"{what} could not be written to {dest} ({exc.strerror or exc}).") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_adapter(adapter_dir, dest) -> Path:
    """Copy the adapter in ``adapter_dir`` (its config, weights and tokenizer or
    card files, nothing else) to ``dest``, which must not exist or be empty."""
    check_adapter_dir(adapter_dir)
    source = Path(adapter_dir)
    dest = _empty_destination(dest)
    with _staged(dest, "The adapter") as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE, *ADAPTER_EXTRAS):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return dest


def export_merged(base_dir, adapter_dir, dest) -> Path:
    """Merge the adapter into its base model and save the result (safetensors
    weights + tokenizer files) to ``dest``, which must not exist or be empty: a
    plain model folder any transformers program loads."""
    check_adapter_dir(adapter_dir)
    base_dir = Path(base_dir)
    dest = _empty_destination(dest)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        log.exception("cannot load %s", base_dir)
        raise ModelError(f"The base model in {base_dir} could not be loaded to merge the adapter.") from exc
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched adapter
        log.exception("cannot merge %s into %s", adapter_dir, base_dir)
        raise ModelError("The adapter does not fit its base model, so it cannot be merged.") from exc
    with _staged(dest, "The merged model") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:  # anything the tokenizer did not write itself (e.g. a generation config)
            if (base_dir / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(base_dir / name, tmp / name)
        if unsafe_files(tmp):
            raise ModelError("The merged model was not saved as safetensors; nothing was exported.")
    return dest
