"""Benchmark: eight chats at once on our llama.cpp path, per KV cache layout, in one process.

Owns: timing 8 greedy chats started together on ``LlamaCppModel`` with each chat's own KV
cells (split, the default) and with one cache shared by all (unified, the former default),
for chats sharing their instructions (8 visitors of one GPT) and for chats with different
instructions (8 GPTs), beside plain llama-cpp-python (``Llama``, the same weights) answering
the same chats one after another. Prints wall time, aggregate tokens/s, first-token
times and whether each answer equals the one the chat gets alone. Must not download anything.

    .venv/bin/python bench/kv_layout.py [--rounds 2] [--max-new 128] [--weights BF16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from local_speed import QUESTIONS, _greedy, _messages  # noqa: E402

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.models.bundled import BUNDLED_ID, ensure_bundled_model, ensure_llamacpp_gguf  # noqa: E402

SHOPS = ["bakery", "bike repair shop", "yoga studio", "law firm", "dental clinic", "bookshop", "garden centre",
         "language school"]


def distinct(i: int) -> list[dict]:
    """Chat i of 8 GPTs: ~850-token instructions of its own, then one of the bench's questions."""
    shop = SHOPS[i]
    facts = " ".join(f"Fact {k} about the {shop}: it has item number {k * 7 + i} in stock and opens at "
                     f"{k % 12 + 1} o'clock." for k in range(30))
    return _messages(QUESTIONS[i], f"You are the assistant of a {shop}. {facts}")


def shared(i: int) -> list[dict]:
    """Chat i of 8 visitors of one GPT: the bench's instructions, one of its questions."""
    return _messages(QUESTIONS[i])


def together(model, chats: list[list[dict]], settings) -> dict:
    """Start every chat at once; wall time, tokens, first-token times, answers."""
    first = [0.0] * len(chats)
    answers: list[str] = [""] * len(chats)
    tokens = [0] * len(chats)
    started = time.perf_counter()

    def run(i: int) -> None:
        parts = []
        for part in model.stream(chats[i], settings):
            if not parts:
                first[i] = time.perf_counter() - started
            parts.append(part)
        answers[i] = "".join(parts)
        tokens[i] = len(model.encode([{"role": "assistant", "content": answers[i]}]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"wall": wall, "tokens": sum(tokens), "first": sorted(first), "answers": answers}


def plain_one_after_another(gguf: Path, chats, encode, max_new: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    started, total, first = time.perf_counter(), 0, []
    for messages in chats:
        llm.reset()
        out = 0
        for token in llm.generate(encode(messages), temp=0.0, top_k=1, repeat_penalty=1.0):
            if out == 0:
                first.append(time.perf_counter() - started)
            if token == llm.token_eos():
                break
            out += 1
            if out >= max_new:
                break
        total += out
    wall = time.perf_counter() - started
    llm.close()
    return {"wall": wall, "tokens": total, "first": first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every layout (interleaved)")
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--weights", default="", help="weight type (default: the shipped default)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    from personal_gpt.models.bundled import llamacpp_weights
    from personal_gpt.models.llamacpp import SEQ_CELLS, LlamaCppModel, llamacpp_installed

    if not llamacpp_installed():
        print("llama-cpp-python is not installed: nothing to measure")
        return 1
    settings = Settings.from_env()
    weights = args.weights or llamacpp_weights()
    gguf = ensure_llamacpp_gguf(settings, weights)
    model_dir = ensure_bundled_model(settings)
    threads = args.threads or len(os.sched_getaffinity(0))
    greedy = _greedy(args.max_new)
    print(f"8 chats at once, {weights} weights, {threads} threads, {args.max_new} new tokens, greedy; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    layouts = {"split": SEQ_CELLS, "unified": 0}
    scenarios = {"one GPT (shared instructions)": shared, "8 GPTs (own instructions)": distinct}
    results: dict = {}
    alone: dict = {}
    for round_ in range(args.rounds):
        for layout, cells in layouts.items():
            model = LlamaCppModel(gguf, model_dir, "bench", base_id=f"bundled:{BUNDLED_ID}", fallback=lambda: None,
                                  threads=threads, seq_cells=cells)
            try:
                model.load()
                for name, make in scenarios.items():
                    chats = [make(i) for i in range(8)]
                    if (name, layout) not in alone:
                        answers = []
                        for messages in chats:
                            model.clear_prefix_cache()
                            answers.append("".join(model.stream(messages, greedy)))
                        alone[(name, layout)] = answers
                    "".join(model.stream(chats[0], _greedy(4)))  # a short answer first (graphs planned) ...
                    model.clear_prefix_cache()  # ... then nothing kept: every chat starts from its whole prompt
                    result = together(model, chats, greedy)
                    result["same"] = sum(a == b for a, b in zip(result["answers"], alone[(name, layout)]))
                    results.setdefault((name, layout), []).append(result)
                    print(f"  round {round_ + 1} {layout:8} {name:30} {result['wall']:6.2f} s "
                          f"{result['tokens'] / result['wall']:6.1f} tok/s", flush=True)
            finally:
                model.close()
    tokenizer_model = LlamaCppModel(gguf, model_dir, "bench", base_id="x", fallback=lambda: None, threads=threads)
    plain = {name: plain_one_after_another(gguf, [make(i) for i in range(8)], tokenizer_model.encode, args.max_new,
                                           threads) for name, make in scenarios.items()}
    tokenizer_model.close()
    print()
    print(f"{'chats':30} {'path':36} {'wall s':>7} {'tok/s':>7} {'1st token med/max s':>20} {'as alone':>8}")
    for name in scenarios:
        p = plain[name]
        print(f"{name:30} {'plain llama-cpp-python, one by one':36} {p['wall']:7.2f} {p['tokens'] / p['wall']:7.1f} "
              f"{statistics.median(p['first']):9.2f} / {max(p['first']):5.2f} {'-':>8}")
        for layout in layouts:
            runs = results[(name, layout)]
            wall = statistics.median(r["wall"] for r in runs)
            rate = statistics.median(r["tokens"] / r["wall"] for r in runs)
            firsts = [t for r in runs for t in r["first"]]
            same = min(r["same"] for r in runs)
            print(f"{name:30} {'ours, ' + layout + ' KV cache':36} {wall:7.2f} {rate:7.1f} "
                  f"{statistics.median(firsts):9.2f} / {max(firsts):5.2f} {same:>6}/8")
        split = statistics.median(r["tokens"] / r["wall"] for r in results[(name, "split")])
        unified = statistics.median(r["tokens"] / r["wall"] for r in results[(name, "unified")])
        print(f"{name:30} split vs unified {split / unified:.2f}x, split vs plain {split / (p['tokens'] / p['wall']):.2f}x")
    print(f"(median of {args.rounds} rounds, layouts interleaved; load average at end {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
