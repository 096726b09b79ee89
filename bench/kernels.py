"""Our llama.cpp CPU kernels against llama.cpp's own, on our chat path, in one process.

    PERSONAL_GPT_MODEL_CACHE=/tmp/pgpt-model-cache .venv/bin/python bench/kernels.py [--rounds 3]

One loaded model (the bundled SmolLM2 on our llama.cpp path, default weights). The kernels are
switched per round (``PGPT_GGML_STOCK_FA`` / ``PGPT_GGML_STOCK_GEMM``, read by the patched library
on every operation), and the rounds alternate, so machine load falls on both alike:

- time to first token, cold (whole ~635-token prompt) and warm (same instructions, new question);
- decode tokens/s on the bench's first question and over six questions (greedy, 128 new tokens);
- tokens/s of 1, 4 and 8 chats started together;
- plain llama-cpp-python on the shipped Q4_1 file, decoding the same questions, as the baseline
  (every round, after ours and stock, on our model's llama.cpp thread: one OpenMP team in the process).

Medians over the rounds. Needs the build scripts/setup.sh makes (third_party/llama.cpp).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from local_speed import QUESTIONS, _greedy, _messages, chats_together  # noqa: E402

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.models.base import Usage  # noqa: E402
from personal_gpt.models.bundled import bundled_gguf_path, bundled_local_model, llamacpp_weights  # noqa: E402

KERNELS = {"ours": {}, "stock": {"PGPT_GGML_STOCK_FA": "1", "PGPT_GGML_STOCK_GEMM": "1"}}
NEW = 128


def use(kernels: str) -> None:
    for name in ("PGPT_GGML_STOCK_FA", "PGPT_GGML_STOCK_GEMM"):
        os.environ.pop(name, None)
    os.environ.update(KERNELS[kernels])


def one(model, messages, new: int) -> Usage:
    usage = Usage()
    for _ in model.stream(messages, _greedy(new), usage=usage):
        pass
    return usage


def decode_rate(usage: Usage) -> float:
    return (usage.completion_tokens - 1) / (usage.total_s - usage.first_token_s)


def round_of(model) -> dict:
    result = {}
    model.clear_prefix_cache()
    first = one(model, _messages(QUESTIONS[0]), NEW)
    result["ttft"], result["decode q1"] = first.first_token_s, decode_rate(first)
    result["ttft warm"] = one(model, _messages(QUESTIONS[2]), 1).first_token_s
    tokens = seconds = 0.0
    for question in QUESTIONS[:6]:
        usage = one(model, _messages(question), NEW)
        tokens += usage.completion_tokens - 1
        seconds += usage.total_s - usage.first_token_s
    result["decode 6q"] = tokens / seconds
    for n in (1, 4, 8):
        model.clear_prefix_cache()
        result[f"{n} chats"] = chats_together(model.stream, n, NEW)[0]
    return result


class PlainQ41:
    """Plain llama-cpp-python on the shipped Q4_1 file: decode tokens/s on the same questions, greedy,
    stopping at the end of the answer as our path does."""

    def __init__(self, tokenizer):
        from llama_cpp import Llama

        threads = len(os.sched_getaffinity(0))
        self.tokenizer = tokenizer
        self.llm = Llama(model_path=str(bundled_gguf_path()), n_ctx=2048, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)

    def decode(self, question: str) -> tuple[int, float]:
        text = self.tokenizer.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.llm.reset()
        first, out = None, 0
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            if token == self.llm._token_eos or token in self.tokenizer.all_special_ids:
                break
            out += 1
            if out >= NEW:
                break
        return out - 1, time.perf_counter() - first

    def round(self) -> dict:
        tokens, took = self.decode(QUESTIONS[0])
        result = {"decode q1": tokens / took}
        total = seconds = 0.0
        for question in QUESTIONS[:6]:
            tokens, took = self.decode(question)
            total, seconds = total + tokens, seconds + took
        result["decode 6q"] = total / seconds
        return result

    def close(self) -> None:
        self.llm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per kernel set (alternating)")
    parser.add_argument("--torch-threads", type=int, default=0, metavar="N",
                        help="first compute with torch on N threads on the main thread for 3 s, as the app's "
                             "embedder does (a second OpenMP team in the process; see personal_gpt/__init__.py)")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
        a, started = torch.randn(512, 512), time.perf_counter()
        while time.perf_counter() - started < 3:
            a @ a
    print(f"libgomp: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}; torch first on "
          f"{args.torch_threads or 'no'} threads", flush=True)
    from personal_gpt.models.llamacpp import kernels_version

    if not kernels_version():
        print("the installed llama.cpp has llama.cpp's stock kernels only: set up with scripts/setup.sh "
              "(PGPT_LLAMACPP=1) to build ours")
        return 1
    settings = Settings.from_env()
    model = bundled_local_model(settings, backend="llama.cpp")
    model.load()
    if model.serving != "llama.cpp":
        print(f"our llama.cpp path did not load: {model._broken}")
        return 1
    load = os.getloadavg()
    print(f"our llama.cpp path, {llamacpp_weights()} weights, kernels v{kernels_version()}; {NEW} new tokens, "
          f"greedy; {args.rounds} alternating rounds; load average at start {load[0]:.2f}", flush=True)
    one(model, _messages(QUESTIONS[1]), 4)  # warm-up
    # the baseline runs on our model's llama.cpp thread too: llama.cpp's OpenMP teams on two threads of one
    # process slow each other down (see LlamaCppModel._on_llama_thread), which would bias both rows
    plain = model._on_llama_thread(lambda: PlainQ41(model._tokenizer))
    rows: dict[str, list[dict]] = {name: [] for name in KERNELS}
    baseline_rounds: list[dict] = []
    for r in range(args.rounds):
        for name in (KERNELS if r % 2 == 0 else list(KERNELS)[::-1]):
            use(name)
            rows[name].append(round_of(model))
            print(f"  round {r + 1}, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[name][-1].items()),
                  flush=True)
        use("ours")
        baseline_rounds.append(model._on_llama_thread(plain.round))
        print(f"  round {r + 1}, plain Q4_1: " + ", ".join(f"{k} {v:.2f}" for k, v in baseline_rounds[-1].items()),
              flush=True)
    model._on_llama_thread(plain.close)
    model.close()
    baseline = {k: statistics.median(r[k] for r in baseline_rounds) for k in baseline_rounds[0]}
    keys = list(rows["ours"][0])
    print()
    print(f"{'kernels':34} " + " ".join(f"{k:>10}" for k in keys))
    medians = {name: {k: statistics.median(r[k] for r in rounds) for k in keys} for name, rounds in rows.items()}
    for name, m in medians.items():
        print(f"{'ours, ' + name + ' kernels':34} " + " ".join(f"{m[k]:10.2f}" for k in keys))
    print(f"{'plain llama-cpp-python, Q4_1':34} " + " ".join(
        f"{baseline[k]:10.2f}" if k in baseline else f"{'-':>10}" for k in keys))
    print(f"{'ours / stock':34} " + " ".join(f"{medians['ours'][k] / medians['stock'][k]:9.2f}x" for k in keys))
    print("(ttft, ttft warm: seconds; decode: tokens/s of one chat, first question and six questions; "
          "n chats: aggregate tokens/s of n chats started together)")
    print(f"8 chats vs 1: ours {medians['ours']['8 chats'] / medians['ours']['1 chats']:.2f}x, "
          f"stock {medians['stock']['8 chats'] / medians['stock']['1 chats']:.2f}x; "
          f"decode vs plain Q4_1 (6 questions): ours {medians['ours']['decode 6q'] / baseline['decode 6q']:.2f}x, "
          f"stock {medians['stock']['decode 6q'] / baseline['decode 6q']:.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
