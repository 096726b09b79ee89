"""The Share tab's embed section through AppTest, on the real database with the echo
stand-in at the ChatModel seam: the empty state (embed off), saving sites, theme and
limits, the snippets, the "test from this domain" check and reading a visitor's
widget conversation."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
SITE = "https://www.bloom.example"


def embed_section():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import glue
    from personal_gpt.web.embed_tab import render_embed

    render_embed(glue.services(), Principal.local(), st.session_state["gpt_id"])


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    monkeypatch.setenv("PERSONAL_GPT_BASE_URL", "https://gpts.example.org")
    yield s
    s.close()


@pytest.fixture
def gpt_id(svc):
    g = svc.create_gpt(ME, spec={"name": "Bloom helper", "instructions": "SECRET", "starters": ["Hi"]})
    svc.publish(ME, g.id)
    return g.id


def run(gpt_id: str) -> AppTest:
    at = AppTest.from_function(embed_section, default_timeout=30)
    at.session_state["gpt_id"] = gpt_id
    at.run()
    assert not at.exception
    return at


def by_label(widgets, label):
    return next(w for w in widgets if w.label == label)


def test_empty_list_means_off_and_saving_turns_it_on(svc, gpt_id):
    at = run(gpt_id)
    assert any("embed is off" in i.value for i in at.info)
    assert not at.code  # no snippet while off
    by_label(at.text_area, "Allowed sites (one per line)").input("www.bloom.example\nhttp://localhost:3000")
    by_label(at.text_input, "Title").input("Ask Bloom")
    by_label(at.text_area, "Greeting").input("Hello!")
    by_label(at.selectbox, "Position").set_value("bottom-left")
    by_label(at.number_input, "Messages per visitor per minute").set_value(4)
    by_label(at.button, "Save widget settings").click().run()
    assert not at.exception and not at.error
    settings = svc.embed_settings(ME, gpt_id)
    assert settings.sites == [SITE, "http://localhost:3000"]
    assert settings.theme["title"] == "Ask Bloom" and settings.theme["position"] == "bottom-left"
    assert settings.limits.per_visitor_minute == 4
    codes = [c.value for c in at.code]
    assert f'<script src="https://gpts.example.org/embed.js" data-gpt="{gpt_id}" async></script>' in codes
    assert any(f"https://gpts.example.org/embed/{gpt_id}?site=https://www.bloom.example" in c for c in codes)
    # SECURITY #33: the snippets carry no secret: no share token, API key, signed value or long random string
    import re

    snippets = " ".join(c for c in codes if "embed" in c)
    assert not re.search(r"pg[sk]_|[A-Za-z0-9_-]{32,}|\.[A-Za-z0-9_-]{20,}\.", snippets.replace(gpt_id, "GPT"))
    assert not any("embed is off" in i.value for i in at.info)


def test_bad_input_gets_one_sentence_and_saves_nothing(svc, gpt_id):
    at = run(gpt_id)
    by_label(at.text_area, "Allowed sites (one per line)").input("http://www.bloom.example")
    by_label(at.button, "Save widget settings").click().run()
    assert not at.exception
    assert any("https" in e.value for e in at.error)
    assert svc.embed_settings(ME, gpt_id).sites == []


def test_site_check_and_reading_a_widget_conversation(svc, gpt_id):
    svc.save_embed_settings(ME, gpt_id, sites=[SITE])
    visitor = Visitor(visitor_id="v" * 30)
    conv = svc.start_embed_conversation(gpt_id, visitor, SITE)
    list(svc.send_embed(gpt_id, visitor, conv, "Do you deliver?").pieces)
    at = run(gpt_id)
    by_label(at.text_input, "Test from this domain").input("https://bloom.example/contact")
    by_label(at.button, "Check").click().run()
    assert any("different sites" in e.value for e in at.error)
    by_label(at.text_input, "Test from this domain").input("https://www.bloom.example/contact")
    by_label(at.button, "Check").click().run()
    assert any("will load there" in s.value for s in at.success)
    frame = at.dataframe[0].value
    assert list(frame["Site"]) == [SITE] and list(frame["Messages"]) == [2]
    by_label(at.selectbox, "Read a conversation").set_value(conv).run()
    assert not at.exception
    texts = [m.value for m in at.markdown]
    assert "Do you deliver?" in texts and "You said: Do you deliver?" in texts
