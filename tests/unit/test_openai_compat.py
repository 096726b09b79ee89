"""OpenAICompatModel against a real HTTP server on 127.0.0.1 (tests/support/openai_server.py)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `support`

from support.openai_server import running_openai_server  # noqa: E402

from personal_gpt.errors import ModelError  # noqa: E402
from personal_gpt.gpts import GenerationSettings  # noqa: E402
from personal_gpt.models.base import ChatModel, Usage  # noqa: E402
from personal_gpt.models.openai_compat import OpenAICompatModel  # noqa: E402

KEY = "sk-test-5d41402abc4b2a76"
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=64)


@pytest.fixture(scope="module")
def server():
    with running_openai_server(api_key=KEY) as running:
        yield running


def client(server, model="echo", key=KEY, **kwargs) -> OpenAICompatModel:
    return OpenAICompatModel(server.base_url, key, model, **kwargs)


def say(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_streams_the_answer_in_pieces(server):
    model = client(server, name="Echo server")
    assert isinstance(model, ChatModel)
    usage = Usage()

    pieces = list(model.stream(say("hello there brave new world"), GREEDY, usage=usage))

    assert pieces == ["hello", " there", " brave", " new", " world"]
    assert usage.finish_reason == "stop"
    assert usage.completion_tokens == 5
    assert 0 <= usage.first_token_s <= usage.total_s
    sent = server.state.requests[-1]
    assert sent["stream"] is True and sent["model"] == "echo" and sent["max_tokens"] == 64
    assert sent["messages"][-1] == {"role": "user", "content": "hello there brave new world"}
    assert model.name == "Echo server"


def test_max_tokens_gives_length(server):
    usage = Usage()
    settings = GenerationSettings(temperature=0.0, max_new_tokens=2)
    text = "".join(client(server).stream(say("one two three four"), settings, usage=usage))
    assert text == "one two"
    assert usage.finish_reason == "length"


def test_count_tokens_is_an_approximation(server):
    assert client(server).count_tokens([{"role": "user", "content": "x" * 41}]) == 11 + 4


def test_connection_lists_models(server):
    assert client(server).test_connection() == ["echo", "slow-echo"]


def test_connection_says_when_the_model_is_not_offered(server):
    with pytest.raises(ModelError) as caught:
        client(server, model="gpt-9").test_connection()
    assert str(caught.value) == "The model server does not offer the model 'gpt-9'. It offers: echo, slow-echo."


@pytest.mark.parametrize("call", ["stream", "test_connection"])
def test_wrong_key_is_refused_without_repeating_it(server, call):
    wrong = "sk-wrong-0123456789abcdef"
    model = client(server, key=wrong)
    with pytest.raises(ModelError) as caught:
        if call == "stream":
            list(model.stream(say("hi"), GREEDY))
        else:
            model.test_connection()
    message = str(caught.value)
    assert message.startswith("The model server refused the API key")
    assert wrong not in message and KEY not in message
    assert wrong not in repr(model)


def test_unreachable_server(server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    model = OpenAICompatModel(f"http://127.0.0.1:{port}/v1", KEY, "echo", timeout=5)
    for call in (lambda: list(model.stream(say("hi"), GREEDY)), model.test_connection):
        with pytest.raises(ModelError) as caught:
            call()
        assert str(caught.value).startswith(f"Could not reach the model server at http://127.0.0.1:{port}/v1: ")
        assert KEY not in str(caught.value)


def test_unknown_model(server):
    with pytest.raises(ModelError) as caught:
        list(client(server, model="nope").stream(say("hi"), GREEDY))
    assert str(caught.value) == "The model server does not know the model 'nope'."


def test_wrong_path(server):
    model = OpenAICompatModel(server.url, KEY, "echo")  # forgot the /v1
    with pytest.raises(ModelError) as caught:
        list(model.stream(say("hi"), GREEDY))
    assert "has no /chat/completions endpoint" in str(caught.value)


def test_bad_address_is_refused_at_once():
    with pytest.raises(ModelError, match="must start with http"):
        OpenAICompatModel("localhost:8000/v1", KEY, "echo")


def test_cancel_mid_stream_closes_the_response(server):
    cancel = threading.Event()
    usage = Usage()
    words = " ".join(f"w{i}" for i in range(60))  # 60 words at 50 ms each: 3 s if not cancelled
    before = server.state.disconnects
    pieces = []
    started = time.monotonic()
    for piece in client(server, model="slow-echo").stream(say(words), GREEDY, cancel=cancel, usage=usage):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert pieces == ["w0", " w1", " w2"]
    assert usage.finish_reason == "cancelled"
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 5
    while server.state.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.disconnects == before + 1
