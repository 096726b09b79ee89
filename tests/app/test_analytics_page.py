"""The analytics page through AppTest on the real database (echo stand-in at the ChatModel
seam): empty states, the figures of conversations the test makes, the tables (text only
in st.dataframe, never as Markdown/HTML) and the CSV download buttons."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.store import repos
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
PAGE = str(Path(__file__).resolve().parents[2] / "pages" / "analytics.py")
HOSTILE = "<img src=x onerror=alert(1)> **bold** =HYPERLINK(\"http://x\",\"y\")"


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


def run(**query) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


def shown_text(at) -> str:
    """Everything rendered as Markdown-ish text (where untrusted text must never appear)."""
    parts = [e.value for e in (*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.title,
                               *at.subheader)]
    return "\n".join(str(p) for p in parts)


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def downloads(at) -> list[str]:
    return [d.label for d in at.get("download_button")]


def test_empty_states(svc):
    at = run()
    assert any("no GPTs yet" in i.value for i in at.info)
    g = svc.create_gpt(ME, name="Quiet one")
    svc.publish(ME, g.id)
    at = run(gpt=g.id)
    assert any("No conversations in this period yet" in i.value for i in at.info)
    assert not at.metric and not downloads(at)


@pytest.fixture
def busy(svc):
    g = svc.create_gpt(ME, name="Bloom helper")
    svc.publish(ME, g.id)
    other = svc.create_gpt(ME, name="Garden helper")
    svc.publish(ME, other.id)
    conv = svc.start_conversation(ME, g.id, "preview")
    list(svc.send(ME, conv, "Do you deliver?").pieces)
    link, _ = svc.create_share_link(ME, g.id, label="Newsletter", public=True)
    visitor = Visitor(visitor_id="visitor01" + "x" * 20)
    shared = svc.start_shared_conversation(link.id, visitor)
    list(svc.send_shared(link.id, visitor, shared, HOSTILE).pieces)
    with svc.store.read() as conn:
        answer = repos.list_messages(conn, shared)[-1]
    assert answer.role == "assistant"
    svc.rate_shared_answer(link.id, visitor, shared, answer.id, -1, "Wrong price")
    return g, other


def test_figures_tables_and_downloads(svc, busy):
    g, _other = busy
    at = run(gpt=g.id)
    # what the fixture made: 2 conversations, 4 messages, 2 people (the creator, one visitor), one 👎
    m = metrics(at)
    assert (m["Conversations"], m["Messages"], m["People"], m["👍 Thumbs up"], m["👎 Thumbs down"]) == (
        "2", "4", "2", "0", "1")
    assert at.selectbox[0].value == g.id
    labels = downloads(at)
    for expected in ("Conversations (CSV, one row per message)", "Per day (CSV)", "Share links (CSV)",
                     "Negative feedback (CSV)"):
        assert expected in labels
    frames = [df.value for df in at.dataframe]
    negative = next(f for f in frames if "comment" in f.columns)
    assert list(negative["comment"]) == ["Wrong price"] and list(negative["question"]) == [HOSTILE]
    links = next(f for f in frames if "where" in f.columns and "conversations" in f.columns)
    assert list(links["where"]) == ["Newsletter"]
    # untrusted text only ever in dataframes
    assert "onerror" not in shown_text(at) and "HYPERLINK" not in shown_text(at)


def test_all_gpts_breakdown_and_period(svc, busy):
    g, other = busy
    at = run()
    assert at.selectbox[0].value == "__all__"
    by_gpt = next(df.value for df in at.dataframe if "gpt" in df.value.columns and "thumbs_down" in df.value.columns)
    assert dict(zip(by_gpt["gpt"], by_gpt["conversations"])) == {"Bloom helper": 2, "Garden helper": 0}
    assert "By GPT (CSV)" in downloads(at)
    at.radio[0].set_value("Last 7 days").run()
    assert not at.exception
    assert metrics(at)["Conversations"] == "2"
    at.selectbox[0].set_value(other.id).run()
    assert not at.exception
    assert at.query_params["gpt"] == [other.id] or at.query_params["gpt"] == other.id
    assert any("No conversations in this period yet" in i.value for i in at.info)


def test_someone_elses_gpt_id_shows_all_of_mine(svc, busy):
    at = run(gpt="gpt_000000000000")
    assert any("no GPT with that id" in w.value for w in at.warning)
    assert at.selectbox[0].value == "__all__"
