"""ModelRegistry: references -> one shared model each (no weights are loaded here)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `support`

from support.openai_server import running_openai_server  # noqa: E402

from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.errors import InvalidInput, ModelError  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.local import LocalModel  # noqa: E402
from personal_gpt.models.openai_compat import OpenAICompatModel  # noqa: E402
from personal_gpt.models.registry import ModelRegistry, parse_ref  # noqa: E402

KEY = "sk-registry-test-key"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A folder that looks like a HF model to the registry (weights load lazily, never here)."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 1024}))
    return folder


@pytest.fixture
def registry(tmp_path, model_dir):
    reg = ModelRegistry(Settings(home=tmp_path, database_url="sqlite://", default_model=f"hf:{model_dir}"))
    yield reg
    reg.close()


def test_same_reference_same_instance(registry, model_dir):
    first = registry.get(f"hf:{model_dir}")
    assert isinstance(first, LocalModel)
    assert registry.get(f"hf:{model_dir}") is first
    assert registry.get(f"  hf:{model_dir}/../my-model ") is first  # normalised
    assert registry.get("") is first  # "" = the default model
    assert first.context_window == 1024
    assert registry.loaded() == [f"hf:{model_dir}"]


def test_concurrent_gets_create_one_instance(registry, model_dir):
    got = []
    barrier = threading.Barrier(8)

    def get():
        barrier.wait()
        got.append(registry.get(f"hf:{model_dir}"))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(m is got[0] for m in got)


@pytest.mark.parametrize("ref, message", [
    ("gpt-4", "'gpt-4' is not a model this app knows."),
    ("ftp:somewhere", "'ftp:somewhere' is not a model this app knows."),
    ("hf:", "'hf:' is not a model this app knows."),
    ("openai:", "'openai:' is not a model this app knows."),
    ("bundled:llama-70b", "There is no bundled model called 'llama-70b'. Bundled models: smollm2-135m-instruct."),
    ("hf:models/mine", "A local model folder must be given as a full path (hf:/…), not 'models/mine'."),
    ("openai:ollama", "The model server 'ollama' cannot be used here: no model servers are set up."),
])
def test_bad_references_are_refused(registry, ref, message):
    with pytest.raises(InvalidInput) as caught:
        registry.get(ref)
    assert str(caught.value).startswith(message)


def test_missing_folder_is_a_model_error(registry, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        registry.get(f"hf:{tmp_path / 'gone'}")


def test_unknown_provider(registry):
    with pytest.raises(InvalidInput) as caught:
        registry.get("openai:nobody", provider_lookup=lambda provider_id: None)
    assert str(caught.value) == "There is no model server called 'nobody'; ask the operator to set it up."


def test_openai_reference_resolves_through_the_lookup():
    with running_openai_server(api_key=KEY) as server:
        providers = {"local-vllm": {"base_url": server.base_url, "api_key": KEY, "model": "echo", "name": "Team server"}}
        reg = ModelRegistry(Settings(home=Path("/nonexistent"), database_url="sqlite://"))
        try:
            model = reg.get("openai:local-vllm", provider_lookup=providers.get)
            assert isinstance(model, OpenAICompatModel)
            assert model.name == "Team server"
            assert reg.get("openai:local-vllm", provider_lookup=providers.get) is model
            text = "".join(model.stream([{"role": "user", "content": "ping pong"}], GenerationSettings(temperature=0)))
            assert text == "ping pong"
            assert reg.describe("openai:local-vllm", providers.get).label == "Team server"

            providers["local-vllm"] = dict(providers["local-vllm"], api_key="sk-rotated")
            rotated = reg.get("openai:local-vllm", provider_lookup=providers.get)
            assert rotated is not model  # new key, new client
            with pytest.raises(ModelError, match="refused the API key"):
                list(rotated.stream([{"role": "user", "content": "hi"}], GenerationSettings(temperature=0)))
        finally:
            reg.close()


def test_describe_needs_no_loading(registry, model_dir):
    bundled = registry.describe("bundled:smollm2-135m-instruct")
    assert (bundled.kind, bundled.label) == ("bundled", "SmolLM2-135M-Instruct (bundled)")
    local = registry.describe(f"hf:{model_dir}")
    assert (local.kind, local.label, local.ref) == ("hf", "my-model (local folder)", f"hf:{model_dir}")
    assert registry.loaded() == []


def test_parse_ref_defaults():
    assert parse_ref("", "bundled:smollm2-135m-instruct") == (
        "bundled:smollm2-135m-instruct", "bundled", "smollm2-135m-instruct")


def test_close_closes_local_models(registry, model_dir):
    model = registry.get(f"hf:{model_dir}")
    registry.close()
    assert registry.loaded() == []
    with pytest.raises(ModelError, match="shut down"):
        model.load()
