"""Benchmark: chat serving through LocalModel vs plain transformers `generate`.

Owns: timing time-to-first-token, decode tokens/s and 4-chat aggregate
throughput on the bundled model, printing ours beside the baseline. Must not
download anything or change the model cache beyond preparing the bundled model.

    .venv/bin/python bench/chat.py [--quick] [--home DIR]
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.base import Usage  # noqa: E402
from personal_gpt.models.bundled import bundled_local_model  # noqa: E402

SYSTEM_PROMPT = """You are "Garden Helper", a friendly assistant made by a small community garden in Leeds for its members and neighbours.

Who you talk to: people who grow vegetables, herbs and flowers on allotments, balconies and small back gardens. Most are beginners; some have decades of experience. Many have little time and little money. Assume a temperate maritime climate (mild wet winters, cool summers, last frost around mid-April, first frost around late October) unless the person says otherwise.

How you answer:
- Start with the direct answer in one or two sentences, then give the steps or the reasons.
- Use plain words. If you must use a technical term (for example "hardening off", "bolting", "crop rotation", "green manure"), explain it in a few words the first time.
- Prefer cheap, low-effort, organic methods: compost, mulch, companion planting, hand-picking pests, netting, crop rotation, watering at the base in the morning.
- Never recommend buying chemical pesticides or weed killers. If someone asks about them, explain the risks to bees, pets, children and soil life, and offer alternatives.
- When timing matters, give months for the local climate, and say what signs in the garden to watch for instead of dates alone (soil warm enough to sit on, blossom on the blackthorn, nights above 10 °C).
- If a question is about a plant that might be poisonous (foxglove, rhubarb leaves, potato berries, yew, lily for cats), say so clearly.
- If you are not sure, say what you would check and suggest asking at the Saturday morning drop-in at the garden shed.

What you know about our garden:
- Plots are 5 m by 10 m, heavy clay soil improved with compost; the water butts are shared and refilled from the roof of the shed.
- Slugs, snails, carrot fly, cabbage white butterflies, aphids and pigeons are the main pests; blight hits potatoes and tomatoes most wet summers; clubroot is present in two beds, so brassicas go in raised beds with fresh compost there.
- We compost on site in three bays (fresh, turning, ready); no meat, dairy, cooked food, diseased plants or perennial weed roots go in.
- The garden is a no-dig site: we add 5 cm of compost every autumn and do not turn the soil.

Safety: do not give medical advice about eating wild plants or mushrooms. For injuries, say to seek first aid. For questions that are not about gardening, food growing, composting or our garden's activities, say politely that you can only help with the garden and suggest who else might help."""

QUESTIONS = [
    "I have a new plot with heavy clay and a lot of couch grass. Give me a detailed plan for the first year: what to do each month, what to plant, and how to deal with slugs.",
    "How do I grow tomatoes on a sunny balcony in pots? Explain the whole season in detail, from sowing to picking, with watering and feeding.",
    "Explain crop rotation for a small plot with four beds, with examples of what goes in each bed every year and why.",
    "My courgette leaves have white powder on them and the potatoes have brown patches. What is happening and what should I do, step by step?",
]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def baseline_generate(model, tokenizer, messages, max_new: int) -> tuple[float, float, int]:
    """Plain transformers: chat template + generate (greedy). Returns
    (ttft_s, decode_tok_s, new_tokens); the first-token time is stamped by a
    LogitsProcessor at the first step (before the token is even chosen)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        first: float | None = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            return scores

    stamp = Stamp()
    started = time.perf_counter()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
            pad_token_id=tokenizer.pad_token_id,
        )
    ended = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    return stamp.first - started, (generated - 1) / (ended - stamp.first), generated


def ours_stream(local, messages, max_new: int) -> tuple[float, float, int, str]:
    usage = Usage()
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new)
    text = "".join(local.stream(messages, settings, usage=usage))
    decode_s = usage.total_s - usage.first_token_s
    return usage.first_token_s, (usage.completion_tokens - 1) / decode_s, usage.completion_tokens, text


def aggregate(local, max_new: int, concurrent: bool) -> tuple[float, int]:
    """Aggregate generated tokens/s for the 4 chats, together or one by one.
    Both start with an empty prefix cache; the chats share the instructions."""
    local.clear_prefix_cache()
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new)
    counts = [0] * len(QUESTIONS)

    def chat(i: int) -> None:
        usage = Usage()
        for _ in local.stream(_messages(QUESTIONS[i]), settings, usage=usage):
            pass
        counts[i] = usage.completion_tokens

    started = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(QUESTIONS)):
            chat(i)
    wall = time.perf_counter() - started
    return sum(counts) / wall, sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and one repeat (a smoke run)")
    parser.add_argument("--home", type=Path, help="PERSONAL_GPT_HOME to use (its model cache is reused)")
    args = parser.parse_args()
    if args.home:
        os.environ["PERSONAL_GPT_HOME"] = str(args.home)
    settings = Settings.from_env()
    max_new = 32 if args.quick else 128
    repeats = 1 if args.quick else 3

    import torch

    print(f"preparing the bundled model in {settings.model_cache_dir} ...", flush=True)
    local = bundled_local_model(settings)
    local.load()
    rt = local._runtime()  # the very same weights for the baseline
    model, tokenizer = rt.model, rt.tokenizer
    prompt_tokens = local.count_tokens(_messages(QUESTIONS[0]))
    print(f"model: {local.name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"prompt {prompt_tokens} tokens, {max_new} new tokens, greedy, median of {repeats}", flush=True)

    # warm-up: both paths, and the batched path
    baseline_generate(model, tokenizer, _messages(QUESTIONS[1]), 8)
    ours_stream(local, _messages(QUESTIONS[1]), 8)
    aggregate(local, 4, concurrent=True)

    base_ttft, base_tps, our_ttft, our_tps, warm_ttft = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both
        b = baseline_generate(model, tokenizer, _messages(QUESTIONS[0]), max_new)
        local.clear_prefix_cache()  # cold: the same work as generate
        o = ours_stream(local, _messages(QUESTIONS[0]), max_new)
        # same instructions, another question: the cached prefix is reused
        warm_ttft.append(ours_stream(local, _messages(QUESTIONS[2]), 1)[0])
        base_ttft.append(b[0])
        base_tps.append(b[1])
        our_ttft.append(o[0])
        our_tps.append(o[1])
        if b[2] != o[2]:
            print(f"note: token counts differ (baseline {b[2]}, ours {o[2]})")
    seq_tps, conc_tps = [], []
    for _ in range(repeats):
        seq_tps.append(aggregate(local, max_new, concurrent=False)[0])
        conc_tps.append(aggregate(local, max_new, concurrent=True)[0])
    local.close()

    ttft_b, ttft_o, ttft_w = _median(base_ttft), _median(our_ttft), _median(warm_ttft)
    dec_b, dec_o = _median(base_tps), _median(our_tps)
    seq, conc = _median(seq_tps), _median(conc_tps)
    rows = [
        ("time to first token (s), lower is better", ttft_o, ttft_b, ttft_o / ttft_b),
        ("time to first token (s), instructions cached", ttft_w, ttft_b, ttft_w / ttft_b),
        ("decode tokens/s, 1 chat", dec_o, dec_b, dec_o / dec_b),
        ("aggregate tokens/s, 4 chats at once vs one by one", conc, seq, conc / seq),
    ]
    print()
    print(f"{'measure':52} {'ours':>10} {'baseline':>10} {'ratio':>7}")
    for label, ours, base, ratio in rows:
        print(f"{label:52} {ours:10.3f} {base:10.3f} {ratio:7.2f}")
    print("(baseline: transformers generate for rows 1-3; the same 4 chats one after another for row 4;")
    print(" row 1 starts cold; row 2 asks a new question after the same instructions were seen, which")
    print(" our prefix cache reuses and generate cannot; row 4: both runs start with an empty prefix cache)")
    print()
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"target TTFT within 1.1x of generate (cold): {met(ttft_o <= 1.1 * ttft_b)} ({ttft_o / ttft_b:.2f}x)")
    print(f"target decode within 1.1x of generate: {met(dec_o * 1.1 >= dec_b)} ({dec_b / dec_o:.2f}x slower)"
          if dec_o < dec_b else f"target decode within 1.1x of generate: met ({dec_o / dec_b:.2f}x faster)")
    print(f"target 4 chats at once >= 2x one by one: {met(conc >= 2 * seq)} ({conc / seq:.2f}x)")
    if args.quick:
        print("(--quick: 32 new tokens, one run: the prompt dominates, so these verdicts are only a smoke test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
