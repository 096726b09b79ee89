"""Side-by-side answers of a base model and the same model with a LoRA adapter
(greedy, plain transformers ``generate``; meant for the fine-tuning worker), and
the share of answers that carry a style marker.
Must not: touch the store, load pickles, or import torch/transformers/peft at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from personal_gpt.errors import InvalidInput, ModelError

log = logging.getLogger(__name__)

GENERATE_BATCH = 8


def _prompt_messages(prompt) -> list[dict]:
    """A prompt as chat messages, without a trailing reference answer."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                               and m.get("role") in ("system", "user", "assistant") for m in prompt):
        raise InvalidInput("Each question to compare must be a conversation of system, user and assistant messages.")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise InvalidInput("Each question to compare needs at least one message before its answer.")
    return messages


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of a loaded model (a peft model too) to chat ``prompts``, a
    few at a time (left-padded batches of similar length)."""
    import torch

    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), GENERATE_BATCH):
        chunk = order[start:start + GENERATE_BATCH]
        longest = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk],
                            device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True).strip()
    return answers


def compare_answers(base_dir: Path, adapter_dir: Path, prompts: list[list[dict]],
                    max_new_tokens: int = 128) -> list[dict]:
    """``[{"prompt", "base", "tuned"}]``: the greedy answer of the base model and of
    the base with the adapter in ``adapter_dir``, for every prompt."""
    if not prompts:
        return []
    if not 1 <= int(max_new_tokens) <= 4096:
        raise InvalidInput("The answer length must be between 1 and 4096 tokens.")
    messages = [_prompt_messages(p) for p in prompts]
    from personal_gpt.finetune.export import check_adapter_dir

    check_adapter_dir(adapter_dir)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=False)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False).to(device)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        log.exception("cannot load %s", base_dir)
        raise ModelError(f"The base model in {base_dir} could not be loaded to compare answers.") from exc
    model.eval()
    base_answers = greedy_answers(model, tokenizer, messages, int(max_new_tokens))
    try:
        tuned_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched adapter
        log.exception("cannot load the adapter %s", adapter_dir)
        raise ModelError("The trained adapter could not be loaded onto its base model.") from exc
    tuned_model.eval()
    tuned_answers = greedy_answers(tuned_model, tokenizer, messages, int(max_new_tokens))
    return [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_answers, tuned_answers)]


def style_adoption(answers: list[str], marker: str) -> float:
    """The share (0–1) of ``answers`` that contain ``marker`` (case and spacing as
    written, ignoring runs of whitespace); 0.0 when there are no answers."""
    if not marker or not marker.strip():
        raise InvalidInput("The style marker to look for is empty.")
    if not answers:
        return 0.0
    wanted = " ".join(marker.split())
    hits = sum(1 for a in answers if wanted in " ".join(str(a or "").split()))
    return hits / len(answers)
