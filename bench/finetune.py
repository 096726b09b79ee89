"""Benchmark: LoRA fine-tuning through ``train_lora`` vs a plain peft + PyTorch loop.

Owns: training both on bench/data/finetune-style-train.jsonl in one process (same
examples, epochs, batch size, learning rate, rank, all linear layers), timing
train tokens/s (non-padding), wall time to a saved adapter and peak memory, then
the style adoption (answers carrying the sign-off) of the base and tuned models
on the 20 held-out prompts of bench/data/finetune-style-heldout.json.
Must not: download anything, or write outside a temporary folder (and the model cache).

    .venv/bin/python bench/finetune.py [--limit N] [--epochs 2] [--skip-baseline] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.finetune.evaluate import greedy_answers, style_adoption  # noqa: E402
from personal_gpt.finetune.train import _learning_rate, settings_from, train_lora  # noqa: E402
from personal_gpt.models.bundled import ensure_bundled_model  # noqa: E402

TRAIN_FILE = "finetune-style-train.jsonl"
HELDOUT_FILE = "finetune-style-heldout.json"
# bench/data is the home of the data; the shared folder is where it came from
DATA_DIRS = (ROOT / "bench" / "data", ROOT.parent / "shared" / "data")


def data_dir(given: Path | None) -> Path:
    for folder in ([given] if given else list(DATA_DIRS)):
        if (folder / TRAIN_FILE).is_file() and (folder / HELDOUT_FILE).is_file():
            return folder
    sys.exit(f"bench/finetune.py: {TRAIN_FILE} and {HELDOUT_FILE} not found in {', '.join(map(str, DATA_DIRS))}")


# --- memory: the high-water mark of this process, reset between the runs -----------

def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak() -> bool:
    """Linux resets VmHWM when 5 is written to /proc/self/clear_refs (and torch
    its GPU counters on request)."""
    if on_gpu():
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect, and hand freed heap back to the system (glibc), so one run's
    leftovers do not count in the next run's peak."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mb() -> float:
    """GPU memory on a GPU (what limits a run there), else this process's RSS high-water mark."""
    if on_gpu():
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# --- the baseline: what one writes from the peft docs --------------------------------

def baseline_train(base_dir: Path, examples: list[list[dict]], settings, out_dir: Path) -> dict:
    """fp32, batches in file order padded to their longest row, the model's own
    loss (labels -100 on the prompt and padding), AdamW, same schedule and clipping."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True).to(device)
    model = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha,
                                             lora_dropout=settings.dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = []
    for messages in examples:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][: settings.max_length]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, n_prompt))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    batches = [rows[i:i + settings.batch_size] for i in range(0, len(rows), settings.batch_size)]
    total = len(batches) * settings.epochs
    model.train()
    tokens, train_s, step = 0, 0.0, 0
    for _ in range(settings.epochs):
        for batch in batches:
            t0 = time.monotonic()
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in batch])
            labels = input_ids.clone()
            labels[mask == 0] = -100
            for r, (_, n_prompt) in enumerate(batch):
                labels[r, :n_prompt] = -100
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, total, settings.learning_rate)
            loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.monotonic() - t0
            tokens += int(mask.sum())
            step += 1
    model.save_pretrained(str(out_dir))
    wall = time.monotonic() - start
    return {"tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s, "wall_s": wall,
            "final_loss": float(loss.detach()), "threads": torch.get_num_threads()}


def tuned_answers(base_dir: Path, adapter_dir: Path, prompts, max_new_tokens: int) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    base.to("cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval() if adapter_dir else base.eval()
    return greedy_answers(model, tokenizer, prompts, max_new_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="train on the first N examples (default: all 200)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true", help="time train_lora only")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length for the style check")
    parser.add_argument("--data", type=Path, help=f"folder with {TRAIN_FILE} and {HELDOUT_FILE}")
    parser.add_argument("--home", type=Path, help="PERSONAL_GPT_HOME to use (its model cache is reused)")
    args = parser.parse_args()
    if args.home:
        os.environ["PERSONAL_GPT_HOME"] = str(args.home)

    folder = data_dir(args.data)
    examples = [json.loads(line)["messages"] for line in (folder / TRAIN_FILE).read_text().splitlines() if line.strip()]
    if args.limit:
        examples = examples[: args.limit]
    heldout = json.loads((folder / HELDOUT_FILE).read_text())
    prompts = [[{"role": "user", "content": p}] for p in heldout["prompts"]]
    marker = heldout["style"]["signoff"]
    settings = settings_from({"epochs": args.epochs, "rank": 16, "target_modules": "all-linear"})
    base_dir = ensure_bundled_model(Settings.from_env())

    import torch

    print(f"data: {folder} ({len(examples)} examples, {len(prompts)} held-out prompts, marker {marker!r})")
    print(f"settings: epochs {settings.epochs}, batch {settings.batch_size}, lr {settings.learning_rate}, "
          f"rank {settings.rank}, alpha {settings.lora_alpha}, dropout {settings.dropout}, all linear layers")
    gpu = f", GPU {torch.cuda.get_device_name()}" if on_gpu() else ""
    print(f"machine: {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    hwm_resets = reset_peak()
    if not hwm_resets:
        print("note: this system cannot reset the memory high-water mark; peaks are for the whole process")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pgpt-bench-ft-") as tmp:
        tmp = Path(tmp)
        # ours first: freed memory that the allocator keeps would otherwise count against it
        release_memory()
        reset_peak()
        print("ours: train_lora…", flush=True)
        start = time.monotonic()
        ours = train_lora(base_dir, examples, [], settings, tmp / "ours", base_name="bundled:smollm2-135m-instruct")
        wall = time.monotonic() - start
        m = ours.metrics
        results["ours"] = {"tokens": m["train_tokens"], "train_s": m["train_seconds"],
                           "tokens_per_s": m["tokens_per_s"], "wall_s": wall, "peak_mb": peak_mb(),
                           "adapter": ours.adapter_dir, "dtype": m["dtype"], "threads": m["threads"]}
        print(f"  {m['tokens_per_s']:.1f} tokens/s, {wall:.1f} s ({m['device']}, {m['dtype']})", flush=True)
        del ours

        if not args.skip_baseline:
            release_memory()
            reset_peak()
            print("baseline: plain peft + PyTorch loop…", flush=True)
            run = baseline_train(base_dir, examples, settings, tmp / "baseline")
            run["peak_mb"] = peak_mb()
            run["adapter"] = tmp / "baseline"
            results["baseline"] = run
            print(f"  {run['tokens_per_s']:.1f} tokens/s, {run['wall_s']:.1f} s", flush=True)
        release_memory()

        print(f"style: greedy answers to {len(prompts)} held-out prompts (max {args.max_new_tokens} new tokens)…",
              flush=True)
        t0 = time.monotonic()
        adoption = {"base": style_adoption(tuned_answers(base_dir, None, prompts, args.max_new_tokens), marker)}
        for name, run in results.items():
            answers = tuned_answers(base_dir, run["adapter"], prompts, args.max_new_tokens)
            run["adoption"] = style_adoption(answers, marker)
            if name == "ours":
                print(f"  e.g. {prompts[0][0]['content']!r} -> {answers[0]!r}")
        print(f"  ({time.monotonic() - t0:.0f} s)")
    load_end = os.getloadavg()[0]

    cols = [name for name in ("baseline", "ours") if name in results]
    label = {"baseline": "plain loop (fp32)", "ours": f"train_lora ({results['ours']['dtype']})"}
    print()
    print(f"{'':34s}" + "".join(f"{label[c]:>24s}" for c in cols))
    rows = [
        ("train tokens (non-padding)", lambda r: f"{r['tokens']:,}"),
        ("train tokens/s", lambda r: f"{r['tokens_per_s']:.1f}"),
        ("train time (s)", lambda r: f"{r['train_s']:.1f}"),
        ("wall time to adapter (s)", lambda r: f"{r['wall_s']:.1f}"),
        ("peak GPU memory (MB)" if on_gpu() else "peak memory, RSS (MB)", lambda r: f"{r['peak_mb']:.0f}"),
        ("threads", lambda r: f"{r['threads']}"),
        ("style adoption, tuned", lambda r: f"{r['adoption']:.0%}"),
    ]
    for title, fmt in rows:
        print(f"{title:34s}" + "".join(f"{fmt(results[c]):>24s}" for c in cols))
    print(f"{'style adoption, base model':34s}{adoption['base']:>24.0%}")
    print()
    ours_r = results["ours"]
    if "baseline" in results:
        print(f"tokens/s: ours / baseline = {ours_r['tokens_per_s'] / results['baseline']['tokens_per_s']:.2f}x "
              f"(target >= 1.2x)")
        print(f"wall time: ours / baseline = {ours_r['wall_s'] / results['baseline']['wall_s']:.2f}x")
    print(f"wall time to a usable adapter: {ours_r['wall_s']:.0f} s (target <= 240 s)")
    print(f"peak memory: {ours_r['peak_mb']:.0f} MB (target < 4096 MB)")
    print(f"style adoption: {ours_r['adoption']:.0%} tuned vs {adoption['base']:.0%} base (target >= 90%)")
    print(f"load average at the end {load_end:.2f} (other work on this machine slows both runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
