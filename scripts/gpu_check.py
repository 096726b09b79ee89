"""Check the fine-tuning GPU path on a machine with CUDA (CI has none, so the
test suite cannot): LoRA training in bf16 on the GPU, a stop and resume from a
checkpoint, CPU-vs-GPU agreement of the first losses in fp32, and the
before/after comparison generating on the GPU.

The real weights are too big to carry to a lent GPU machine, so the model is the
bundled model's own architecture, tokenizer and chat template with fewer layers
and random weights (seeded): the code path is the one creators run; the loss
values say nothing about answer quality.

    python scripts/gpu_check.py MODEL_DIR [--layers 4] [--out report.json]

MODEL_DIR holds config.json + tokenizer files (e.g. the converted bundled model in
the model cache). Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personal_gpt.finetune.evaluate import compare_answers  # noqa: E402
from personal_gpt.finetune.train import Cancelled, TrainSettings, train_lora  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def tiny_model(source: Path, dest: Path, layers: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, dest / name)
    return dest


def examples(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        out.append([
            {"role": "user", "content": f"What is the opening time of shop number {i}?"},
            {"role": "assistant", "content": f"Shop {i} opens at {8 + i % 4}:00 every weekday, ask for Sam."},
        ])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 1
    report["gpu"] = torch.cuda.get_device_name(0)
    checks: dict[str, bool] = {}
    root = Path(tempfile.mkdtemp(prefix="pgpt-gpu-"))
    base = tiny_model(args.model_dir, root / "base", args.layers)
    train, held_out = examples(96), examples(104)[96:]
    settings = TrainSettings(epochs=2, rank=8, batch_size=8, checkpoint_every=4, learning_rate=1e-3, max_length=128)

    # 1. a whole bf16 run on the GPU
    progress: list[dict] = []
    t0 = time.perf_counter()
    result = train_lora(base, train, held_out, settings, root / "run-bf16", on_progress=progress.append)
    report["bf16_seconds"] = round(time.perf_counter() - t0, 2)
    report["bf16_metrics"] = {k: v for k, v in result.metrics.items() if k != "history"}
    before, after = result.metrics.get("eval_loss_before"), result.metrics.get("eval_loss_after")
    checks["bf16 run finishes, evaluation loss falls"] = before is not None and after is not None and after < before
    checks["bf16 run reports GPU memory"] = bool(result.metrics.get("peak_memory_mb"))

    # 2. stop after a few steps, then resume: same adapter as the uninterrupted fp32 run
    steps = {"n": 0}

    def stop_after_six(info: dict) -> None:
        if info.get("step"):
            steps["n"] = info["step"]

    try:
        train_lora(base, train, held_out, settings, root / "run-resume", on_progress=stop_after_six,
                   should_stop=lambda: steps["n"] >= 6, precision="fp32")
        checks["stop request honoured"] = False
    except Cancelled:
        checks["stop request honoured"] = True
    kept = sorted(p.name for p in (root / "run-resume" / "checkpoints").iterdir())
    report["checkpoints_after_stop"] = kept
    resumed = train_lora(base, train, held_out, settings, root / "run-resume", precision="fp32")
    straight = train_lora(base, train, held_out, settings, root / "run-straight", precision="fp32")
    from safetensors.torch import load_file

    a = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(straight.adapter_dir) / "adapter_model.safetensors"))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    report["resume_max_abs_diff"] = worst
    checks["resumed adapter equals uninterrupted (fp32, |diff| < 1e-4)"] = a.keys() == b.keys() and worst < 1e-4

    # 3. CPU and GPU agree on the losses of the first steps (fp32, no dropout: its random draws differ by device)
    plain = settings.model_copy(update={"dropout": 0.0})
    gpu_losses = [m["loss"] for m in _losses(base, train, held_out, plain, root / "gpu-fp32", "cuda")]
    cpu_losses = [m["loss"] for m in _losses(base, train, held_out, plain, root / "cpu-fp32", "cpu")]
    report["first_losses"] = {"gpu": gpu_losses, "cpu": cpu_losses}
    checks["CPU and GPU first losses agree (rel 1e-3)"] = len(gpu_losses) == len(cpu_losses) > 0 and all(
        abs(g - c) <= 1e-3 * max(1.0, abs(c)) for g, c in zip(gpu_losses, cpu_losses)
    )

    # 4. before/after answers generated on the GPU
    t0 = time.perf_counter()
    pairs = compare_answers(base, Path(result.adapter_dir), [m[:1] for m in held_out], max_new_tokens=24)
    report["compare_seconds"] = round(time.perf_counter() - t0, 2)
    report["compare_sample"] = pairs[:2] if isinstance(pairs, list) else str(pairs)[:400]
    checks["before/after comparison runs on the GPU"] = bool(pairs)

    report["checks"] = checks
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(root, ignore_errors=True)
    failed = [k for k, ok in checks.items() if not ok]
    print("FAILED: " + "; ".join(failed) if failed else "all GPU checks passed")
    return 1 if failed else 0


def _losses(base, train, held_out, settings, work, device: str) -> list[dict]:
    """The first three steps' progress reports of an fp32 run on ``device``."""
    import torch

    seen: list[dict] = []
    available = torch.cuda.is_available
    if device == "cpu":  # the trainer picks CUDA whenever it is there
        torch.cuda.is_available = lambda: False
    try:
        train_lora(base, train, held_out, settings, work, precision="fp32",
                   on_progress=lambda info: seen.append(info) if info.get("loss") is not None else None,
                   should_stop=lambda: len(seen) >= 3)
    except Cancelled:
        pass
    finally:
        torch.cuda.is_available = available
    return seen[:3]


if __name__ == "__main__":
    raise SystemExit(main())
