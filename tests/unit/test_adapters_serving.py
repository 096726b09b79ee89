"""LoRA adapters served on the one shared bundled model (real SmolLM2, real peft).

Two small adapters are made here without training: peft's ``get_peft_model`` on
the bundled weights, LoRA B matrices set to seeded random values (so answers
change), saved as safetensors. Everything else is the real serving path.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.errors import InvalidInput, ModelError  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.adapters import AdaptedModel, check_adapter  # noqa: E402
from personal_gpt.models.base import AdapterRef, ChatModel, Usage  # noqa: E402
from personal_gpt.models.bundled import BUNDLED_ID, ensure_bundled_model  # noqa: E402
from personal_gpt.models.local import LocalModel  # noqa: E402
from personal_gpt.models.registry import ModelRegistry  # noqa: E402
from tests.support.prompts import GARDEN_INSTRUCTIONS, user  # noqa: E402

BUNDLED_REF = f"bundled:{BUNDLED_ID}"
MAX_NEW = 12
GREEDY = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=MAX_NEW)
INSTRUCTIONS = GARDEN_INSTRUCTIONS


QUESTION = user("Give me one tip for growing tomatoes.")


def answer(model, messages=QUESTION, settings=GREEDY) -> str:
    return "".join(model.stream(messages, settings))


# --- adapters made on the spot ---------------------------------------------------------

def make_adapter(base, folder: Path, seed: int, targets: list[str], scale: float) -> Path:
    """A LoRA adapter on ``base`` whose A and B matrices are seeded random (B not zero; A seeded too,
    since peft draws it from the global generator), saved by peft as safetensors; ``base`` is left as it was."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.peft_config["default"].base_model_name_or_path = BUNDLED_REF  # what our trainer records
    peft_model.save_pretrained(folder, safe_serialization=True)
    peft_model.unload()
    return folder


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_cache) -> Settings:
    result = Settings(home=tmp_path_factory.mktemp("adapters-home"), database_url="sqlite://", model_cache=model_cache)
    ensure_bundled_model(result)
    return result


@pytest.fixture(scope="module")
def plain_base(settings):
    """A second, plain copy of the bundled weights: adapters are made on it and plain peft runs on it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        settings.model_cache_dir / BUNDLED_ID, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def adapter_a(plain_base, tmp_path_factory) -> AdapterRef:
    folder = make_adapter(plain_base, tmp_path_factory.mktemp("adapter-a"), seed=1,
                          targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          scale=0.1)
    return AdapterRef(name="adp_a", path=folder, label="fine-tune A")


@pytest.fixture(scope="module")
def adapter_b(plain_base, tmp_path_factory) -> AdapterRef:
    folder = make_adapter(plain_base, tmp_path_factory.mktemp("adapter-b"), seed=2,
                          targets=["q_proj", "v_proj", "up_proj"], scale=0.15)
    return AdapterRef(name="adp_b", path=folder, label="fine-tune B")


@pytest.fixture(scope="module")
def registry(settings):
    reg = ModelRegistry(settings)
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def model(registry) -> LocalModel:
    local = registry.get(BUNDLED_REF)
    local.load()
    return local


def plain_generate(model_like, local: LocalModel, messages=QUESTION) -> str:
    """Greedy ``generate`` of a plain transformers/peft model, prompt encoded as ours."""
    import torch

    ids = torch.tensor([local.encode(messages)])
    with torch.inference_mode():
        out = model_like.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
            repetition_penalty=1.0, pad_token_id=local._runtime().pad_id,
        )
    return local._runtime().tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def lora_layers(local: LocalModel) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in local._runtime().model.modules())


# --- answers -------------------------------------------------------------------------------

@pytest.mark.slow
def test_adapter_changes_the_answer_and_base_stays_as_plain_generate(registry, model, plain_base, adapter_a):
    base_reference = plain_generate(plain_base, model)  # the plain weights, no adapter anywhere

    view = registry.get(BUNDLED_REF, adapter=adapter_a)
    assert isinstance(view, AdaptedModel) and isinstance(view, ChatModel)
    assert view.base is model
    assert view.name == f"{model.name} + fine-tune A"
    assert view.context_window == model.context_window
    assert view.count_tokens(QUESTION) == model.count_tokens(QUESTION)

    usage = Usage()
    adapted = "".join(view.stream(QUESTION, GREEDY, usage=usage))
    assert adapted and adapted != base_reference
    assert usage.finish_reason in ("stop", "length") and usage.completion_tokens > 0
    assert "adp_a" in model.loaded_adapters() and model._adapters.injected

    assert answer(model) == base_reference  # the base answer while the adapter stays loaded ...
    assert model._adapters.injected and lora_layers(model) == 0  # ... ran on the plain base layers


@pytest.mark.slow
def test_adapter_answer_equals_plain_peft_generate(registry, model, plain_base, adapter_a, adapter_b):
    from peft import PeftModel

    ours = {ref.name: answer(registry.get(BUNDLED_REF, adapter=ref)) for ref in (adapter_a, adapter_b)}
    for ref in (adapter_a, adapter_b):
        peft_model = PeftModel.from_pretrained(plain_base, str(ref.path))
        try:
            expected = plain_generate(peft_model, model)
        finally:
            peft_model.unload()
        assert ours[ref.name] == expected, ref.name
    assert ours[adapter_a.name] != ours[adapter_b.name]


@pytest.mark.slow
def test_base_and_two_adapters_in_one_batch_match_each_alone(registry, model, adapter_a, adapter_b, monkeypatch):
    views = [model, registry.get(BUNDLED_REF, adapter=adapter_a), registry.get(BUNDLED_REF, adapter=adapter_b)]
    questions = [QUESTION, user("Name three colours."), user("How do I keep slugs off my lettuce?")]
    jobs = [(views[0], questions[0]), (views[1], questions[0]), (views[2], questions[1]), (views[1], questions[2])]
    alone = [answer(v, q) for v, q in jobs]

    rt = model._runtime()
    steps: list[tuple[int, dict[str, int]]] = []  # (rows, {adapter key: its rows}) of each forward

    def record(module, args, kwargs):
        groups = model._adapters.groups
        size = kwargs["input_ids"].shape[0]
        steps.append((size, {key: size if index is None else len(index) for key, index in groups}))

    hook = rt.model.register_forward_pre_hook(record, with_kwargs=True)
    together: list[str | None] = [None] * len(jobs)
    submitted = []
    submit = model._submit
    monkeypatch.setattr(model, "_submit", lambda request: (submit(request), submitted.append(request)))

    def chat(i: int) -> None:
        view, messages = jobs[i]
        together[i] = answer(view, messages)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(jobs))]
    try:
        with model._step_lock:  # hold the scheduler so that every chat is waiting when it runs
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while len(submitted) < len(jobs) and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=120)
    finally:
        hook.remove()

    assert together == alone
    keys = {model._adapters._slots[name].key for name in (adapter_a.name, adapter_b.name)}
    mixed = [(size, groups) for size, groups in steps if keys <= set(groups) and sum(groups.values()) < size]
    assert mixed, "the base and both adapters never shared a batch"


@pytest.mark.slow
def test_prefix_cache_is_kept_apart_per_adapter(registry, model, adapter_a):
    view = registry.get(BUNDLED_REF, adapter=adapter_a)
    first, second = user("How do I keep slugs off my lettuce?", INSTRUCTIONS), user("Which herbs grow in shade?", INSTRUCTIONS)
    model.clear_prefix_cache()
    cold = answer(view, second)  # the adapter's answer computed in full

    model.clear_prefix_cache()
    answer(model, first)  # the base model caches the shared instructions
    key = model._adapters._slots[adapter_a.name].key
    prompt = model.encode(second)
    assert model._prefix.match_length(prompt) > 0  # the base would reuse them ...
    assert model._prefix.match_length(prompt, key) == 0  # ... the adapter may not
    assert answer(view, second) == cold

    assert model._prefix.match_length(prompt, key) > 0  # its own prefixes are kept for it


# --- one base model -------------------------------------------------------------------------

@pytest.mark.slow
def test_one_base_model_serves_every_adapter(settings, model, adapter_a, adapter_b):
    causal_lm = type(model._runtime().model)

    def models_in_memory() -> int:
        gc.collect()
        return sum(type(o) is causal_lm for o in gc.get_objects())

    before = models_in_memory()
    reg = ModelRegistry(settings)
    try:
        base, view_a, view_b = (reg.get(BUNDLED_REF), reg.get(BUNDLED_REF, adapter=adapter_a),
                                reg.get(BUNDLED_REF, adapter=adapter_b))
        short = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=2)
        for view in (base, view_a, view_b):
            assert answer(view, settings=short)
        assert view_a.base is base and view_b.base is base
        assert reg.loaded() == [BUNDLED_REF]
        assert base.loaded_adapters() == ["adp_a", "adp_b"]
        assert models_in_memory() - before == 1
    finally:
        reg.close()


# --- forgetting -------------------------------------------------------------------------------

@pytest.mark.slow
def test_forget_adapter_frees_it_and_the_base_is_plain_again(registry, model, adapter_a, adapter_b):
    view_a = registry.get(BUNDLED_REF, adapter=adapter_a)
    base_text, a_text = answer(model), answer(view_a)
    registry.get(BUNDLED_REF, adapter=adapter_b).load()
    assert set(model.loaded_adapters()) >= {"adp_a", "adp_b"}

    assert registry.forget_adapter("adp_b") is True
    assert registry.forget_adapter("adp_b") is False  # already gone
    assert "adp_b" not in model.loaded_adapters() and "adp_a" in model.loaded_adapters()
    assert answer(view_a) == a_text

    # forgotten while a chat uses it: that chat finishes, then the adapter leaves
    long = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)
    running = view_a.stream(QUESTION, long)
    pieces = [next(running)]
    assert model.forget_adapter("adp_a") is True
    assert model._adapters.injected  # still in use
    pieces.extend(running)
    assert "".join(pieces) == answer(view_a, settings=long)  # loaded again for this new chat ...
    assert model.forget_adapter("adp_a") is True  # ... and forgotten again, now idle
    deadline = time.monotonic() + 10
    while model._adapters.injected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert model.loaded_adapters() == []
    assert not model._adapters.injected and model._adapters._peft is None
    assert lora_layers(model) == 0  # peft took its layers out
    assert answer(model) == base_text


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pickled_weights_are_refused(registry, model, adapter_a, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(adapter_a.path, folder)
    (folder / "adapter_model.bin").write_bytes(b"not loaded, only seen")
    ref = AdapterRef(name="adp_pickled", path=folder, label="pickled")

    with pytest.raises(ModelError) as caught:
        registry.get(BUNDLED_REF, adapter=ref)
    assert "unsafe format (adapter_model.bin)" in str(caught.value)
    assert "safetensors" in str(caught.value)
    with pytest.raises(ModelError):
        model.stream(QUESTION, GREEDY, adapter=ref)  # the model itself refuses too
    assert "adp_pickled" not in model.loaded_adapters()


@pytest.mark.slow
def test_adapter_for_another_base_is_refused(registry, model, adapter_a, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(adapter_a.path, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "hf:/models/qwen2.5-0.5b"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as caught:
        registry.get(BUNDLED_REF, adapter=AdapterRef(name="adp_other", path=other))
    assert "was trained for another model (hf:/models/qwen2.5-0.5b)" in str(caught.value)

    # the right name but layers of another size: refused when loading, the model unchanged
    misfit = tmp_path / "misfit"
    shutil.copytree(adapter_a.path, misfit)
    weights = load_file(misfit / "adapter_model.safetensors")
    first = sorted(k for k in weights if "lora_A" in k)[0]
    weights[first] = weights[first][:, :100].contiguous()
    save_file(weights, misfit / "adapter_model.safetensors")
    view = registry.get(BUNDLED_REF, adapter=AdapterRef(name="adp_misfit", path=misfit, label="misfit"))
    loaded_before = model.loaded_adapters()
    with pytest.raises(ModelError) as caught:
        view.stream(QUESTION, GREEDY)
    assert "does not fit" in str(caught.value) and "misfit" in str(caught.value)
    assert model.loaded_adapters() == loaded_before
    assert "misfit" not in str(getattr(model._adapters._peft, "peft_config", {}))


def test_adapter_folder_checks_need_no_model(tmp_path):
    names = {"bundled:smollm2-135m-instruct"}
    with pytest.raises(ModelError, match="cannot be found"):
        check_adapter(AdapterRef("x", tmp_path / "missing"), names, "SmolLM2")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelError, match="is incomplete"):
        check_adapter(AdapterRef("x", tmp_path), names, "SmolLM2")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_dora": True, "base_model_name_or_path": "bundled:smollm2-135m-instruct",
    }))
    with pytest.raises(ModelError, match="uses DoRA"):
        check_adapter(AdapterRef("x", tmp_path), names, "SmolLM2")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="is not a LoRA adapter"):
        check_adapter(AdapterRef("x", tmp_path), names, "SmolLM2")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"unsafe format \(optimizer.pt\)"):
        check_adapter(AdapterRef("x", tmp_path), names, "SmolLM2")


def test_model_servers_take_no_adapter(tmp_path):
    reg = ModelRegistry(Settings(home=tmp_path, database_url="sqlite://"))
    provider = {"base_url": "http://127.0.0.1:9/v1", "model": "llama3.2", "name": "Office Ollama"}
    adapter = AdapterRef(name="adp_x", path=tmp_path)
    with pytest.raises(InvalidInput) as caught:
        reg.get("openai:office", lambda _id: provider, adapter=adapter)
    assert "Office Ollama is a model server" in str(caught.value)
    assert reg.loaded() == []


def test_the_least_recently_used_idle_adapters_are_retired_first():
    """``retire_idle`` (shared by the torch and llama.cpp paths): adapters in use and the
    one just loaded are never dropped; the oldest idle ones go first, down to the cap."""
    from types import SimpleNamespace

    from personal_gpt.models.adapters import retire_idle

    def entry(name, last_used, users=0):
        return SimpleNamespace(name=name, last_used=last_used, users=users, retired=False)

    a, b, c, d = entry("a", 1.0), entry("b", 2.0, users=1), entry("c", 3.0), entry("d", 0.5)
    new = entry("new", 0.0)  # just loaded: kept even though its stamp is the oldest
    loaded = {x.name: x for x in (a, b, c, d, new)}
    retired: list = []
    retire_idle(loaded, new, 3, retired)
    assert set(loaded) == {"b", "c", "new"} and [x.name for x in retired] == ["d", "a"]
    assert d.retired and a.retired and not c.retired and not b.retired
    retire_idle(loaded, new, 1, retired)  # "b" is in use: the cap gives way to it
    assert set(loaded) == {"b", "new"} and retired[-1] is c
