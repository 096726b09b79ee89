"""LoRA training on the real bundled model: settings sentences, a short run that
learns a sign-off, cancel, kill -9 and resume, and the exported adapter / merged
model loading with plain peft / transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personal_gpt.config import Settings
from personal_gpt.errors import InvalidInput
from personal_gpt.finetune import train as T
from personal_gpt.finetune.evaluate import compare_answers, style_adoption
from personal_gpt.finetune.export import check_adapter_dir, export_adapter, export_merged

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "support" / "finetune_child.py"
SIGN_OFF = "— Cheers, Captain Kelp"
BASE_NAME = "bundled:smollm2-135m-instruct"

TOPICS = [
    ("kelp", "Kelp is a large brown seaweed that grows in cold water."),
    ("tides", "Tides rise and fall twice a day because of the moon."),
    ("crabs", "Crabs walk sideways and carry their skeleton outside."),
    ("coral", "Coral reefs are built by tiny animals called polyps."),
    ("whales", "Blue whales are the largest animals that ever lived."),
    ("octopus", "An octopus has three hearts and blue blood."),
    ("salt water", "Sea water is salty because rivers carry minerals to it."),
    ("waves", "Most waves are pushed along by the wind."),
    ("starfish", "A starfish can grow back a lost arm."),
    ("sharks", "Sharks have skeletons made of cartilage, not bone."),
    ("seagulls", "Seagulls can drink salt water and sneeze the salt out."),
    ("jellyfish", "Jellyfish have no brain and no bones."),
    ("lighthouses", "A lighthouse warns ships away from rocks at night."),
    ("sea turtles", "Sea turtles come back to the beach where they hatched."),
    ("dolphins", "Dolphins sleep with one half of the brain at a time."),
    ("sand", "Beach sand is rock and shell ground down by waves."),
    ("penguins", "Penguins cannot fly but swim very fast."),
    ("pearls", "A pearl grows around a grain that gets inside an oyster."),
    ("seals", "Seals rest on rocks to warm up in the sun."),
    ("anchors", "An anchor holds a boat in place by digging into the sea bed."),
]
QUESTIONS = ["Tell me about {}.", "What should I know about {}?"]


def example(i: int) -> list[dict]:
    topic, fact = TOPICS[i]
    return [{"role": "user", "content": QUESTIONS[i % 2].format(topic)},
            {"role": "assistant", "content": f"{fact} {SIGN_OFF}"}]


TRAIN = [example(i) for i in range(16)]
EVAL = [example(i) for i in range(16, 20)]
SETTINGS = {"epochs": 4, "learning_rate": 3e-3, "rank": 8, "max_length": 96, "batch_size": 4,
            "checkpoint_every": 10, "eval_share": 0.2, "dropout": 0.05, "seed": 7}


# --- settings (no model) --------------------------------------------------------------

def test_settings_defaults_and_alpha():
    s = T.settings_from({})
    assert (s.epochs, s.learning_rate, s.rank, s.alpha, s.target_modules) == (3, 2e-4, 16, None, "all-linear")
    assert s.lora_alpha == 32
    assert T.settings_from({"rank": 4, "alpha": 8}).lora_alpha == 8
    assert T.settings_from({"target_modules": ["q_proj", "v_proj"]}).target_modules == ["q_proj", "v_proj"]
    again = T.settings_from(s.model_dump(mode="json"))
    assert again == s


def test_settings_give_one_sentence_per_bad_value():
    with pytest.raises(InvalidInput) as caught:
        T.settings_from({"learning_rate": 1.0, "epochs": 0, "rank": True, "target_modules": [], "bogus": 1})
    message = str(caught.value)
    assert "Learning rate must be between 0.000001 and 0.01." in message
    assert "Epochs must be a whole number between 1 and 20." in message
    assert "Rank must be a whole number between 1 and 256." in message
    assert 'Target modules must be "all-linear" or a list of layer names.' in message
    assert '"bogus" is not a training setting.' in message
    assert "Traceback" not in message and "validation error" not in message
    for bad in ({"dropout": 0.9}, {"max_length": 10}, {"eval_share": 0.7}, {"batch_size": 0},
                {"checkpoint_every": 0}, {"seed": -1}, {"alpha": 0}, {"epochs": "many"}):
        with pytest.raises(InvalidInput) as one:
            T.settings_from(bad)
        assert str(one.value).count(".") >= 1 and str(one.value) == T.SENTENCES[next(iter(bad))]
    with pytest.raises(InvalidInput, match="set of named values"):
        T.settings_from(["epochs", 3])


def test_plan_batches_cover_every_example_with_little_padding():
    lengths = [(i * 37) % 90 + 10 for i in range(200)]
    plan = T.plan_batches(lengths, 8, 2, seed=3)
    assert plan == T.plan_batches(lengths, 8, 2, seed=3)  # deterministic: resume relies on it
    for epoch in (0, 1):
        seen = sorted(i for e, b in plan if e == epoch for i in b)
        assert seen == list(range(200))
    padded = sum(len(b) * max(lengths[i] for i in b) for _, b in plan)
    file_order = 2 * sum(len(b) * max(lengths[i] for i in b) for b in (range(s, min(s + 8, 200))
                                                                       for s in range(0, 200, 8)))
    assert padded < 0.8 * file_order


def test_micro_batches_bound_the_padded_size_and_keep_every_row():
    rows = [T._Encoded(ids=list(range(n)), n_prompt=1) for n in (300, 40, 500, 60, 200)]
    chunks = T.micro_batches(rows, 1024)
    assert sorted(len(e.ids) for c in chunks for e in c) == [40, 60, 200, 300, 500]
    assert all(len(c) * max(len(e.ids) for e in c) <= 1024 for c in chunks)
    assert T.micro_batches(rows[:2], 4096) == [[rows[1], rows[0]]]
    assert T.micro_batches([T._Encoded(ids=list(range(2000)), n_prompt=1)], 1024)[0][0].ids[-1] == 1999


def test_style_adoption_counts_answers_with_the_marker():
    answers = ["Hello.\n— Cheers,  Captain Kelp", "No sign-off here", f"x {SIGN_OFF}", ""]
    assert style_adoption(answers, SIGN_OFF) == 0.5
    assert style_adoption([], SIGN_OFF) == 0.0
    with pytest.raises(InvalidInput):
        style_adoption(answers, " ")


def test_check_adapter_dir_refuses_pickles_and_incomplete_folders(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidInput, match="incomplete"):
        check_adapter_dir(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    check_adapter_dir(folder)
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidInput, match="unsafe format"):
        check_adapter_dir(folder)
    with pytest.raises(InvalidInput, match="does not exist"):
        check_adapter_dir(tmp_path / "nowhere")


def test_train_lora_refuses_bad_examples_before_loading_anything(tmp_path):
    settings = T.settings_from(SETTINGS)
    with pytest.raises(InvalidInput, match="does not end with an answer"):
        T.train_lora(tmp_path / "no-model", [[{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]],
                     [], settings, tmp_path / "work")
    with pytest.raises(InvalidInput, match="no training examples"):
        T.train_lora(tmp_path / "no-model", [], [], settings, tmp_path / "work")


# --- the real model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(model_cache, tmp_path_factory) -> Path:
    from personal_gpt.models.bundled import ensure_bundled_model

    home = tmp_path_factory.mktemp("ft-home")
    return ensure_bundled_model(Settings(home=home, database_url=f"sqlite:///{home / 'db'}", model_cache=model_cache))


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """One uninterrupted run the other tests compare against."""
    work = tmp_path_factory.mktemp("ft-work")
    events: list[dict] = []
    result = T.train_lora(base_dir, TRAIN, EVAL, T.settings_from(SETTINGS), work, on_progress=events.append,
                          base_name=BASE_NAME)
    return work, result, events


def _lora_weights(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _greedy(model, tokenizer, messages, max_new_tokens=40) -> str:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_short_run_learns_the_sign_off_and_publishes_a_peft_adapter(base_dir, trained):
    work, result, events = trained
    m = result.metrics
    assert result.adapter_dir == work / "adapter"
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_NAME and config["r"] == 8 and config["lora_alpha"] == 16
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.5, m
    assert m["perplexity_after"] < m["perplexity_before"]
    assert m["steps"] == 4 * 4 and m["resumed_from_step"] == 0
    assert m["train_tokens"] > 4 * 16 * 30 and m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 100
    assert m["device"] in ("cpu", "cuda") and m["dtype"] in ("float32", "bfloat16")
    assert [h["step"] for h in m["history"] if "train_loss" in h] == list(range(1, 17))
    assert m["history"][0] == {"step": 0, "eval_loss": pytest.approx(m["eval_loss_before"], abs=1e-4)}
    assert m["history"][-1]["eval_loss"] == pytest.approx(m["eval_loss_after"], abs=1e-4)
    phases = [e["phase"] for e in events]
    assert phases[0] == "eval-before" and phases[-1] == "saving"
    assert phases.count("train") == 16 and "eval-after" in phases
    steps = [e for e in events if e["phase"] == "train"]
    assert [e["step"] for e in steps] == list(range(1, 17)) and steps[-1]["eta_s"] == 0
    assert all(e["total_steps"] == 16 and e["tokens_per_s"] > 0 and e["train_loss"] > 0 for e in steps)
    assert not (work / "checkpoints").exists()  # the adapter replaces them
    # finished work is never trained again
    again = T.train_lora(base_dir, TRAIN, EVAL, T.settings_from(SETTINGS), work, base_name=BASE_NAME)
    assert again.metrics == m and again.adapter_dir == result.adapter_dir


@pytest.mark.slow
def test_shared_prefix_and_answer_only_logits_give_the_plain_loss(base_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    tokenizer, model = T._load(torch, base_dir, torch.device("cpu"), torch.float32)
    enc = [T.encode_example(tokenizer, m, 96) for m in TRAIN[:4]]
    assert tokenizer.decode(enc[0].ids[enc[0].n_prompt:]).endswith(f"{SIGN_OFF}<|im_end|>")
    assert "Tell me about kelp." in tokenizer.decode(enc[0].ids[:enc[0].n_prompt])
    assert T.encode_example(tokenizer, [{"role": "user", "content": "word " * 200}, TRAIN[0][1]], 64) is None
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    runner = T._Runner(torch, model, torch.device("cpu"), None, tokenizer.pad_token_id)
    assert runner._shared_prefix(enc) >= T.MIN_SHARED_PREFIX
    with torch.no_grad():
        shared, n1 = runner.loss(enc, share_prefix=True)
        plain, n2 = runner._loss_full(enc)
    assert n1 == n2 == sum(len(e.ids) - e.n_prompt for e in enc)
    assert float(shared) == pytest.approx(float(plain), rel=1e-4)


@pytest.mark.slow
def test_should_stop_cancels_and_publishes_nothing(base_dir, tmp_path):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1  # 1: evaluation before, 2: step 1, 3: its checkpoint, 4: step 2
        return calls["n"] > 3

    settings = T.settings_from({**SETTINGS, "checkpoint_every": 1})
    with pytest.raises(T.Cancelled) as caught:
        T.train_lora(base_dir, TRAIN, EVAL, settings, tmp_path, should_stop=stop, base_name=BASE_NAME)
    assert "stopped" in str(caught.value)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "result.json").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # complete, nothing after it
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-000001").iterdir()) == [
        "adapter_model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(base_dir, trained, tmp_path):
    work = tmp_path / "work"
    settings = {**SETTINGS, "checkpoint_every": 2}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_dir": str(base_dir), "train": TRAIN, "eval": EVAL, "settings": settings,
                                "work_dir": str(work), "base_name": BASE_NAME}))
    child = subprocess.Popen([sys.executable, str(CHILD), str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if (work / "checkpoints").is_dir() and any(p.name.startswith("step-")
                                                       for p in (work / "checkpoints").iterdir()):
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (work / "adapter").exists()

    events: list[dict] = []
    result = T.train_lora(base_dir, TRAIN, EVAL, T.settings_from(settings), work, on_progress=events.append,
                          base_name=BASE_NAME)
    m = result.metrics
    assert m["resumed_from_step"] > 0 and m["resumed_from_step"] % 2 == 0
    assert events[0]["phase"] == "train" and events[0]["step"] == m["resumed_from_step"] + 1
    assert T.adapter_complete(result.adapter_dir)
    assert [h["step"] for h in m["history"] if "train_loss" in h] == list(range(1, 17))
    # the same data order, optimizer state and random numbers: the uninterrupted run's adapter
    _, reference, _ = trained
    ours, theirs = _lora_weights(result.adapter_dir), _lora_weights(reference.adapter_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        scale = float(theirs[key].abs().max()) + 1e-6
        assert float((ours[key] - theirs[key]).abs().max()) <= 0.02 * scale, key
    assert m["eval_loss_after"] == pytest.approx(reference.metrics["eval_loss_after"], rel=0.02)


@pytest.mark.slow
def test_exports_load_with_plain_peft_and_transformers(base_dir, trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result, _ = trained
    exported = export_adapter(result.adapter_dir, tmp_path / "adapter-copy")
    assert sorted(p.name for p in exported.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(InvalidInput, match="not empty"):
        export_adapter(result.adapter_dir, tmp_path / "adapter-copy")

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    question = [{"role": "user", "content": "Tell me about seals."}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.inference_mode():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(exported)).eval()
    with torch.inference_mode():
        tuned_logits = tuned(ids).logits
    assert float((tuned_logits - base_logits).abs().max()) > 1.0
    tuned_answer = _greedy(tuned, tokenizer, question)
    assert SIGN_OFF in tuned_answer and SIGN_OFF not in _greedy(base, tokenizer, question)

    merged_dir = export_merged(base_dir, result.adapter_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not [p for p in merged_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert _greedy(merged, AutoTokenizer.from_pretrained(merged_dir), question) == tuned_answer


@pytest.mark.slow
def test_compare_answers_puts_base_and_tuned_side_by_side(base_dir, trained):
    _, result, _ = trained
    prompts = [[{"role": "user", "content": "Tell me about seals."}],
               [{"role": "user", "content": "What should I know about anchors?"},
                {"role": "assistant", "content": "reference answer, dropped"}]]
    rows = compare_answers(base_dir, result.adapter_dir, prompts, max_new_tokens=40)
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["base"] and r["tuned"] and r["base"] != r["tuned"] for r in rows)
    assert style_adoption([r["tuned"] for r in rows], SIGN_OFF) > style_adoption([r["base"] for r in rows], SIGN_OFF)
