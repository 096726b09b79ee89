"""Benchmark: local chat speed on the bundled model, every path in one process and run.

Owns: timing plain transformers fp32 ``generate``, our torch path (``LocalModel``)
without and with a LoRA adapter, plain llama-cpp-python (``Llama``, the shipped Q4_1
GGUF) and our llama.cpp path (``LlamaCppModel``) without and with the adapter (merged
into a copy of the weights, the default, and applied at run time), when
llama-cpp-python is installed: time to first token (~680-token prompt), decode
tokens/s, aggregate tokens/s for 1/4/8 chats at once, peak memory, and answers
against fp32 greedy on 10 fixed prompts. Must not download anything.

    .venv/bin/python bench/local_speed.py [--quick] [--home DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from chat import QUESTIONS as CHAT_QUESTIONS  # noqa: E402
from chat import SYSTEM_PROMPT  # noqa: E402

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.base import AdapterRef, Usage  # noqa: E402
from personal_gpt.models.bundled import BUNDLED_ID, BUNDLED_NAME, ensure_bundled_model  # noqa: E402

QUESTIONS = CHAT_QUESTIONS + [
    "What can I plant in late summer for a harvest in autumn and winter? Explain sowing, spacing and protection.",
    "How do I start a compost heap in our three bays, and what should and should not go in? Be detailed.",
    "Give me a week-by-week plan for growing potatoes in bags, including how to avoid blight.",
    "How do I keep pigeons and cabbage white butterflies off my brassicas without chemicals? List every method.",
]
QUALITY_PROMPTS = [  # 10 fixed prompts: (system or None, user)
    (None, "What is the capital of France?"),
    (None, "Write a haiku about autumn leaves."),
    (None, "Explain in two sentences why the sky is blue."),
    (None, "List three benefits of regular exercise."),
    (None, "How do I boil an egg?"),
    ("You are a helpful assistant who answers briefly.", "What does a bee do in a garden?"),
    ("You are a friendly cooking assistant.", "Give me a simple recipe for tomato soup."),
    ("You answer like a patient teacher.", "What is photosynthesis?"),
    (SYSTEM_PROMPT, "When should I sow carrots, and how do I stop carrot fly?"),
    (SYSTEM_PROMPT, "Can I put rhubarb leaves in the compost?"),
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _messages(question: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def _greedy(max_new: int) -> GenerationSettings:
    return GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new)


# --- memory: peak resident set size over a phase --------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples RSS every 10 ms; ``peak - start`` is what the phase added."""

    def __enter__(self):
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def added(self) -> float:
        return self.peak - self.start


# --- the adapter: seeded random LoRA B (rank 16 on every linear layer, as our trainer) ---

def make_adapter(model_dir: Path, folder: Path) -> AdapterRef:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # A and B seeded: the same adapter every run
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.peft_config["default"].base_model_name_or_path = f"bundled:{BUNDLED_ID}"
    peft_model.save_pretrained(folder, safe_serialization=True)
    return AdapterRef(name="bench-adapter", path=folder, label="bench adapter")


# --- plain transformers fp32: the baseline and the quality reference ---------------------

def plain_transformers(model_dir: Path, adapter: AdapterRef, max_new: int, quality_new: int, repeats: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()

    def encode(messages):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    class Stamp(LogitsProcessor):
        first = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            return scores

    def generate(m, prompts: list[list[int]], new: int, stamp=None):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=LogitsProcessorList([stamp] if stamp else []))
        return [_strip(row[width:].tolist(), tokenizer) for row in out]

    result: dict = {"tokenizer": tokenizer}
    with PeakRss() as mem:
        generate(model, [encode(_messages(QUESTIONS[1]))], 4)  # warm-up
        ttfts, tps = [], []
        for _ in range(repeats):
            stamp = Stamp()
            started = time.perf_counter()
            out = generate(model, [encode(_messages(QUESTIONS[0]))], max_new, stamp)[0]
            ended = time.perf_counter()
            ttfts.append(stamp.first - started)
            tps.append((len(out) - 1) / (ended - stamp.first))
        result["ttft"], result["decode"] = statistics.median(ttfts), statistics.median(tps)
        conc = {}
        for n in (1, 4, 8):  # batched generate of n chats (left-padded): its aggregate tokens/s
            prompts = [encode(_messages(QUESTIONS[i])) for i in range(n)]
            started = time.perf_counter()
            outs = generate(model, prompts, max_new)
            conc[n] = sum(len(o) for o in outs) / (time.perf_counter() - started)
        result["concurrent"] = conc
        result["reference"] = [generate(model, [encode(_messages(u, s))], quality_new)[0] for s, u in QUALITY_PROMPTS]
    result["memory"] = mem.added
    peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False).eval()
    result["reference_adapter"] = [generate(peft_model, [encode(_messages(u, s))], quality_new)[0]
                                   for s, u in QUALITY_PROMPTS]
    del peft_model, model
    gc.collect()
    return result


def _strip(ids: list[int], tokenizer) -> list[int]:
    """Generated ids up to (not including) the end of the answer."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


# --- a ChatModel (ours: torch or llama.cpp) ------------------------------------------------

def chats_together(stream, n: int, max_new: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, sorted first-token seconds) of ``n`` greedy chats on QUESTIONS[:n] started
    together, each on its own thread; ``stream`` is a model's ``stream``."""
    usages = [Usage() for _ in range(n)]

    def chat(i: int) -> None:
        for _ in stream(_messages(QUESTIONS[i]), _greedy(max_new), usage=usages[i]):
            pass

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (sum(u.completion_tokens for u in usages) / (time.perf_counter() - started),
            sorted(u.first_token_s for u in usages))


def chat_model_phase(model, adapter: AdapterRef | None, max_new: int, quality_new: int, repeats: int,
                     tokenizer, reference: list[list[int]]) -> dict:
    stream = model.stream if adapter is None else (
        lambda m, s, usage=None: model.stream(m, s, usage=usage, adapter=adapter))

    def one(messages, new):
        usage = Usage()
        text = "".join(stream(messages, _greedy(new), usage=usage))
        return usage, text

    result: dict = {}
    with PeakRss() as mem:
        if adapter is not None:
            model.load_adapter(adapter)
            if getattr(model, "merged_adapters", 0):  # llama.cpp merges it in the background: time that path
                started = time.perf_counter()
                while adapter.name not in model.merged_adapters_now() and time.perf_counter() - started < 300:
                    time.sleep(0.1)
                result["merge_s"] = time.perf_counter() - started
                print(f"  adapter merged into the weights after {result['merge_s']:.1f} s", flush=True)
        else:
            model.load()
        one(_messages(QUESTIONS[1]), 4)  # warm-up
        ttfts, tps, warm = [], [], []
        for _ in range(repeats):
            model.clear_prefix_cache()  # cold: the whole prompt is computed
            usage, _ = one(_messages(QUESTIONS[0]), max_new)
            ttfts.append(usage.first_token_s)
            tps.append((usage.completion_tokens - 1) / (usage.total_s - usage.first_token_s))
            warm.append(one(_messages(QUESTIONS[2]), 1)[0].first_token_s)  # same instructions, new question
        result["ttft"], result["decode"], result["ttft_warm"] = (
            statistics.median(ttfts), statistics.median(tps), statistics.median(warm))
        conc, firsts = {}, {}
        for n in (1, 4, 8):
            model.clear_prefix_cache()
            conc[n], firsts[n] = chats_together(stream, n, max_new)
        result["concurrent"], result["first_tokens"] = conc, firsts
        model.clear_prefix_cache()
        answers = [one(_messages(u, s), quality_new)[1] for s, u in QUALITY_PROMPTS]
    result["memory"] = mem.added
    result["quality"] = quality([tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers],
                                reference, tokenizer)
    return result


def quality(answers: list[list[int]], reference: list[list[int]], tokenizer) -> tuple[int, float, float]:
    """(exact matches, mean and minimum share of the reference's tokens matched before
    the first difference). Texts are compared re-tokenized, so ids match if texts do."""
    exact, shares = 0, []
    for got, want in zip(answers, reference):
        want = tokenizer(tokenizer.decode(want, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(got), len(want)) and got[n] == want[n]:
            n += 1
        exact += got == want
        shares.append(n / max(1, len(want)) if got != want else 1.0)
    return exact, statistics.mean(shares), min(shares)


# --- plain llama-cpp-python (the llama.cpp row) -------------------------------------

def plain_llamacpp(gguf: Path, threads: int, max_new: int, quality_new: int, repeats: int, tokenizer,
                   reference: list[list[int]], encode) -> dict:
    from llama_cpp import Llama

    result: dict = {}
    with PeakRss() as mem:
        llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    verbose=False)

        def run(ids: list[int], new: int) -> tuple[float, float, list[int]]:
            llm.reset()  # no reuse of the previous prompt: cold
            started = time.perf_counter()
            first, out = None, []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                if first is None:
                    first = time.perf_counter()
                if llm._token_eos == token or token in tokenizer.all_special_ids:
                    break
                out.append(token)
                if len(out) >= new:
                    break
            ended = time.perf_counter()
            return first - started, (len(out) - 1) / max(1e-9, ended - first), out

        run(encode(_messages(QUESTIONS[1])), 4)
        ttfts, tps = [], []
        for _ in range(repeats):
            t, d, _ = run(encode(_messages(QUESTIONS[0])), max_new)
            ttfts.append(t)
            tps.append(d)
        result["ttft"], result["decode"] = statistics.median(ttfts), statistics.median(tps)
        conc = {}
        for n in (1, 4, 8):  # one sequence at a time: chats wait for each other
            started = time.perf_counter()
            total = sum(len(run(encode(_messages(QUESTIONS[i])), max_new)[2]) for i in range(n))
            conc[n] = total / (time.perf_counter() - started)
        result["concurrent"] = conc
        answers = [run(encode(_messages(u, s)), quality_new)[2] for s, u in QUALITY_PROMPTS]
    result["memory"] = mem.added
    result["quality"] = quality([tokenizer(tokenizer.decode(a), add_special_tokens=False)["input_ids"]
                                 for a in answers], reference, tokenizer)
    llm.close()
    gc.collect()
    return result


def on_own_thread(fn):
    """``fn()`` run on a new thread, which ends with it (its OpenMP team with it)."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="plain-llama.cpp")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# --- the report --------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, one repeat (a smoke run)")
    parser.add_argument("--home", type=Path, help="PERSONAL_GPT_HOME to use (its model cache is reused)")
    parser.add_argument("--threads", type=int, default=0, help="threads for every path (0: all cores)")
    parser.add_argument("--skip-torch", action="store_true", help="leave out our torch path (plain fp32 stays)")
    parser.add_argument("--weights", default="", help="weight types for our llama.cpp path, comma-separated "
                        "(default: the shipped default); the adapter rows use the first")
    parser.add_argument("--kv", default="split", help="llama.cpp KV cache layouts for our path, comma-separated: "
                        "split (each chat its own cells, the default) and/or unified (one cache shared by all); "
                        "each row runs with every layout")
    parser.add_argument("--no-stock-kernels", action="store_true", help="leave out the row of our llama.cpp path "
                        "on llama.cpp's stock kernels (run when the installed build carries ours)")
    args = parser.parse_args()
    if args.home:
        os.environ["PERSONAL_GPT_HOME"] = str(args.home)
    settings = Settings.from_env()
    max_new, quality_new, repeats = (24, 16, 1) if args.quick else (128, 48, 3)

    import torch

    from personal_gpt.models.bundled import (
        MERGED_ENV,
        SEQ_CELLS_ENV,
        WEIGHTS_ENV,
        bundled_gguf_path,
        bundled_local_model,
        ensure_llamacpp_gguf,
        llamacpp_weights,
    )
    from personal_gpt.models.llamacpp import kernels_version, llamacpp_installed

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    import dataclasses

    settings = dataclasses.replace(settings, torch_threads=threads)
    model_dir = ensure_bundled_model(settings)
    work = Path(tempfile.mkdtemp(prefix="pgpt-bench-"))
    adapter = make_adapter(model_dir, work / "adapter")
    load = os.getloadavg()
    print(f"{BUNDLED_NAME}; torch {torch.__version__}, {threads} threads; {max_new} new tokens, greedy, "
          f"median of {repeats}; quality: {quality_new} new tokens on {len(QUALITY_PROMPTS)} prompts; "
          f"load average at start {load[0]:.2f}", flush=True)
    if llamacpp_installed():
        print(f"llama.cpp kernels: {f'ours, v{kernels_version()}' if kernels_version() else 'stock'}", flush=True)

    rows: dict[str, dict] = {}
    print("plain transformers fp32 ...", flush=True)
    plain = plain_transformers(model_dir, adapter, max_new, quality_new, repeats)
    tokenizer = plain["tokenizer"]
    plain["quality"] = (len(QUALITY_PROMPTS), 1.0, 1.0)
    rows["transformers fp32 generate"] = plain

    def encode(messages):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    print(f"prompt {len(encode(_messages(QUESTIONS[0])))} tokens", flush=True)
    if not args.skip_torch:
        print("ours, torch path ...", flush=True)
        ours = bundled_local_model(settings, backend="torch")
        rows["ours torch"] = chat_model_phase(ours, None, max_new, quality_new, repeats, tokenizer, plain["reference"])
        rows["ours torch + adapter"] = chat_model_phase(ours, adapter, max_new, quality_new, repeats, tokenizer,
                                                        plain["reference_adapter"])
        ours.close()
        del ours
        gc.collect()
    if llamacpp_installed():
        print("plain llama-cpp-python, shipped Q4_1 file ...", flush=True)
        # on a thread of its own that then ends: llama.cpp's OpenMP team left on the main thread slowed every
        # later llama.cpp row down (decode 80 against 117 tokens/s for ours, bench/kernels.py)
        rows["llama-cpp-python Q4_1"] = on_own_thread(lambda: plain_llamacpp(
            bundled_gguf_path(), threads, max_new, quality_new, repeats, tokenizer, plain["reference"], encode))
        layouts = [k.strip() for k in args.kv.split(",") if k.strip()]
        for i, weights in enumerate(args.weights.split(",") if args.weights else [llamacpp_weights()]):
            for layout in layouts:
                label = f"{weights}" + ("" if layout == "split" else f" {layout}")
                print(f"ours, llama.cpp path, {weights} weights, {layout} KV cache ...", flush=True)
                os.environ[WEIGHTS_ENV] = weights
                os.environ[SEQ_CELLS_ENV] = "0" if layout == "unified" else ""
                ensure_llamacpp_gguf(settings)
                ours = bundled_local_model(settings, backend="llama.cpp")
                if ours.serving != "llama.cpp":
                    print(f"our llama.cpp path did not load: {ours._broken}")
                rows[f"ours llama.cpp {label}"] = chat_model_phase(ours, None, max_new, quality_new, repeats,
                                                                   tokenizer, plain["reference"])
                if i == 0:
                    rows[f"ours llama.cpp {label} + adapter"] = chat_model_phase(
                        ours, adapter, max_new, quality_new, repeats, tokenizer, plain["reference_adapter"])
                ours.close()
                del ours
                gc.collect()
                if i == 0 and layout == layouts[0]:  # the adapter applied at run time, as before merging
                    print(f"ours, llama.cpp path, {weights} weights, adapter applied at run time ...", flush=True)
                    os.environ[MERGED_ENV] = "0"
                    ours = bundled_local_model(settings, backend="llama.cpp")
                    rows[f"ours llama.cpp {label} + adapter, run-time LoRA"] = chat_model_phase(
                        ours, adapter, max_new, quality_new, repeats, tokenizer, plain["reference_adapter"])
                    os.environ[MERGED_ENV] = ""
                    ours.close()
                    del ours
                    gc.collect()
                if i == 0 and layout == layouts[0] and kernels_version() and not args.no_stock_kernels:
                    # the same path on llama.cpp's own attention loop and products (the patch's switches)
                    print(f"ours, llama.cpp path, {weights} weights, llama.cpp's stock kernels ...", flush=True)
                    os.environ["PGPT_GGML_STOCK_FA"] = os.environ["PGPT_GGML_STOCK_GEMM"] = "1"
                    ours = bundled_local_model(settings, backend="llama.cpp")
                    rows[f"ours llama.cpp {label}, stock kernels"] = chat_model_phase(
                        ours, None, max_new, quality_new, repeats, tokenizer, plain["reference"])
                    ours.close()
                    del ours
                    gc.collect()
                    del os.environ["PGPT_GGML_STOCK_FA"], os.environ["PGPT_GGML_STOCK_GEMM"]
    else:
        print("llama-cpp-python is not installed: the llama.cpp rows are left out")

    print()
    head = f"{'path':46} {'TTFT s':>7} {'warm s':>7} {'dec t/s':>8} {'1 chat':>7} {'4 chats':>8} {'8 chats':>8} " \
           f"{'8x/1x':>6} {'mem MB':>7} {'exact':>6} {'overlap':>8} {'min':>5}"
    print(head)
    for name, r in rows.items():
        c = r["concurrent"]
        warm = f"{r['ttft_warm']:7.3f}" if "ttft_warm" in r else f"{'-':>7}"
        q = r["quality"]
        print(f"{name:46} {r['ttft']:7.3f} {warm} {r['decode']:8.1f} {c[1]:7.1f} {c[4]:8.1f} {c[8]:8.1f} "
              f"{c[8] / c[1]:6.2f} {r['memory']:7.0f} {q[0]:>3}/{len(QUALITY_PROMPTS):<2} {q[1]:8.3f} {q[2]:5.2f}")
    print("(TTFT: cold, ~680-token prompt; warm: same instructions, new question; 1/4/8 chats: aggregate tokens/s "
          "of chats started together (plain transformers: batched generate; plain llama-cpp-python: one after "
          "another); mem: peak RSS added by the phase; exact/overlap/min: answers vs transformers fp32 greedy "
          "(with the adapter: plain peft fp32), overlap = share of the reference's tokens matched before the "
          "first difference)")
    for name, r in rows.items():
        if "first_tokens" in r:
            print(f"first-token times, 8 chats at once, {name}: "
                  + ", ".join(f"{t:.2f}" for t in r["first_tokens"][8]))
    print()
    reference_names = ["transformers fp32 generate"] + (["llama-cpp-python Q4_1"] if "llama-cpp-python Q4_1" in rows else [])
    for ref_name in reference_names:
        ref = rows[ref_name]
        for name, r in rows.items():
            if name == ref_name or name in reference_names:
                continue
            print(f"vs {ref_name:26} {name:26} TTFT {r['ttft'] / ref['ttft']:5.2f}x  "
                  f"decode {r['decode'] / ref['decode']:5.2f}x  8 chats {r['concurrent'][8] / ref['concurrent'][8]:5.2f}x")
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f}")
    if args.quick:
        print("(--quick: few tokens, one run: a smoke test, not figures to quote)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
