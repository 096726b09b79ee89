"""The OpenAI-compatible API against the real server (a subprocess on 127.0.0.1) and the
real bundled model: the official ``openai`` SDK as the client (streaming and not, and
models.list), then raw httpx for every bad input — each gets its status and OpenAI's JSON
error shape, and the server answers a good request afterwards. One server for the module;
GPTs answer greedily with a few tokens so the file stays quick on two cores."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.services import Services
from personal_gpt.store.schema import conversations, messages
from tests.support.server import start_app_server

ME = Principal.local()
SHORT = {"temperature": 0.0, "max_new_tokens": 4}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache):
    """The server, the creator's services on the same database, and a few GPTs and keys."""
    home = tmp_path_factory.mktemp("api-home")
    no_auth = home.parent / "no-sign-in.toml"
    no_auth.write_text("# no sign-in\n", encoding="utf-8")
    svc = Services(Settings(home=home, database_url=f"sqlite:///{home / 'personal-gpt.db'}", model_cache=model_cache))
    gpts = {}
    for name, generation, publish in (
        ("Main", SHORT, True), ("Other", SHORT, True), ("Draft", SHORT, False),
        ("Strict", SHORT, True), ("Talker", {"temperature": 0.0, "max_new_tokens": 400}, True),
    ):
        g = svc.create_gpt(ME, spec={"name": name, "instructions": "You are a helpful assistant. Answer briefly.",
                                     "generation": generation})
        if publish:
            svc.publish(ME, g.id)
        gpts[name] = g.id
    svc.save_embed_settings(ME, gpts["Strict"], limits={"max_message_chars": 200, "per_visitor_minute": 1})
    keys = {name: svc.create_api_key(ME, gpt_id, name=f"{name} key") for name, gpt_id in gpts.items()}
    revoked_view, revoked = svc.create_api_key(ME, gpts["Main"], name="old")
    svc.revoke_api_key(ME, revoked_view.id)
    server = start_app_server(home, env={
        "PERSONAL_GPT_MODEL_CACHE": str(model_cache), "PERSONAL_GPT_SECRETS": str(no_auth),
        "PERSONAL_GPT_DATABASE_URL": "",
    }, log_dir=home.parent)
    try:
        yield {"svc": svc, "server": server, "gpts": gpts, "keys": {n: k for n, (_, k) in keys.items()},
               "key_ids": {n: v.id for n, (v, _) in keys.items()}, "revoked": revoked}
    finally:
        server.stop()
        svc.close()


@pytest.fixture(scope="module")
def http(world):
    with httpx.Client(base_url=world["server"].url, timeout=120) as client:
        yield client


def sdk(world, key):
    from openai import OpenAI

    return OpenAI(base_url=world["server"].url + "/v1", api_key=key, max_retries=0, timeout=120)


def saved(world, conv_prefix: str):
    """The conversation behind a completion id, and its messages."""
    conv_id = "conv_" + conv_prefix.removeprefix("chatcmpl-")
    with world["svc"].store.read() as conn:
        conv = conn.execute(sa.select(conversations).where(conversations.c.id == conv_id)).one()
        rows = conn.execute(sa.select(messages.c.role, messages.c.content, messages.c.meta)
                            .where(messages.c.conversation_id == conv_id).order_by(messages.c.id)).all()
    return conv, rows


def test_sdk_non_streaming_completion_is_answered_and_recorded(world):
    client = sdk(world, world["keys"]["Main"])
    gpt_id = world["gpts"]["Main"]
    completion = client.chat.completions.create(
        model=gpt_id, messages=[{"role": "system", "content": "Talk like a pirate."},
                                {"role": "user", "content": "What is the capital of France?"}],
    )
    assert completion.object == "chat.completion" and completion.model == gpt_id
    answer = completion.choices[0].message.content
    assert answer and completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= SHORT["max_new_tokens"]
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.model_extra["citations"] == []  # the extra field, present even when empty
    conv, rows = saved(world, completion.id)
    assert (conv.source, conv.api_key_id, conv.gpt_id) == ("api", world["key_ids"]["Main"], gpt_id)
    assert [(r.role, r.content) for r in rows] == [("user", "What is the capital of France?"), ("assistant", answer)]


def test_sdk_streaming_completion_streams_the_recorded_answer(world):
    client = sdk(world, world["keys"]["Main"])
    gpt_id = world["gpts"]["Main"]
    stream = client.chat.completions.create(
        model=gpt_id, messages=[{"role": "user", "content": "Name a colour."}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == gpt_id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert finals[0].model_extra["citations"] == []
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert text
    _, rows = saved(world, chunks[0].id)
    assert [(r.role, r.content) for r in rows] == [("user", "Name a colour."), ("assistant", text)]


def test_sdk_models_list_shows_only_the_keys_gpt(world):
    models = sdk(world, world["keys"]["Main"]).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(world["gpts"]["Main"], "model", "personal-gpts")]
    assert models.data[0].model_extra["name"] == "Main"
    assert sdk(world, world["keys"]["Draft"]).models.list().data == []  # unpublished: nothing to call


def test_sdk_raises_its_own_errors_for_our_statuses(world):
    import openai

    with pytest.raises(openai.AuthenticationError):
        sdk(world, world["revoked"]).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        sdk(world, world["keys"]["Main"]).chat.completions.create(
            model=world["gpts"]["Other"], messages=[{"role": "user", "content": "hi"}])


def post(http, key, body=None, *, raw=None, headers=None, **kw):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
        return http.post("/v1/chat/completions", content=raw, headers=h, **kw)
    return http.post("/v1/chat/completions", json=body, headers=h, **kw)


def good(world, name="Main", text="Say hi."):
    return {"model": world["gpts"][name], "messages": [{"role": "user", "content": text}]}


def assert_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["message"] and "Traceback" not in response.text
    return body["error"]


def test_every_bad_input_gets_its_status_and_an_openai_error(world, http):
    key, main = world["keys"]["Main"], world["gpts"]["Main"]
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 1_100_000 + b'"}]}'

    def chunked():
        yield big[:500_000]
        yield big[500_000:]

    cases = [
        ("malformed JSON", lambda: post(http, key, raw=b'{"model": "x", "messages": ['), 400),
        ("not an object", lambda: post(http, key, []), 400),
        ("wrong content type", lambda: post(http, key, raw=json.dumps(good(world)).encode(),
                                            headers={"Content-Type": "text/plain"}), 400),
        ("no messages", lambda: post(http, key, {"model": main}), 400),
        ("empty messages", lambda: post(http, key, {"model": main, "messages": []}), 400),
        ("unknown role", lambda: post(http, key, {"model": main, "messages": [{"role": "tool", "content": "x"}]}), 400),
        ("empty message", lambda: post(http, key, {"model": main, "messages": [{"role": "user", "content": " "}]}), 400),
        ("image part", lambda: post(http, key, {"model": main, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}), 400),
        ("stream not a bool", lambda: post(http, key, {**good(world), "stream": "yes"}), 400),
        ("n=2", lambda: post(http, key, {**good(world), "n": 2}), 400),
        ("no model", lambda: post(http, key, {"messages": good(world)["messages"]}), 400),
        ("body over 1 MB", lambda: post(http, key, raw=big), 413),
        ("chunked body over 1 MB", lambda: post(http, key, raw=chunked()), 413),
        ("message over the GPT's limit", lambda: post(http, world["keys"]["Strict"], good(world, "Strict", "x" * 201)), 413),
        ("no key", lambda: post(http, None, good(world)), 401),
        ("not bearer", lambda: post(http, None, good(world), headers={"Authorization": f"Basic {key}"}), 401),
        ("malformed key", lambda: post(http, key[:-1], good(world)), 401),
        ("unknown key", lambda: post(http, "pgk_" + "A" * 43, good(world)), 401),
        ("revoked key", lambda: post(http, world["revoked"], good(world)), 401),
        ("another GPT's key", lambda: post(http, world["keys"]["Other"], good(world)), 403),
        ("a GPT that does not exist", lambda: post(http, key, {**good(world), "model": "gpt_000000000000"}), 403),
        ("the key's GPT is not published", lambda: post(http, world["keys"]["Draft"], good(world, "Draft")), 404),
        ("models without a key", lambda: http.get("/v1/models"), 401),
        ("GET on chat", lambda: http.get("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}), 405),
        ("unknown API route", lambda: http.post("/v1/embeddings", json={}), 404),
    ]
    seen = {}
    for what, call, status in cases:
        error = assert_error(call(), status)
        seen[what] = error
    assert seen["no messages"]["param"] == "messages" and seen["no model"]["param"] == "model"
    assert seen["revoked key"]["message"] == seen["unknown key"]["message"]
    assert seen["another GPT's key"] == seen["a GPT that does not exist"]  # nothing about other GPTs leaks
    assert seen["unknown key"]["code"] == "invalid_api_key" and seen["unknown key"]["type"] == "authentication_error"
    # the server is up and answers a good request afterwards
    ok = post(http, key, good(world))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert world["server"].process.poll() is None
    schema = http.get("/v1/openapi.json").json()
    assert set(schema["paths"]) == {"/chat/completions", "/models"} and schema["openapi"].startswith("3.")
    assert "Traceback" not in world["server"].output()


def test_rate_limit_gives_429_with_retry_after(world, http):
    key = world["keys"]["Strict"]
    first = post(http, key, good(world, "Strict"))
    assert first.status_code == 200, first.text
    second = post(http, key, good(world, "Strict"))
    error = assert_error(second, 429)
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(second.headers["Retry-After"]) <= 60


def test_a_client_that_goes_away_stops_the_answer_and_it_is_saved_as_cancelled(world, http):
    key, gpt_id = world["keys"]["Talker"], world["gpts"]["Talker"]
    body = {"model": gpt_id, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        # the model runs in a worker thread: the server keeps answering meanwhile
        started = time.monotonic()
        assert httpx.get(world["server"].url + "/api/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 3
    conv_id = "conv_" + first["id"].removeprefix("chatcmpl-")
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline:
        with world["svc"].store.read() as conn:
            rows = conn.execute(sa.select(messages.c.role, messages.c.meta)
                                .where(messages.c.conversation_id == conv_id).order_by(messages.c.id)).all()
        if len(rows) == 2:
            break
        time.sleep(0.2)
    assert [r.role for r in rows] == ["user", "assistant"]
    assert rows[1].meta["finish_reason"] == "cancelled"
    assert rows[1].meta["completion_tokens"] < 400


# --- in process: a model that fails (the stand-in at the ChatModel seam) --------------------


class FailingModel:
    """Answers two words, then fails — or fails at once with ``at_once``."""

    name = "failing (test stand-in)"
    context_window = 8192

    def __init__(self, at_once=False):
        self.at_once = at_once

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 4 for m in messages)

    def stream(self, messages, settings, cancel=None, usage=None):
        from personal_gpt.errors import ModelError

        if not self.at_once:
            yield "Partial"
            yield " answer"
        raise ModelError("The model stopped answering; try again in a minute.")


@pytest.fixture
def failing(home, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from personal_gpt.web import glue
    from personal_gpt.web.api import api_routes
    from tests.support.fake_model import FakeRegistry

    def make(at_once):
        svc = Services(models=FakeRegistry(FailingModel(at_once)))
        monkeypatch.setattr(glue, "_services", svc)
        g = svc.create_gpt(ME, name="Fragile")
        svc.publish(ME, g.id)
        _, key = svc.create_api_key(ME, g.id)
        client = TestClient(Starlette(routes=api_routes()))
        made.append((svc, client))
        return svc, client, g.id, key

    made = []
    yield make
    for svc, client in made:
        client.close()
        svc.close()


def test_a_model_failing_before_the_first_token_is_a_502_error_for_both_modes(failing):
    svc, client, gpt_id, key = failing(at_once=True)
    for stream in (False, True):
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": gpt_id, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        error = assert_error(r, 502)
        assert error["message"] == "The model stopped answering; try again in a minute."
        assert error["type"] == "server_error"
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(conversations)).scalar() == 0


def test_a_model_failing_mid_answer_ends_the_stream_with_an_error_event(failing):
    svc, client, gpt_id, key = failing(at_once=False)
    body = {"model": gpt_id, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "The model stopped answering; try again in a minute." and set(error) == ERROR_KEYS
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == "Partial answer"
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={**body, "stream": False})
    assert assert_error(r, 502)["code"] == "model_error"


@pytest.mark.parametrize("show", [True, False])
def test_citations_reach_the_caller_only_when_the_creator_shows_sources(home, monkeypatch, show):
    """With *show sources* on, the caller gets number, file, page and evidence sentence of each
    citation (never other keys) in ``citations`` on the completion, or on the final chunk; off,
    an empty list (SECURITY #25: file names stay with the creator)."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from personal_gpt.web import glue
    from personal_gpt.web.api import api_routes
    from tests.support.fake_model import FakeRegistry

    cited = [{"n": 1, "file": "hours.txt", "page": None, "text": "Closed on Sundays.", "quote": "Closed", "x": [1]}]
    svc = Services(models=FakeRegistry())
    real_answer = svc._answer

    def answer_with_citations(*args, **kwargs):  # the real chat path, then citations as knowledge would add them
        reply = real_answer(*args, **kwargs)
        reply.citations = [dict(c) for c in cited]
        return reply

    monkeypatch.setattr(svc, "_answer", answer_with_citations)
    monkeypatch.setattr(glue, "_services", svc)
    g = svc.create_gpt(ME, name="Shop")
    g = svc.save_draft(ME, g.id, {**g.spec.model_dump(), "show_sources": show}, g.revision)
    svc.publish(ME, g.id)
    _, key = svc.create_api_key(ME, g.id)
    body = {"model": g.id, "messages": [{"role": "user", "content": "Open on Sunday?"}]}
    seen = [{"n": 1, "file": "hours.txt", "page": None, "text": "Closed on Sundays."}] if show else []
    try:
        with TestClient(Starlette(routes=api_routes())) as client:
            r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
            assert r.status_code == 200 and r.json()["citations"] == seen
            r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={**body, "stream": True})
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
            assert len(final) == 1 and final[0]["citations"] == seen
            assert all("citations" not in e for e in events if e not in final)
    finally:
        svc.close()
