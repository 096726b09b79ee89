"""Benchmark: how far each llama.cpp weight type moves the bundled model from fp32.

Owns: the quality side of choosing the weights our llama.cpp path serves. Exact
greedy match (``local_speed.py``'s check) flips on any near-tie, so it cannot tell a
rounding difference from a broken model; this script measures the distributions
themselves. Plain transformers fp32 writes a greedy answer to 10 fixed prompts; then
every weight type reads the same prompt + answer tokens (teacher forcing) and, for
each answer token, we compare its next-token distribution with fp32's: top-1
agreement, mean and 99th-percentile KL divergence, and the share of positions where
the fp32 token falls out of the type's top 5. The same run times a ~640-token prefill
and a one-token decode step per type (plain llama-cpp-python, 2 threads).

With ``--adapter`` the reference is plain peft fp32 with a seeded random LoRA (the
adapter of ``local_speed.py``), and each type is read twice: with the adapter applied
at run time (a GGUF LoRA, as llama.cpp loads it) and with the adapter merged into the
weights (``gguf_files.merge_lora``, what our llama.cpp path serves once it is built).

    .venv/bin/python bench/weights_quality.py [--types F32,F16,BF16,Q8_0,Q4_1] [--new 48] [--adapter]

Must not download anything: the types are re-encoded from the shipped GGUF into the
model cache (``PERSONAL_GPT_MODEL_CACHE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from local_speed import QUALITY_PROMPTS, QUESTIONS, _messages, make_adapter  # noqa: E402

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.models.bundled import ensure_bundled_model, ensure_llamacpp_gguf  # noqa: E402


def fp32_reference(model_dir: Path, new: int, adapter_dir: Path | None = None):
    """(token ids of prompt + greedy answer, index of the first answer token, fp32 log-probs
    for the answer positions) per quality prompt, and the tokenizer (with ``adapter_dir``:
    plain peft fp32 with that LoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    out = []
    for system, user in QUALITY_PROMPTS:
        text = tokenizer.apply_chat_template(_messages(user, system), add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                 repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)[0].tolist()
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1:len(ids) - 1].float()
        out.append((ids, len(prompt), torch.log_softmax(logits, -1).numpy()))
    return out, tokenizer


def llamacpp_logprobs(gguf: Path, ids: list[int], start: int, lora: Path | None = None, chunk: int = 0):
    """Log-probs of every position from ``start - 1`` to the end - 1 (teacher forcing); ``lora``:
    a GGUF LoRA applied at run time; ``chunk``: the answer read ``chunk`` tokens per decode (as decode
    steps with guesses are) instead of with the prompt in one batch."""
    import numpy as np

    from llama_cpp import Llama

    llm = _LLMS.get((gguf, lora))
    if llm is None:
        llm = _LLMS[(gguf, lora)] = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2,
                                          n_batch=512, logits_all=True, verbose=False,
                                          lora_path=str(lora) if lora else None)
    llm.reset()
    if chunk:
        llm.eval(ids[:start])
        for i in range(start, len(ids), chunk):
            llm.eval(ids[i:i + chunk])
    else:
        llm.eval(ids)
    logits = np.asarray(llm.scores[start - 1:len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


_LLMS: dict = {}


def compare(reference, gguf: Path, lora: Path | None = None, chunk: int = 0) -> dict:
    import numpy as np

    agree, kls, out_of_top5 = [], [], []
    for ids, start, ref in reference:
        got = llamacpp_logprobs(gguf, ids, start, lora, chunk)
        p = np.exp(ref.astype(np.float64))
        kls.extend((p * (ref - got)).sum(axis=1))
        agree.extend(ref.argmax(axis=1) == got.argmax(axis=1))
        top5 = np.argpartition(-got, 5, axis=1)[:, :5]
        out_of_top5.extend(~(top5 == ref.argmax(axis=1)[:, None]).any(axis=1))
    kls = np.maximum(np.asarray(kls), 0.0)
    return {"positions": len(kls), "top1": float(np.mean(agree)), "kl_mean": float(kls.mean()),
            "kl_p99": float(np.percentile(kls, 99)), "out_of_top5": float(np.mean(out_of_top5))}


def speed(gguf: Path, prompt: list[int], lora: Path | None = None) -> tuple[float, float]:
    """(seconds to prefill ``prompt``, seconds per one-token decode step), best of 3, on a
    context that keeps only the last position's logits (as serving does)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512, flash_attn=True,
                verbose=False, lora_path=str(lora) if lora else None)
    prefill, step = [], []
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - started)
        started = time.perf_counter()
        for token in prompt[:8]:
            llm.eval([token])
        step.append((time.perf_counter() - started) / 8)
    llm.close()
    return min(prefill), min(step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="F32,F16,BF16,Q8_0,Q4_1")
    parser.add_argument("--new", type=int, default=48, help="fp32 greedy answer length per prompt")
    parser.add_argument("--adapter", action="store_true", help="with a LoRA: applied at run time and merged")
    parser.add_argument("--kernels", type=int, default=0, metavar="K",
                        help="read each answer K tokens per decode, as decode steps with guesses are, once on our "
                             "llama.cpp kernels and once on llama.cpp's stock ones (third_party/llama.cpp)")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: nothing to compare")
        return 1
    settings = dataclasses.replace(Settings.from_env(), torch_threads=2)
    import torch

    torch.set_num_threads(2)
    model_dir = ensure_bundled_model(settings)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pgpt-weights-quality-"))
    adapter_dir = make_adapter(model_dir, work / "adapter").path if args.adapter else None
    reference, tokenizer = fp32_reference(model_dir, args.new, adapter_dir)
    text = tokenizer.apply_chat_template(_messages(QUESTIONS[0]), add_generation_prompt=True, tokenize=False)
    long_prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    print(f"fp32 reference{' (peft, with the adapter)' if adapter_dir else ''}: {len(QUALITY_PROMPTS)} prompts x "
          f"{args.new} greedy tokens; load average {load:.2f}")
    print(f"{'weights':27} {'positions':>9} {'top-1 same':>10} {'KL mean':>9} {'KL p99':>9} {'fp32 not top5':>13} "
          f"{'prefill s':>9} {'step ms':>8}")
    for weights in [w.strip().upper() for w in args.types.split(",") if w.strip()]:
        gguf = ensure_llamacpp_gguf(settings, weights)
        ways = [(weights, gguf, None)]
        if adapter_dir is not None:
            from personal_gpt.models.gguf_files import lora_to_gguf, merge_lora, model_shape

            shape = model_shape(gguf)
            lora = lora_to_gguf(adapter_dir, work / "adapter.gguf", shape)
            merged = merge_lora(gguf, adapter_dir, work / f"merged-{weights}.gguf", shape)
            ways = [(f"{weights} + LoRA", gguf, lora), (f"{weights} merged", merged, None)]
        if args.kernels:  # our kernels against the stock ones, the answers read in small decodes
            ways = [(f"{label}, {k} kernels", path, lora) for label, path, lora in ways for k in ("our", "stock")]
        for label, path, lora in ways:
            stock = label.endswith("stock kernels")
            for name in ("PGPT_GGML_STOCK_FA", "PGPT_GGML_STOCK_GEMM"):
                if stock:
                    os.environ[name] = "1"
                else:
                    os.environ.pop(name, None)
            r = compare(reference, path, lora, args.kernels)
            prefill, step = speed(path, long_prompt, lora)
            print(f"{label:27} {r['positions']:>9} {r['top1']:>10.3f} {r['kl_mean']:>9.5f} {r['kl_p99']:>9.5f} "
                  f"{r['out_of_top5']:>13.3f} {prefill:>9.3f} {step * 1000:>8.1f}", flush=True)
            _LLMS.pop((path, lora)).close()
            if path != gguf and not (args.kernels and not stock):
                path.unlink()
    print(f"(teacher forcing on fp32's own answers; prefill: {len(long_prompt)}-token prompt; step: one-token "
          f"decode; plain llama-cpp-python, 2 threads; load average at end {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
