"""The API keys section of the Share tab through AppTest, on the real database: a tiny
page that calls ``render_api_keys`` (the builder's Share tab calls it the same way).
Keys are shown once, listed without the key, revoked only after a confirmation."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.errors import Unauthorized
from personal_gpt.services import Services
from personal_gpt.web import glue

ME = Principal.local()
OTHER = Principal(issuer="https://idp.example", subject="someone-else")

PAGE = """
import streamlit as st
from personal_gpt.auth import Principal
from personal_gpt.web import glue
from personal_gpt.web.keys_tab import render_api_keys

render_api_keys(glue.services(), Principal.local(), st.query_params["gpt"])
"""


@pytest.fixture
def svc(home, monkeypatch):
    s = Services()
    monkeypatch.setattr(glue, "services", lambda: s)
    monkeypatch.delenv("PERSONAL_GPT_BASE_URL", raising=False)
    yield s
    s.close()


def page(gpt_id: str) -> AppTest:
    at = AppTest.from_string(PAGE, default_timeout=30)
    at.query_params["gpt"] = gpt_id
    at.run()
    assert not at.exception
    return at


def button(at, label):
    return next(b for b in at.button if b.label == label)


def test_a_new_key_is_shown_once_and_works(svc):
    g = svc.create_gpt(ME, name="Garden helper")
    svc.publish(ME, g.id)
    at = page(g.id)
    assert any("No API keys yet." in i.value for i in at.info)
    assert not at.warning  # published: no warning
    at.text_input(key=f"apikey-name-{g.id}").input("Zapier")
    button(at, "Create key").click().run()
    assert not at.exception
    (key,) = [c.value for c in at.code if c.value.startswith("pgk_")]
    assert any("will not be shown again" in w.value for w in at.warning)
    assert svc.api_caller(key).key.gpt_id == g.id  # the key shown is the real one
    (listed,) = svc.list_api_keys(ME, g.id)
    assert listed.name == "Zapier"
    table = at.dataframe[0].value
    assert list(table["Name"]) == ["Zapier"] and list(table["Key"]) == [f"pgk_…{key[-4:]}"]
    assert list(table["Status"]) == ["active"] and list(table["Uses"]) == [0]
    assert key not in table.to_string()
    at.run()  # shown once: gone on the next run
    assert not [c for c in at.code if c.value.startswith("pgk_")]


def test_revoking_asks_first_and_can_be_cancelled(svc):
    g = svc.create_gpt(ME, name="Garden helper")
    svc.publish(ME, g.id)
    view, key = svc.create_api_key(ME, g.id, name="Make")
    at = page(g.id)
    assert button(at, "Revoke…").disabled  # nothing chosen yet
    at.selectbox(key=f"apikey-pick-{g.id}").set_value(view.id).run()
    button(at, "Revoke…").click().run()
    assert any("Revoke **Make" in w.value for w in at.warning)
    button(at, "Cancel").click().run()
    assert svc.list_api_keys(ME, g.id)[0].active
    at.selectbox(key=f"apikey-pick-{g.id}").set_value(view.id).run()
    button(at, "Revoke…").click().run()
    button(at, "Revoke key").click().run()
    assert not at.exception
    assert not svc.list_api_keys(ME, g.id)[0].active
    with pytest.raises(Unauthorized):
        svc.api_caller(key)
    assert list(at.dataframe[0].value["Status"]) == ["revoked"]
    assert not [s for s in at.selectbox if s.key == f"apikey-pick-{g.id}"]  # nothing left to revoke


def test_snippets_name_this_gpt_and_the_v1_base_url(svc):
    g = svc.create_gpt(ME, name="Garden helper")
    at = page(g.id)
    assert any("not published yet" in w.value for w in at.warning)
    snippets = [c.value for c in at.code]
    assert any(s.startswith("curl http") and "/v1/chat/completions" in s and g.id in s for s in snippets)
    assert any("OpenAI(base_url=" in s and "/v1" in s and g.id in s for s in snippets)


def test_someone_elses_gpt_shows_one_sentence(svc):
    theirs = svc.create_gpt(OTHER, name="Not yours")
    at = page(theirs.id)
    assert [e.value for e in at.error] == ["There is no GPT with that id."]
    assert not at.button and not at.code


def test_recent_calls_are_listed_and_readable(home, monkeypatch):
    from tests.support.fake_model import FakeRegistry

    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    try:
        g = s.create_gpt(ME, name="Garden helper")
        s.publish(ME, g.id)
        _, key = s.create_api_key(ME, g.id, name="Bubble")
        turn = s.api_chat(key, g.id, [{"role": "user", "content": "When do I sow **beans**?"}], user="shop-7")
        answer = "".join(turn.reply.pieces)
        at = page(g.id)
        calls = next(d.value for d in at.dataframe if "Question" in d.value.columns)
        assert list(calls["Key"]) == ["Bubble"] and list(calls["End user"]) == ["shop-7"]
        assert list(calls["Question"]) == ["When do I sow **beans**?"] and list(calls["Messages"]) == [2]
        at.selectbox(key=f"apikey-call-{g.id}").set_value(turn.conversation_id).run()
        assert not at.exception
        shown = " ".join(m.value for m in at.markdown)
        assert "sow" in shown and answer.split()[0] in shown
    finally:
        s.close()
