"""The whole chat path with real models: the bundled SmolLM2 through services,
an OpenAI-compatible endpoint over real HTTP on 127.0.0.1, and the failures a
creator can meet (a model folder that does not load, a refused key)."""

from __future__ import annotations

import pytest

from personal_gpt.auth import Principal
from personal_gpt.errors import ModelError
from personal_gpt.services import Services
from tests.support.openai_server import running_openai_server

ME = Principal.local()


@pytest.fixture
def svc(home):
    s = Services()
    yield s
    s.close()


def greedy(spec, **extra):
    gen = spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 48, **extra})
    return spec.model_copy(update={"generation": gen})


@pytest.mark.slow
def test_bundled_model_answers_through_the_chat_path(svc):
    gpt = svc.create_gpt(ME, name="Geo", spec=None)
    spec = greedy(gpt.spec.model_copy(update={"instructions": "You are a helpful geography assistant."}))
    gpt = svc.save_draft(ME, gpt.id, spec, gpt.revision)
    svc.publish(ME, gpt.id)
    conv = svc.start_conversation(ME, gpt.id)
    reply = svc.send(ME, conv, "What is the capital of France?")
    pieces = list(reply.pieces)
    assert len(pieces) > 1, "the answer streams in pieces"
    assert "Paris" in "".join(pieces)
    saved = svc.messages(ME, conv)[-1]
    assert saved.content == "".join(pieces)
    assert saved.meta["model"].startswith("SmolLM2-135M-Instruct")
    assert saved.meta["completion_tokens"] > 0 and saved.meta["first_token_s"] > 0
    # greedy decoding is deterministic: the same question gives the same answer
    conv2 = svc.start_conversation(ME, gpt.id)
    assert "".join(svc.send(ME, conv2, "What is the capital of France?").pieces) == saved.content


def test_gpt_on_an_openai_compatible_endpoint(svc):
    with running_openai_server(api_key="sk-real-http") as server:
        prov = svc.add_provider(ME, name="Test server", base_url=server.base_url, model="echo", api_key="sk-real-http")
        assert "echo" in svc.test_provider(ME, prov.id)
        gpt = svc.create_gpt(ME, name="Remote", spec=None)
        spec = gpt.spec.model_copy(update={"model": prov.ref})
        conv = svc.start_conversation(ME, gpt.id, source="preview")
        answer = "".join(svc.send(ME, conv, "hello over http", spec=spec).pieces)
        assert "hello over http" in answer
        assert [m.role for m in svc.messages(ME, conv)] == ["user", "assistant"]


def test_refused_key_is_one_sentence_and_saves_nothing(svc):
    with running_openai_server(api_key="sk-right") as server:
        prov = svc.add_provider(ME, name="Test server", base_url=server.base_url, model="echo", api_key="sk-wrong")
        with pytest.raises(ModelError) as err:
            svc.test_provider(ME, prov.id)
        assert "sk-wrong" not in str(err.value)
        gpt = svc.create_gpt(ME, name="Remote", spec=None)
        spec = gpt.spec.model_copy(update={"model": prov.ref})
        conv = svc.start_conversation(ME, gpt.id, source="preview")
        with pytest.raises(ModelError):
            list(svc.send(ME, conv, "hello", spec=spec).pieces)
        assert svc.messages(ME, conv) == []


def test_unreachable_endpoint(svc):
    from tests.support.server import free_port

    prov = svc.add_provider(ME, name="Gone", base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")
    with pytest.raises(ModelError, match="Could not reach"):
        svc.test_provider(ME, prov.id)


def test_model_folder_that_does_not_load(svc, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    gpt = svc.create_gpt(ME, name="Broken", spec=None)
    spec = gpt.spec.model_copy(update={"model": f"hf:{broken}"})
    conv = svc.start_conversation(ME, gpt.id, source="preview")
    with pytest.raises(ModelError) as err:
        svc.send(ME, conv, "hello", spec=spec)
    assert "Traceback" not in str(err.value) and str(err.value).endswith(".")
    assert svc.messages(ME, conv) == []


INSTRUCTIONS = ("You are Garden Helper for the Leeds community garden. Answer members' questions about sowing, "
                "watering, compost and pests in plain words, with months for a mild wet climate, and suggest the "
                "Saturday drop-in at the shed when you are unsure. Never recommend chemical pesticides: explain the "
                "risks to bees, pets, children and soil life, and offer netting, hand-picking, companion planting "
                "and crop rotation instead. Say clearly when a plant is poisonous (foxglove, rhubarb leaves, yew).")


def test_a_start_warms_the_gpts_chatted_with_last(home):
    """After a restart (a new Services: empty model caches), ``warm_models`` computes the
    instructions of published GPTs that have conversations, on the real bundled model, so the
    next question starts from the kept prefix; unpublished or never-chatted GPTs are left alone
    and nothing is recorded."""
    from personal_gpt.chat import build_messages

    svc = Services()
    try:
        used = svc.create_gpt(ME, name="Garden helper", spec=None)
        spec = greedy(used.spec.model_copy(update={"instructions": INSTRUCTIONS}), max_new_tokens=4)
        used = svc.save_draft(ME, used.id, spec, used.revision)
        svc.publish(ME, used.id)
        "".join(svc.send(ME, svc.start_conversation(ME, used.id), "Hello").pieces)
        quiet = svc.create_gpt(ME, name="Never asked", spec=None)
        svc.publish(ME, quiet.id)
        svc.create_gpt(ME, name="Draft only", spec=None)
    finally:
        svc.close()

    restarted = Services()
    try:
        conversations_before = len(restarted.creator_conversations(ME, used.id))
        model = restarted._model_for_uid(restarted._uid(ME), spec, used.id)
        prompt = model.encode(build_messages(spec, [], "When do I sow carrots?"))
        assert model._prefix.match_length(prompt) == 0  # a fresh start: nothing kept
        assert restarted.warm_models() == [used.id]
        instructions = len(model.encode([{"role": "system", "content": INSTRUCTIONS}]))
        assert model._prefix.match_length(prompt) >= instructions - 4  # the next question starts after them
        assert len(restarted.creator_conversations(ME, used.id)) == conversations_before  # nothing recorded
        assert restarted.warm_models(limit=0) == []
    finally:
        restarted.close()
