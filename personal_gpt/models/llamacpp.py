"""The bundled model served by llama.cpp (llama-cpp-python, optional), with the same
ChatModel API as ``LocalModel``: one scheduler thread, continuous batching of every
chat in one llama.cpp context, prompt prefixes reused per sequence, LoRA adapters
converted to GGUF and applied per step to the rows that use them.

Owns: the llama.cpp context and its sequences, sampling, GGUF LoRA adapters in memory,
and handing what it cannot serve (an adapter llama.cpp cannot express, a failed load)
to the torch ``LocalModel`` it is given.
Must not: touch the store, download anything, or import llama_cpp/numpy at import time.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from personal_gpt.errors import InvalidInput, ModelError
from personal_gpt.gpts import GenerationSettings
from personal_gpt.models.base import AdapterRef, Message, Usage
from personal_gpt.models.batching import _Done, _Request
from personal_gpt.models.local import EXTRA_EOS_TOKENS, _read_context_window, chat_token_ids, relay

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per llama_decode call (prompt chunks and decode rows together)
KV_CELLS = 16384  # KV cells of a unified plain-model context (seq_cells=0) (f16: ~23 KB each for SmolLM2-135M)
# The plain model's context gives each sequence its own SEQ_CELLS cells (llama.cpp's non-unified cache,
# kv_unified=False): a row's attention then reads only its own chat's cells, where in a unified cache
# every row walks the cells of every chat kept. Measured here (2 cores, BF16, 8 chats of ~700 tokens):
# a step of 8 rows 37-41 ms against 50-55 ms unified; one row beside 10 kept chats 11.5 against 14.9 ms.
# llama.cpp computes a non-unified batch in one pass only when its sequences' ids are consecutive and
# each feeds as many tokens as the others (see _decode). Chats longer than this run in LONG_KEY's
# context, unified like an adapter's (SEQ_CELLS x 12 sequences: ~565 MB of f16 cells).
SEQ_CELLS = 2048
LONG_KEY = "long"  # the plain model's context for chats longer than SEQ_CELLS
# A LoRA applied at run time costs llama.cpp two small products per adapted weight and step: measured here
# (2 cores, BF16, rank 16 on all 7 projections) a decode step 17.1 against 10.7 ms with the adapter merged
# into a copy of the weights, a 635-token prompt 1.22 against 0.93 s. So the first MERGED_ADAPTERS adapters
# loaded are merged in the background (~4 s, a ~270 MB copy of the weights each) and then run from their
# merged copy; until then, and for the others, the LoRA is applied at run time.
MERGED_ADAPTERS = 1
# When every merged place is taken, a merged adapter no chat has used for this long gives its place to the
# adapter asking for one (it goes back to the LoRA applied at run time): the active version of a GPT that
# was just fine-tuned again gets the fast path; two adapters used by turns do not merge back and forth.
MERGE_IDLE_S = 60.0
MERGED_SUFFIX = "+merged"  # context key of an adapter's merged weights
IDLE_ADAPTER_CONTEXTS = 2  # contexts of adapters no chat uses that are kept (their prompts stay cached)
SPARE_SEQUENCES = 4  # finished sequences kept beyond max_batch so later prompts reuse their prefix
MIN_REUSE = 16  # shorter common prefixes are not worth keeping a finished sequence for
# Prompt-lookup speculation, for greedy answers (temperature 0): at most DRAFT_TOKENS guessed tokens
# checked per step. Measured here (2 cores, F16, 128 tokens): greedy 72 -> 89 tokens/s with the same
# answers; sampled answers (temperature 0.3-0.7, repetition penalty 1.1) kept too few guesses and
# lost 4-9%, so they do not guess.
DRAFT_TOKENS = 4
DRAFT_NGRAM = 3  # ... guessed from the tokens that followed the last DRAFT_NGRAM tokens earlier
# Speculation while at most this many chats decode. Measured: it paid at 1, 2, 4 and 8 chats on answers that
# copy their prompt (8 chats 127 -> 141 tokens/s); on the bench's chat questions, which copy little, 8 chats
# with guesses from up to 8 / 4 / 0 rows ran at 144.7 / 146.8 / 148.1 tokens/s (BF16, interleaved, same
# process) -- a 2% cost where knowledge answers that quote their passages gain 11%, so it stays at 8.
SPECULATE_ROWS = 8
GUESS_FLOOR = 0.25  # a chat whose recent guesses were kept less often than this stops guessing for a while


def llamacpp_installed() -> bool:
    """True when llama-cpp-python can be imported (nothing is imported here)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


_LIB: Any = None
_LIB_LOCK = threading.Lock()


def _lib():
    """llama_cpp, initialised once, its log output routed to our logger at debug level."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            import llama_cpp

            llama_cpp.llama_backend_init()

            @llama_cpp.llama_log_callback
            def to_log(level, text, user_data):  # noqa: ARG001
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

            llama_cpp.llama_log_set(to_log, ctypes.c_void_p(0))
            llama_cpp._pgpt_log_callback = to_log  # keep the callback alive
            _LIB = llama_cpp
        return _LIB


_KERNELS: int | None = None


def kernels_version() -> int:
    """The version of our CPU kernels (``third_party/llama.cpp/pgpt-kernels.patch``: flash attention
    for decode steps and short prompt chunks, prefetching small matrix products) in the installed
    llama.cpp build, or 0 for a stock build (then everything runs, on llama.cpp's own kernels).
    ``scripts/setup.sh`` builds llama-cpp-python with them."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = 0
        try:
            import llama_cpp.llama_cpp as binding

            folder = Path(getattr(binding, "_base_path", Path(binding.__file__).parent / "lib"))
            for path in sorted(folder.glob("*ggml-cpu*")):
                try:
                    function = getattr(ctypes.CDLL(str(path)), "pgpt_ggml_kernels_version", None)
                except OSError:
                    continue
                if function is not None:
                    function.restype = ctypes.c_int
                    _KERNELS = int(function())
                    break
        except Exception:  # not installed, or a layout this does not know: report a stock build
            log.debug("could not tell which llama.cpp kernels are installed", exc_info=True)
    return _KERNELS


# --- sequences and adapters -----------------------------------------------------------

@dataclass(eq=False)
class _Seq:
    """One llama.cpp sequence: the tokens its KV cells hold, under which adapter."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    adapter: str | None = None
    request: _Request | None = None
    pending: int | None = None  # the last chosen token, fed at the next step
    seen: Any = None  # numpy bool [vocab] (repetition penalty)
    rng: Any = None  # numpy Generator when sampling
    last_used: float = 0.0
    leader: Any = None  # (sequence, its request, shared prompt length): copy its cells instead of computing them
    lookup: Any = None  # _Lookup over the prompt and the answer so far (speculation)
    kept: float = 0.5  # running share of guessed tokens kept (speculation pays only when guesses are kept)


class _Lora:
    """A GGUF LoRA adapter loaded into the llama.cpp model; ``key`` is unique per load."""

    def __init__(self, name: str, key: str, handle: Any, owner: "LlamaCppModel"):
        self.name, self.key, self.handle, self._owner = name, key, handle, owner
        self.users = 0
        self.retired = False
        self.last_used = time.monotonic()
        self.merged: Any = None  # the llama.cpp model with this adapter merged into its weights, once built
        self.merging = False  # a merge was started (or failed: not tried again)

    def release(self) -> None:
        with self._owner._cond:
            self.users = max(0, self.users - 1)
            self._owner._cond.notify()


@dataclass(eq=False)
class _Ctx:
    """A llama.cpp context: its own KV cells and sequences, with one adapter (or none)
    set once. Rows with different adapters run in different contexts, because
    switching a context's adapters makes llama.cpp re-plan its graphs (~0.3 s here)."""

    key: str | None
    ctx: Any
    memory: Any
    batch: Any
    seqs: list[_Seq]
    last_used: float = 0.0
    split: bool = False  # every sequence has its own cells (a stream of ``cells``); else all share them
    cells: int = 0

    @property
    def running(self) -> bool:
        return any(seq.request is not None for seq in self.seqs)


class _Call:
    """A function to run on the scheduler thread, with its result or error."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.result, self.error = fn, None, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the waiting caller
            self.error = exc
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@dataclass
class _Engine:
    model: Any
    vocab: Any
    n_vocab: int
    shape: dict
    contexts: dict  # adapter key (None: the plain model) -> _Ctx


class LlamaCppModel:
    """The bundled model (a GGUF file) served by llama.cpp, implementing ``ChatModel``
    plus LocalModel's adapter methods. Prompts are built with the Hugging Face
    tokenizer of ``model_dir`` (the same ids as the torch path). ``fallback()`` returns
    the torch ``LocalModel`` for the same weights; it is created only if needed: when
    llama.cpp fails to load, or for an adapter llama.cpp cannot run."""

    backend = "llama.cpp"

    def __init__(
        self, gguf_path: Path, model_dir: Path, name: str, base_id: str,
        fallback: Callable[[], Any], threads: int = 0, max_batch: int = 8, max_adapters: int = 16,
        kv_cells: int = KV_CELLS, chunk: int = PREFILL_CHUNK, flash_attn: int = -1,
        draft_tokens: int = DRAFT_TOKENS, seq_cells: int = SEQ_CELLS, merged_adapters: int = MERGED_ADAPTERS,
    ):
        self.gguf_path = Path(gguf_path)
        self.model_dir = Path(model_dir)
        self.name = name
        self.base_id = base_id
        self.threads = int(threads)
        self.max_batch = max(1, int(max_batch))
        self.max_adapters = max(1, int(max_adapters))
        self.context_window = _read_context_window(self.model_dir)
        self.kv_cells = max(int(kv_cells), self.context_window)
        # cells per sequence of the plain model's context (0: one unified cache of kv_cells)
        self.seq_cells = min(max(0, int(seq_cells)), self.context_window)
        self.chunk = max(16, int(chunk), self.max_batch)  # every decoding row's token fits one batch
        self.flash_attn = int(flash_attn)  # llama.cpp's flash_attn_type: -1 auto, 0 off, 1 on
        self.draft_tokens = max(0, int(draft_tokens))  # 0: no speculation
        self.merged_adapters = max(0, int(merged_adapters))  # adapters run from merged weights (0: none)
        self._merge_lock = threading.Lock()  # one merge at a time (each writes a copy of the weights)
        self._fallback_factory = fallback
        self._fallback: Any = None
        self._fallback_lock = threading.Lock()
        self._broken: str | None = None  # why llama.cpp is not used (then everything goes to the fallback)
        self._engine: _Engine | None = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._calls: deque[_Call] = deque()  # work for the scheduler thread (loading), see _on_llama_thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._step_lock = threading.Lock()  # the scheduler holds it per step; adapters load/free under it
        self._loras: dict[str, _Lora] = {}  # adapter name -> loaded adapter
        self._retired: list[_Lora] = []
        self._torch_adapters: set[str] = set()  # adapters the fallback serves
        self._serial = 0
        self._workdir = Path(tempfile.mkdtemp(prefix="pgpt-llamacpp-"))

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.gguf_path)!r}, name={self.name!r})"

    # -- loading -----------------------------------------------------------------------

    def load(self) -> None:
        """Load the weights now (otherwise the first call does it)."""
        self._ready()

    def _ready(self) -> bool:
        """True when llama.cpp serves; False when the fallback does (load failed)."""
        if self._engine is not None:
            return True
        if self._broken is not None:
            return False
        with self._load_lock:
            if self._closed:
                raise ModelError("This model has been shut down; reload the page to start it again.")
            if self._engine is None and self._broken is None:
                self._load_tokenizer()
                try:
                    self._engine = self._on_llama_thread(self._load_engine)
                except ModelError:
                    raise
                except Exception as exc:  # anything llama.cpp or its binding raises
                    log.warning("llama.cpp could not load %s (%s); using the torch path", self.gguf_path, exc)
                    self._broken = f"{type(exc).__name__}: {exc}"
            return self._engine is not None

    def _on_llama_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread and return its result (or raise its error).

        Every llama.cpp computation (loading and warming up contexts, decoding) happens on that
        one thread: llama.cpp's CPU backend runs its graphs in OpenMP teams, and decoding on a
        thread other than the one that first computed ran ~35% slower here (2 cores, F16:
        54 against 84 tokens/s), the first thread's team competing with the second's."""
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call(fn)
        self._enqueue(self._calls, call)
        while not call.done.wait(1.0):
            thread = self._thread
            if thread is None or not thread.is_alive():
                raise ModelError("The model stopped unexpectedly; try again.")
        if call.error is not None:
            raise call.error
        return call.result

    def _load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelError(f"The model in {self.model_dir} could not be loaded: its tokenizer files are missing or damaged.") from exc
        eos: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            try:
                value = json.loads((self.model_dir / name).read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                continue
            eos.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        eos.update(vocab[t] for t in EXTRA_EOS_TOKENS if t in vocab)
        self._tokenizer, self._eos = tokenizer, frozenset(eos)

    def _load_engine(self) -> _Engine:
        from personal_gpt.models.gguf_files import model_shape

        lib = _lib()
        shape = model_shape(self.gguf_path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), params)
        if not model:
            raise RuntimeError("llama_model_load_from_file returned NULL")
        kernels = kernels_version()
        log.info("llama.cpp serves %s on %s", self.gguf_path.name,
                 f"our CPU kernels (v{kernels})" if kernels else "its stock kernels")
        vocab = lib.llama_model_get_vocab(model)
        engine = _Engine(model=model, vocab=vocab, n_vocab=int(lib.llama_vocab_n_tokens(vocab)), shape=shape,
                         contexts={})
        try:
            engine.contexts[None] = self._new_context(engine, None)
        except BaseException:
            lib.llama_model_free(model)
            raise
        return engine

    def _new_context(self, engine: _Engine, lora: _Lora | None, key: str | None = None, model: Any = None) -> _Ctx:
        """A context for the plain model (``key`` None, or LONG_KEY for long chats), for one
        adapter applied at run time (``lora``), or for an adapter's merged weights (``model``,
        ``key`` its MERGED_SUFFIX key), warmed up (its first decode plans and allocates the graphs)."""
        lib = _lib()
        sequences = self.max_batch + SPARE_SEQUENCES
        split = lora is None and key is None and self.seq_cells > 0
        cparams = lib.llama_context_default_params()
        if split:
            cparams.n_ctx = self.seq_cells * sequences
        else:
            cparams.n_ctx = self.kv_cells if lora is None and key is None else self.context_window
        cparams.n_batch = cparams.n_ubatch = self.chunk
        cparams.n_seq_max = sequences
        threads = self.threads if self.threads > 0 else _cpu_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        # unified: any sequence may use any cell, so one long chat fits the whole window
        cparams.kv_unified = not split
        cparams.no_perf = True
        cparams.flash_attn_type = self.flash_attn
        ctx = lib.llama_init_from_model(model if model is not None else engine.model, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model returned NULL")
        if lora is not None:
            handles = (lib.llama_adapter_lora_p_ctypes * 1)(lora.handle)
            lib.llama_set_adapters_lora(ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        result = _Ctx(key=lora.key if lora is not None else key, ctx=ctx, memory=lib.llama_get_memory(ctx),
                      batch=lib.llama_batch_init(self.chunk, 0, 1),
                      seqs=[_Seq(seq_id=i) for i in range(sequences)],
                      last_used=time.monotonic(), split=split,
                      cells=int(lib.llama_n_ctx_seq(ctx) if split else lib.llama_n_ctx(ctx)))
        batch = result.batch
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 0, 0, 1, 1
        batch.seq_id[0][0] = 0
        batch.n_tokens = 1
        lib.llama_decode(ctx, batch)  # warm-up
        lib.llama_memory_seq_rm(result.memory, 0, -1, -1)
        return result

    def _free_context(self, context: _Ctx) -> None:
        lib = _lib()
        lib.llama_batch_free(context.batch)
        lib.llama_free(context.ctx)

    def fallback(self):
        """The torch LocalModel over the same weights (created on first need)."""
        with self._fallback_lock:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            return self._fallback

    @property
    def serving(self) -> str:
        """"llama.cpp" or "torch" (after a failed llama.cpp load)."""
        return "llama.cpp" if self._ready() else "torch"

    # -- adapters ------------------------------------------------------------------------

    def base_names(self) -> set[str]:
        return {self.base_id, str(self.model_dir), str(self.model_dir.resolve())}

    def load_adapter(self, adapter: AdapterRef) -> None:
        if not self._ready() or self._lora(adapter) is None:
            self.fallback().load_adapter(adapter)

    def _lora(self, adapter: AdapterRef) -> _Lora | None:
        """The adapter loaded into llama.cpp, or None when llama.cpp cannot run it
        (the fallback serves it). ``ModelError`` for an unsafe or misfit adapter."""
        from personal_gpt.models.adapters import check_adapter, retire_idle

        with self._cond:
            lora = self._loras.get(adapter.name)
            if lora is not None:
                lora.last_used = time.monotonic()
        if lora is not None:
            self._maybe_merge(lora, Path(adapter.path))
            return lora
        with self._cond:
            if adapter.name in self._torch_adapters:
                return None
        check_adapter(adapter, self.base_names(), self.name)
        with self._load_lock:
            with self._cond:
                lora = self._loras.get(adapter.name)
                if lora is not None:
                    return lora
                self._serial += 1
                key = f"lora{self._serial}"
            from personal_gpt.models.gguf_files import Unsupported, lora_to_gguf

            engine = self._engine
            target = self._workdir / f"{key}.gguf"
            try:
                lora_to_gguf(Path(adapter.path), target, engine.shape)
                with self._step_lock:
                    handle = _lib().llama_adapter_lora_init(engine.model, str(target).encode())
                if not handle:
                    raise Unsupported("llama_adapter_lora_init returned NULL")
            except Exception as exc:  # Unsupported, or anything the conversion or llama.cpp raised
                log.info("adapter %s served by the torch path: %s", adapter.name, exc)
                with self._cond:
                    self._torch_adapters.add(adapter.name)
                return None
            finally:
                target.unlink(missing_ok=True)
            lora = _Lora(adapter.name, key, handle, self)
            with self._cond:
                self._loras[adapter.name] = lora
                retire_idle(self._loras, lora, self.max_adapters, self._retired)
        self._sweep()
        self._maybe_merge(lora, Path(adapter.path))
        return lora

    def _merged_place(self, lora: _Lora) -> tuple[bool, _Lora | None]:
        """(whether ``lora`` may be merged now, the merged adapter that must give its place first or
        None): fewer than MERGED_ADAPTERS run merged, or one of them has been idle MERGE_IDLE_S
        (the least recently used). The caller holds ``_cond``."""
        merged = [x for x in self._loras.values() if x.merged is not None and x is not lora]
        if len(merged) < self.merged_adapters:
            return True, None
        now = time.monotonic()
        idle = [x for x in merged if x.users == 0 and now - x.last_used >= MERGE_IDLE_S]
        if self.merged_adapters == 0 or not idle:
            return False, None
        return True, min(idle, key=lambda x: x.last_used)

    def _unmerge(self, lora: _Lora) -> bool:
        """Free ``lora``'s merged weights (and their context) unless a chat runs on them; its
        chats then use the LoRA applied at run time again."""
        with self._step_lock:
            engine = self._engine
            if engine is None or lora.merged is None:
                return lora.merged is None
            key = lora.key + MERGED_SUFFIX
            context = engine.contexts.get(key)
            if context is not None:
                if context.running:
                    return False
                del engine.contexts[key]
                self._free_context(context)
            with self._cond:
                model, lora.merged, lora.merging = lora.merged, None, False
            _lib().llama_model_free(model)
        log.info("adapter %s (%s) gave its merged weights' place to another adapter", lora.name, lora.key)
        return True

    def _maybe_merge(self, lora: _Lora, adapter_path: Path) -> None:
        """Start merging ``lora`` into a copy of the weights when it may take a merged place (see
        ``_merged_place``; a merge that failed is not tried again)."""
        with self._cond:
            if lora.merging or lora.merged is not None or lora.retired or self._closed \
                    or not self._merged_place(lora)[0]:
                return
            lora.merging = True
        threading.Thread(target=self._merge, args=(lora, adapter_path), name=f"merge:{lora.name}",
                         daemon=True).start()

    def merged_adapters_now(self) -> list[str]:
        """The adapters that now run from weights with the adapter merged in."""
        with self._cond:
            return sorted(x.name for x in self._loras.values() if x.merged is not None)

    def _merge(self, lora: _Lora, adapter_path: Path) -> None:
        """Build and load ``lora``'s merged weights (see MERGED_ADAPTERS), in the background: new
        chats with the adapter use them once loaded; until then the LoRA is applied at run time.
        Skipped when MERGED_ADAPTERS adapters are merged already, or the adapter left meanwhile."""
        from personal_gpt.models.gguf_files import merge_lora

        lib = _lib()
        with self._merge_lock:
            with self._cond:
                allowed, victim = self._merged_place(lora)
                if self._closed or lora.retired or not allowed:
                    lora.merging = False  # another adapter took the place first: try again later
                    return
            if victim is not None and not self._unmerge(victim):  # a chat started on it meanwhile
                with self._cond:
                    lora.merging = False
                return
            engine = self._engine
            if engine is None:
                return
            target = self._workdir / f"{lora.key}-merged.gguf"
            model = None
            try:
                _lower_thread_priority()  # chats being answered come first
                merge_lora(self.gguf_path, adapter_path, target, engine.shape)
                with self._step_lock:
                    if not self._closed and self._engine is engine:
                        params = lib.llama_model_default_params()
                        params.n_gpu_layers = 0
                        model = lib.llama_model_load_from_file(str(target).encode(), params)
                        if not model:
                            raise RuntimeError("llama_model_load_from_file returned NULL")
            except Exception as exc:  # anything the merge or llama.cpp raised: the LoRA keeps serving
                log.warning("adapter %s could not be merged into the weights (%s); it is applied at run time",
                            lora.name, exc)
                return
            finally:
                target.unlink(missing_ok=True)  # llama.cpp keeps what it mapped
                _return_freed_memory()  # the merge's float32 copies (~220 MB here) went to this thread's arena
            if not model:
                return
            with self._cond:
                keep = not self._closed and not lora.retired
                if keep:
                    lora.merged = model
                    self._cond.notify()
            if keep:
                log.info("adapter %s (%s) now runs from merged weights", lora.name, lora.key)
            else:
                with self._step_lock:
                    lib.llama_model_free(model)

    def forget_adapter(self, name: str) -> bool:
        forgotten = False
        with self._cond:
            lora = self._loras.pop(name, None)
            if lora is not None:
                lora.retired = True
                self._retired.append(lora)
                forgotten = True
            if name in self._torch_adapters:
                self._torch_adapters.discard(name)
        if lora is not None:
            self._sweep()
        if self._fallback is not None:
            forgotten = bool(self._fallback.forget_adapter(name)) or forgotten
        return forgotten

    def loaded_adapters(self) -> list[str]:
        with self._cond:
            names = set(self._loras)
        if self._fallback is not None:
            names.update(self._fallback.loaded_adapters())
        return sorted(names)

    def _sweep(self) -> None:
        """Free retired adapters no chat uses (and the sequences computed under them)."""
        with self._cond:
            ready = [x for x in self._retired if x.users == 0]
            self._retired = [x for x in self._retired if x.users != 0]
        if not ready:
            return
        lib = _lib()
        with self._step_lock:
            engine = self._engine
            for lora in ready:
                for key in (lora.key, lora.key + MERGED_SUFFIX):
                    context = engine.contexts.pop(key, None) if engine is not None else None
                    if context is not None:
                        self._free_context(context)
                lib.llama_adapter_lora_free(lora.handle)
                if lora.merged is not None:
                    lib.llama_model_free(lora.merged)
                    lora.merged = None
                log.info("adapter %s (%s) freed", lora.name, lora.key)

    # -- ChatModel -------------------------------------------------------------------------

    def encode(self, messages: list[Message]) -> list[int]:
        """Token ids of the prompt for these messages (chat template, generation prompt)."""
        self._ready()
        return chat_token_ids(self._tokenizer, self._encode_lock, messages, self.name)

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
        started = time.perf_counter()
        if not self._ready():
            return self.fallback().stream(messages, settings, cancel=cancel, usage=usage, adapter=adapter)
        lora = None
        if adapter is not None:
            lora = self._lora(adapter)
            if lora is None:
                return self.fallback().stream(messages, settings, cancel=cancel, usage=usage, adapter=adapter)
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
        return self._answer(request, usage, started, lora)

    def _answer(self, request: _Request, usage: Usage, started: float, lora: _Lora | None) -> Iterator[str]:
        if lora is not None:
            with self._cond:
                if lora.retired:
                    raise ModelError("This fine-tuned version was removed while the answer was starting; try again.")
                lora.users += 1
                lora.last_used = time.monotonic()
            request.adapter = lora
        try:
            self._submit(request)
        except BaseException:
            request.finish("error")
            raise
        yield from relay(request, self._tokenizer, usage, started, lambda: self._next_item(request))

    def _next_item(self, request: _Request):
        import queue

        while True:
            try:
                return request.out.get(timeout=1.0)
            except queue.Empty:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return _Done("error", "The model stopped unexpectedly; try again.")

    def clear_prefix_cache(self) -> None:
        """Forget the prompts kept in finished sequences (the next prompts are computed in full)."""
        engine = self._engine
        if engine is None:
            return
        with self._step_lock:
            for context in engine.contexts.values():
                for seq in context.seqs:
                    if seq.request is None:
                        self._free(context, seq, forget=True)
        if self._fallback is not None:
            self._fallback.clear_prefix_cache()

    def close(self) -> None:
        """Stop the scheduler, free llama.cpp's memory (and the fallback's)."""
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
        with self._load_lock, self._step_lock:
            engine, self._engine = self._engine, None
            if engine is not None:
                lib = _lib()
                for context in engine.contexts.values():
                    self._free_context(context)
                engine.contexts.clear()
                for lora in list(self._loras.values()) + self._retired:
                    lib.llama_adapter_lora_free(lora.handle)
                    if lora.merged is not None:
                        lib.llama_model_free(lora.merged)
                        lora.merged = None
                self._loras.clear()
                self._retired.clear()
                lib.llama_model_free(engine.model)
        if self._fallback is not None:
            self._fallback.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- the scheduler -------------------------------------------------------------------

    def _submit(self, request: _Request) -> None:
        self._enqueue(self._pending, request)

    def _enqueue(self, queue: deque, item: Any) -> None:
        """Hand ``item`` (a request or a call) to the scheduler thread, started if it is not running."""
        with self._cond:
            if self._closed:
                raise ModelError("This model has been shut down; reload the page to start it again.")
            queue.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"llama.cpp:{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._closed and not self._pending and not self._calls
                       and not (self._engine is not None and self._running(self._engine))):
                    self._cond.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for call in calls:
                call.run()
            engine = self._engine
            if engine is None:
                continue
            with self._cond:
                room = self.max_batch - sum(
                    1 for c in engine.contexts.values() for s in c.seqs if s.request is not None)
                admit = []
                while self._pending and len(admit) < room:
                    admit.append(self._pending.popleft())
            try:
                with self._step_lock:
                    for request in admit:
                        if request.stopped:
                            request.finish("cancelled")
                        else:
                            self._place(engine, request)
                    admit = []
                    self._step(engine)
                    self._trim_contexts(engine)
            except Exception:  # keep serving: fail the running chats only
                log.exception("llama.cpp step failed")
                for request in admit:
                    request.finish("error", "The model failed while answering; try again.")
                for context in engine.contexts.values():
                    for seq in context.seqs:
                        if seq.request is not None:
                            seq.request.finish("error", "The model failed while answering; try again.")
                            self._free(context, seq, forget=True)
            if self._retired:
                self._sweep()
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for call in calls:
            call.fail(ModelError("This model has been shut down; reload the page to start it again."))
        engine = self._engine
        for context in engine.contexts.values() if engine is not None else ():
            for seq in context.seqs:
                if seq.request is not None:
                    seq.request.finish("error", "The model was shut down before finishing; try again.")

    @staticmethod
    def _running(engine: _Engine) -> bool:
        return any(context.running for context in engine.contexts.values())

    def _context_for(self, engine: _Engine, request: _Request) -> _Ctx:
        key = request.adapter_key
        lora = request.adapter
        merged = lora.merged if lora is not None else None
        if merged is not None:
            key = lora.key + MERGED_SUFFIX  # the adapter's merged weights
        plain = engine.contexts.get(None)
        if key is None and plain is not None and plain.split and \
                len(request.prompt) + request.settings.max_new_tokens > plain.cells:
            key = LONG_KEY  # longer than a sequence's own cells
        context = engine.contexts.get(key)
        if context is None:
            if merged is not None:
                context = self._new_context(engine, None, key=key, model=merged)
            else:
                context = self._new_context(engine, lora, key=key if lora is None else None)
            engine.contexts[key] = context
        context.last_used = time.monotonic()
        return context

    def _trim_contexts(self, engine: _Engine) -> None:
        """Free the contexts of adapters no chat uses beyond the most recent few, and at once the
        run-time LoRA context of an adapter that now runs from merged weights."""
        with self._cond:
            superseded = [x.key for x in self._loras.values() if x.merged is not None]
        for key in superseded:
            context = engine.contexts.get(key)
            if context is not None and not context.running:
                del engine.contexts[key]
                self._free_context(context)
        idle = sorted((c for k, c in engine.contexts.items() if k is not None and not c.running),
                      key=lambda c: c.last_used)
        for context in idle[: max(0, len(idle) - IDLE_ADAPTER_CONTEXTS)]:
            del engine.contexts[context.key]
            self._free_context(context)

    def _place(self, engine: _Engine, request: _Request) -> None:
        """Give a request the free sequence (in its adapter's context) sharing the
        longest prompt prefix with it (its cells are kept), else the least recently used one."""
        import numpy as np

        context = self._context_for(engine, request)
        prompt = request.prompt
        running = [seq.seq_id for seq in context.seqs if seq.request is not None]

        def apart(seq: _Seq) -> int:  # split cache: a sequence next to the running ones leaves fewer gaps
            return min((abs(seq.seq_id - other) for other in running), default=0) if context.split else 0

        best, best_len = None, -1
        for seq in context.seqs:
            if seq.request is not None:
                continue
            n = min(_common(seq.tokens, prompt), len(prompt) - 1)  # the last prompt token is always fed
            if n < MIN_REUSE:
                n = 0
            if n > best_len or (n == best_len and (apart(seq), seq.last_used) < (apart(best), best.last_used)):
                best, best_len = seq, n
        seq = best
        _lib().llama_memory_seq_rm(context.memory, seq.seq_id, best_len, -1)
        seq.tokens = seq.tokens[:best_len]
        seq.leader = None
        for other in context.seqs:  # a running chat with the same instructions: share the cells it computes
            if other.request is None or other is seq:
                continue
            n = min(_common(other.request.prompt, prompt), len(prompt) - 1)
            if n >= best_len + MIN_REUSE and (seq.leader is None or n > seq.leader[2]):
                seq.leader = (other, other.request, n)
        seq.adapter, seq.request, seq.pending = request.adapter_key, request, None
        seq.last_used = time.monotonic()
        seq.seen = np.zeros(engine.n_vocab, dtype=bool)
        seq.seen[np.asarray(prompt, dtype=np.int64).clip(0, engine.n_vocab - 1)] = True
        seq.rng = None if request.settings.greedy else np.random.default_rng(int(request.settings.seed))
        seq.lookup = _Lookup(prompt) if self.draft_tokens > 0 else None
        seq.kept = 0.5

    def _free(self, context: _Ctx, seq: _Seq, forget: bool = False) -> None:
        seq.request, seq.pending, seq.seen, seq.rng, seq.leader, seq.lookup = None, None, None, None, None, None
        seq.last_used = time.monotonic()
        if forget:
            _lib().llama_memory_seq_rm(context.memory, seq.seq_id, -1, -1)
            seq.tokens = []

    def _step(self, engine: _Engine) -> None:
        """One llama_decode per context with running sequences: every decoding
        sequence feeds its last token, prefilling ones a chunk of their prompt."""
        for context in list(engine.contexts.values()):
            for seq in context.seqs:
                if seq.request is not None and seq.request.stopped:
                    seq.request.finish("cancelled")
                    self._free(context, seq)
            if context.running:
                self._decode(engine, context)

    def _decode(self, engine: _Engine, context: _Ctx) -> None:
        lib = _lib()
        seqs = [seq for seq in context.seqs if seq.request is not None]
        seqs.sort(key=lambda seq: seq.last_used)  # prompt chunks: oldest request first
        batch = context.batch
        rows: list[tuple[_Seq, list[int], int, str]] = []  # (sequence, tokens, first position, kind)

        decoding = [seq for seq in seqs if seq.pending is not None]
        speculate = 0 < len(decoding) <= SPECULATE_ROWS
        drafts: list[list[int]] = []
        used = 0
        for j, seq in enumerate(decoding):  # decoding rows first: their last token (and a guess at the next few)
            draft = []
            if speculate and seq.lookup is not None and seq.rng is None:  # greedy answers only: see DRAFT_TOKENS
                if seq.kept >= GUESS_FLOOR:
                    room = self.chunk - used - (len(decoding) - j)  # the batch keeps a place for every other row
                    draft = seq.lookup.draft(min(self._draft_room(seq), room))
                else:  # its recent guesses missed: try again after a few tokens
                    seq.kept += 0.02
            drafts.append(draft)
            used += 1 + len(draft)
        gaps: list[_Seq] = []
        if context.split and len(decoding) > 1:
            # one pass needs consecutive sequence ids feeding equal numbers of tokens: the same
            # number of guesses on every row, and a throw-away token for each sequence in between
            ids = {seq.seq_id for seq in decoding}
            gaps = [seq for seq in context.seqs if min(ids) < seq.seq_id < max(ids) and seq.seq_id not in ids
                    and (seq.request is None or not self._follow(context, seq))]  # not computing its prompt
            width = min(len(draft) for draft in drafts)
            while width > 0 and (len(decoding) + len(gaps)) * (1 + width) > self.chunk:
                width -= 1
            drafts = [draft[:width] for draft in drafts]
            gaps = [seq for seq in gaps if len(seq.tokens) + 1 + width <= context.cells]
            gaps = gaps[: max(0, self.chunk // (1 + width) - len(decoding))]
            for seq in gaps:
                rows.append((seq, [seq.tokens[-1] if seq.tokens else 0] * (1 + width), len(seq.tokens), "gap"))
        for seq, draft in zip(decoding, drafts):
            rows.append((seq, [seq.pending] + draft, len(seq.tokens), "decode"))
        n = sum(len(tokens) for _, tokens, _, _ in rows)
        for seq in seqs:  # then prompt chunks within the chunk budget
            if seq.pending is not None or not self._follow(context, seq):
                continue
            prompt = seq.request.prompt
            start = len(seq.tokens)
            take = min(len(prompt) - start, self.chunk - n)
            if take <= 0:
                continue
            rows.append((seq, prompt[start:start + take], start, "prompt"))
            n += take
        if n == 0:
            return
        if context.split:
            rows.sort(key=lambda row: row[0].seq_id)
        fed: list[tuple[_Seq, list[int], int | None]] = []  # (sequence, tokens fed, batch index of its logits)
        i = 0
        for seq, tokens, start, kind in rows:
            for offset, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + offset, 1
                batch.seq_id[i][0] = seq.seq_id
                batch.logits[i] = 1 if kind == "decode" or (
                    kind == "prompt" and start + offset == len(seq.request.prompt) - 1) else 0
                i += 1
            if kind == "decode":
                fed.append((seq, tokens, i - len(tokens)))
            elif kind == "prompt":
                fed.append((seq, tokens, i - 1 if start + len(tokens) == len(seq.request.prompt) else None))
        batch.n_tokens = n
        status = lib.llama_decode(context.ctx, batch)
        if status == 1 and not context.split:  # no room in the KV cache: drop kept prefixes and try once more
            for seq in context.seqs:
                if seq.request is None and seq.tokens:
                    self._free(context, seq, forget=True)
            status = lib.llama_decode(context.ctx, batch)
        for seq in gaps:  # the throw-away tokens' cells
            lib.llama_memory_seq_rm(context.memory, seq.seq_id, len(seq.tokens), -1)
        if status != 0:
            log.warning("llama_decode returned %s for %d tokens", status, n)
            message = ("There is not enough room for this many long chats at once; try again in a moment."
                       if status == 1 else "The model failed while answering; try again.")
            for seq, _, _ in fed:
                seq.request.finish("error", message)
                self._free(context, seq, forget=True)
            return
        for seq, tokens, index in fed:
            if seq.pending is not None:  # a decoding row (with a guess to check, or none)
                self._check_draft(engine, context, seq, tokens, index)
                continue
            seq.tokens.extend(tokens)
            if index is not None:
                self._advance(engine, context, seq, index)

    @staticmethod
    def _follow(context: _Ctx, seq: _Seq) -> bool:
        """For a sequence sharing its prompt's start with another running one: False while
        that one is still computing the shared part; then its cells are shared (no copy in
        a unified cache; a copy of its stream in a split one) and True: the rest of the prompt is
        computed as usual."""
        if seq.leader is None:
            return True
        leader, request, shared = seq.leader
        prompt = seq.request.prompt
        if leader.tokens[:shared] == prompt[:shared]:
            start = len(seq.tokens)
            if shared > start:
                lib = _lib()
                if context.split:  # across streams llama.cpp copies a whole stream: then cut it at ``shared``
                    lib.llama_memory_seq_cp(context.memory, leader.seq_id, seq.seq_id, -1, -1)
                    lib.llama_memory_seq_rm(context.memory, seq.seq_id, shared, -1)
                else:
                    lib.llama_memory_seq_cp(context.memory, leader.seq_id, seq.seq_id, start, shared)
                seq.tokens = list(prompt[:shared])
            seq.leader = None
            return True
        if leader.request is request and request is not None and len(leader.tokens) < shared:
            return False  # still computing it
        seq.leader = None  # the leader ended or was taken over before sharing: compute it here
        return True

    def _draft_room(self, seq: _Seq) -> int:
        """How many guessed tokens may follow the pending one: none past the answer's length limit."""
        request = seq.request
        return max(0, min(self.draft_tokens, request.settings.max_new_tokens - request.generated - 1))

    def _check_draft(self, engine: _Engine, context: _Ctx, seq: _Seq, fed: list[int], index: int) -> None:
        """Speculation: ``fed`` = the pending token + guessed ones, each with logits from ``index`` on.
        The guesses are kept while each is the token the model chooses there (greedy: its argmax;
        sampling: accepted with the model's probability for it, else another token is drawn without
        it, which samples exactly the model's distribution); the cells of the rest are removed."""
        seq.tokens.append(fed[0])
        before = len(seq.tokens)
        for i, guess in enumerate(fed[1:]):
            token = self._advance(engine, context, seq, index + i, guess=guess)
            if token != guess or seq.request is None:
                break
            seq.tokens.append(guess)  # its cells hold the right token: keep them
            seq.pending = None
        else:
            self._advance(engine, context, seq, index + len(fed) - 1)
        if len(fed) > 1:
            _lib().llama_memory_seq_rm(context.memory, seq.seq_id, len(seq.tokens), -1)
            seq.kept = 0.7 * seq.kept + 0.3 * (len(seq.tokens) - before) / (len(fed) - 1)

    def _advance(self, engine: _Engine, context: _Ctx, seq: _Seq, index: int, guess: int | None = None) -> int:
        import numpy as np

        lib = _lib()
        request = seq.request
        pointer = lib.llama_get_logits_ith(context.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(engine.n_vocab,))
        token = _choose(logits, request.settings, seq, guess)
        seq.seen[token] = True
        if request.stopped:
            request.finish("cancelled")
            self._free(context, seq)
        elif token in self._eos or lib.llama_vocab_is_eog(engine.vocab, token):
            request.finish("stop")
            self._free(context, seq)
        else:
            request.generated += 1
            request.out.put(token)
            if request.generated >= request.settings.max_new_tokens:
                request.finish("length")
                self._free(context, seq)
            else:
                seq.pending = token
                if seq.lookup is not None:
                    seq.lookup.add(token)
        return token


# --- helpers ----------------------------------------------------------------------------

def _choose(logits, settings: GenerationSettings, seq: _Seq, guess: int | None = None) -> int:
    """Next token: repetition penalty (as transformers' processor), then greedy, or
    temperature + top-p sampling with the sequence's seeded generator. With a ``guess``
    (speculation), sampling keeps it with the probability the model gives it and otherwise
    draws from the rest: the same distribution as drawing directly (the engine guesses for greedy
    answers only, see DRAFT_TOKENS; sampling with guesses is kept exact for when it pays)."""
    import numpy as np

    penalty = float(settings.repetition_penalty)
    if penalty != 1.0:
        logits = logits.copy()
        seen = seq.seen
        values = logits[seen]
        logits[seen] = np.where(values < 0, values * penalty, values / penalty)
    if seq.rng is None:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / float(settings.temperature)
    scores -= scores.max()
    probs = np.exp(scores)
    probs /= probs.sum()
    tokens = None  # the candidates (None: the whole vocabulary) and their probabilities
    if settings.top_p < 1.0:
        tokens = _nucleus(probs, float(settings.top_p))
        probs = probs[tokens] / probs[tokens].sum()
    if guess is not None:
        where = int(guess) if tokens is None else np.flatnonzero(tokens == guess)
        chance = probs[where].sum() if tokens is not None else probs[where]
        if seq.rng.random() < chance:
            return int(guess)
        probs = probs.copy()
        probs[where] = 0.0
        total = probs.sum()
        if total <= 0.0:
            return int(guess)
        probs /= total
    index = int(seq.rng.choice(len(probs), p=probs))
    return index if tokens is None else int(tokens[index])


def _nucleus(probs, top_p: float, first: int = 256):
    """The most probable tokens whose probabilities first reach ``top_p`` (most probable first).
    Sorting the whole vocabulary for every token took ~3 ms here; the nucleus nearly always
    lies within the ``first`` most probable, which are found without a full sort."""
    import numpy as np

    if len(probs) > first:
        top = np.argpartition(-probs, first - 1)[:first]
        top = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[top])
        if cumulative[-1] >= top_p:
            return top[: int(np.searchsorted(cumulative, top_p)) + 1]
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return order[: int(np.searchsorted(cumulative, top_p)) + 1]


class _Lookup:
    """Prompt-lookup guesses: where the last DRAFT_NGRAM tokens occurred before (in the prompt or
    the answer), the tokens that followed them then. Answers from knowledge files copy names,
    figures and whole phrases from the prompt, which these guesses get right."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed its latest occurrence
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        tokens = self.tokens
        if len(tokens) >= DRAFT_NGRAM:
            self.after[tuple(tokens[-DRAFT_NGRAM:])] = len(tokens)
        tokens.append(token)

    def draft(self, k: int) -> list[int]:
        if k <= 0 or len(self.tokens) < DRAFT_NGRAM:
            return []
        start = self.after.get(tuple(self.tokens[-DRAFT_NGRAM:]))
        return [] if start is None else self.tokens[start:start + k]


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _return_freed_memory() -> None:
    """Hand memory freed by large temporary arrays back to the system (glibc keeps it in the
    freeing thread's arena otherwise: after a merge, ~220 MB of RSS here until malloc_trim)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def _lower_thread_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread), so background
    work such as merging an adapter leaves the cores to the chats being answered."""
    try:
        import os

        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _cpu_threads() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)
