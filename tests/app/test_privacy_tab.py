"""The builder's Privacy tab through AppTest, on the real database with the echo
stand-in at the ChatModel seam: defaults, saving retention and the two toggles (with a
toast), "delete conversations older than N days" behind a confirmation, and
another creator's GPT getting one sentence."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.store.schema import conversations
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()


def privacy_section():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import glue
    from personal_gpt.web.privacy_tab import render_privacy

    render_privacy(glue.services(), Principal.local(), st.session_state["gpt_id"])


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


@pytest.fixture
def gpt_id(svc):
    g = svc.create_gpt(ME, spec={"name": "Bloom helper", "instructions": "Be brief."})
    svc.publish(ME, g.id)
    return g.id


def run(gpt_id: str) -> AppTest:
    at = AppTest.from_function(privacy_section, default_timeout=30)
    at.session_state["gpt_id"] = gpt_id
    at.run()
    assert not at.exception
    return at


def by_label(widgets, label):
    return next(w for w in widgets if w.label == label)


def test_defaults_then_save_retention_and_both_toggles(svc, gpt_id):
    at = run(gpt_id)
    assert at.radio[0].value == "Keep forever"
    assert [t.value for t in at.toggle] == [False, False]
    assert not any(n.label.startswith("Days after") for n in at.number_input)

    at.radio[0].set_value("Delete after a number of days").run()
    by_label(at.number_input, "Days after a conversation's last message").set_value(14).run()
    by_label(at.toggle, "Do not record conversations").set_value(True).run()
    by_label(at.toggle, "Hide e-mail addresses and phone numbers in stored conversations").set_value(True).run()
    by_label(at.button, "Save privacy settings").click().run()
    assert not at.exception and not at.error
    assert [t.value for t in at.toast] == ["Privacy settings saved."]
    s = svc.privacy_settings(ME, gpt_id)
    assert (s.retention_days, s.record, s.redact) == (14, False, True)

    again = run(gpt_id)  # a fresh visit shows what is stored
    assert again.radio[0].value == "Delete after a number of days"
    assert by_label(again.number_input, "Days after a conversation's last message").value == 14
    assert [t.value for t in again.toggle] == [True, True]

    again.radio[0].set_value("Keep forever").run()
    by_label(again.button, "Save privacy settings").click().run()
    assert svc.privacy_settings(ME, gpt_id).retention_days is None


def test_delete_old_conversations_asks_first(svc, gpt_id):
    old, new = svc.start_conversation(ME, gpt_id), svc.start_conversation(ME, gpt_id)
    for conv in (old, new):
        "".join(svc.send(ME, conv, "hello").pieces)
    with svc.store.tx() as conn:
        conn.execute(sa.update(conversations).where(conversations.c.id == old)
                     .values(updated_at=datetime.now(timezone.utc) - timedelta(days=40)))

    at = run(gpt_id)
    by_label(at.number_input, "Delete conversations older than (days)").set_value(30).run()
    by_label(at.button, "Delete…").click().run()
    assert "more than 30 days old" in at.warning[0].value
    assert len(svc.list_conversations(ME, gpt_id)) == 2  # nothing deleted before the confirmation

    by_label(at.button, "Cancel").click().run()
    assert not at.warning and len(svc.list_conversations(ME, gpt_id)) == 2

    by_label(at.button, "Delete…").click().run()
    by_label(at.button, "Delete conversations").click().run()
    assert not at.exception
    assert "Deleted 1 conversation older than 30 days" in at.success[0].value
    assert [c.id for c in svc.list_conversations(ME, gpt_id)] == [new]


def test_someone_elses_gpt_shows_one_sentence(svc):
    other = svc.create_gpt(Principal(issuer="https://idp.example", subject="other"), name="Not yours")
    at = run(other.id)
    assert [e.value for e in at.error] == ["There is no GPT with that id."]
    assert not at.toggle
