"""The Conversations page and the feedback widgets through AppTest, on the real database
with the echo stand-in at the ChatModel seam: the empty state, the table and its filters,
opening a conversation (sources, feedback, not-recorded turns), "Fix this answer" and the
corrected answers (delete), thumbs in the creator's chat, and the Fine-tune tab's
"corrected answers" source."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.store import repos
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()


def page():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import conversations_view, glue

    conversations_view.render(glue.services(), Principal.local(), st.session_state["gpt_id"])


def chat_answers():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import glue

    svc, me, conv = glue.services(), Principal.local(), st.session_state["conv"]
    glue.show_messages(svc.messages(me, conv), "🌸", feedback=svc.answer_feedback(me, conv), key="t",
                       on_rate=lambda mid, rating, comment: svc.rate_answer(me, conv, mid, rating, comment))


def finetune_tab():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import finetune_tab, glue

    svc = glue.services()
    finetune_tab.render(svc, Principal.local(), svc.get_gpt(Principal.local(), st.session_state["gpt_id"]))


@pytest.fixture
def svc(home, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


@pytest.fixture
def gpt_id(svc):
    g = svc.create_gpt(ME, spec={"name": "Bloom helper", "instructions": "Help.", "avatar": "🌸"})
    svc.publish(ME, g.id)
    return g.id


def run(fn, **state) -> AppTest:
    at = AppTest.from_function(fn, default_timeout=60)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def chat(svc, gpt_id, *messages) -> str:
    conv = svc.start_conversation(ME, gpt_id)
    for m in messages:
        list(svc.send(ME, conv, m).pieces)
    return conv


def test_empty_state(svc, gpt_id):
    at = run(page, gpt_id=gpt_id)
    assert any("No conversations yet" in t for t in texts(at.info))
    assert not at.dataframe
    assert any("None yet" in t for t in texts(at.caption))


def test_table_filters_open_and_fix(svc, gpt_id):
    mine = chat(svc, gpt_id, "When do you open on Sundays?")
    link, _ = svc.create_share_link(ME, gpt_id, public=True, label="Newsletter")
    visitor = Visitor(visitor_id="anonymous-browser-0001")
    theirs = svc.start_shared_conversation(link.id, visitor)
    list(svc.send_shared(link.id, visitor, theirs, "Do you deliver to **Leeds**? <script>x</script>").pieces)
    answer = svc.shared_messages(link.id, visitor, theirs)[-1].id
    svc.rate_shared_answer(link.id, visitor, theirs, answer, -1, "Did not answer")
    with svc.store.tx() as conn:  # a turn kept without its text (privacy setting)
        repos.add_message(conn, mine, "user", "", {"unrecorded": True})
        repos.add_message(conn, mine, "assistant", "", {"unrecorded": True})

    at = run(page, gpt_id=gpt_id)
    table = at.dataframe[0].value
    assert len(table) == 2
    row = table[table["Where"] == "Link “Newsletter”"].iloc[0]
    assert (row["Person"], row["Messages"], row["👎"], row["👍"]) == ("anonymous visitor", 2, 1, 0)
    assert set(table["Source"]) == {"Chat", "Share link"}

    at.text_input(key=f"cv-{gpt_id}-text").input("leeds").run()
    assert not at.exception and len(at.dataframe[0].value) == 1
    at.text_input(key=f"cv-{gpt_id}-text").input("no such words").run()
    assert not at.dataframe and any("No conversation matches" in t for t in texts(at.info))
    at.text_input(key=f"cv-{gpt_id}-text").input("").run()
    at.selectbox(key=f"cv-{gpt_id}-source").set_value("chat").run()
    assert list(at.dataframe[0].value["Source"]) == ["Chat"]
    at.selectbox(key=f"cv-{gpt_id}-source").set_value("Any").run()
    at.selectbox(key=f"cv-{gpt_id}-link").set_value(link.id).run()
    assert list(at.dataframe[0].value["Where"]) == ["Link “Newsletter”"]

    at.selectbox(key=f"cv-open-{gpt_id}").set_value(theirs).run()
    assert not at.exception
    assert any("Do you deliver to **Leeds**?" in t for t in texts(at.markdown))
    assert not any(m.allow_html for m in at.markdown)  # visitors' text is never rendered as HTML
    assert any("👎 Not helpful" in t for t in texts(at.caption)) and "Did not answer" in texts(at.text)

    at.text_area(key=f"fix-a-{answer}").input("Yes, we deliver to Leeds for 4.99 pounds.")
    at.radio(key=f"fix-t-{answer}").set_value("finetune")
    at.button(key=f"FormSubmitter:fix-{answer}-Save the right answer").click().run()
    assert not at.exception and not at.error
    (fix,) = svc.list_corrections(ME, gpt_id)
    assert (fix.target, fix.answer) == ("finetune", "Yes, we deliver to Leeds for 4.99 pounds.")
    assert fix.question.startswith("Do you deliver to **Leeds**?")
    assert any("fine-tuning data" in t.value for t in at.toast)
    assert any("In the fine-tuning data" in t for t in texts(at.caption))

    at.selectbox(key=f"cv-{gpt_id}-link").set_value("Any").run()
    at.selectbox(key=f"cv-open-{gpt_id}").set_value(mine).run()
    assert any("Not recorded (privacy setting)" in t for t in texts(at.caption))

    at.button(key=f"fix-del-{fix.id}").click().run()
    assert not at.exception
    assert svc.list_corrections(ME, gpt_id) == []


def test_csv_download(svc, gpt_id):
    chat(svc, gpt_id, "=HYPERLINK(\"http://evil.example\")")
    at = run(page, gpt_id=gpt_id)
    at.button(key=f"cv-csv-{gpt_id}").click().run()
    assert not at.exception
    assert at.get("download_button"), "the download appears once prepared"


def test_thumbs_and_comment_in_the_creators_chat(svc, gpt_id):
    conv = chat(svc, gpt_id, "Hello")
    answer = svc.messages(ME, conv)[-1].id
    at = run(chat_answers, conv=conv)
    at.feedback(key=f"t-{answer}").set_value(0).run()  # thumbs down
    assert not at.exception
    assert svc.answer_feedback(ME, conv)[answer].rating == -1
    assert any("Thanks for your feedback" in t.value for t in at.toast)
    at.text_area(key=f"t-ct-{answer}").input("Too short")
    at.button(key=f"FormSubmitter:t-c-{answer}-Send comment").click().run()
    assert not at.exception
    saved = svc.answer_feedback(ME, conv)[answer]
    assert (saved.rating, saved.comment) == (-1, "Too short")
    at.feedback(key=f"t-{answer}").set_value(1).run()
    saved = svc.answer_feedback(ME, conv)[answer]
    assert (saved.rating, saved.comment) == (1, "Too short")  # the comment stays with a changed rating
    fresh = run(chat_answers, conv=conv)  # a new session shows the stored rating
    assert fresh.feedback(key=f"t-{answer}").value == 1


def test_finetune_tab_offers_the_corrected_answers(svc, gpt_id):
    conv = chat(svc, gpt_id, "Do you sell tulips?")
    answer = svc.messages(ME, conv)[-1].id
    svc.fix_answer(ME, answer, "Yes, from March to May.", "finetune")
    at = run(finetune_tab, gpt_id=gpt_id)
    source = at.radio(key=f"ft-src-{gpt_id}")
    assert "Corrected answers from conversations (1)" in source.options
    source.set_value("Corrected answers from conversations").run()
    assert not at.exception
    table = at.get("arrow_data_frame")[0].value if at.get("arrow_data_frame") else None
    editor = table if table is not None else at.dataframe[0].value
    assert list(editor["prompt"]) == ["Do you sell tulips?"] and list(editor["response"]) == ["Yes, from March to May."]


def test_thumbs_on_the_client_share_page(svc, gpt_id, monkeypatch):
    from pathlib import Path

    link, _ = svc.create_share_link(ME, gpt_id, public=True, label="Client")
    visitor = Visitor(visitor_id="v" * 43)
    monkeypatch.setattr(glue, "share_visitor", lambda: (link.id, visitor))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "pages" / "shared.py"), default_timeout=60)
    at.run()
    at.chat_input[0].set_value("Do you deliver?").run()
    assert not at.exception
    (conv,) = svc.shared_conversations(link.id, visitor)
    answer = svc.shared_messages(link.id, visitor, conv.id)[-1].id
    at.feedback(key=f"sfb-{conv.id}-{answer}").set_value(1).run()
    assert not at.exception
    assert svc.creator_conversation(ME, conv.id).turns[-1].rating == 1
    svc.revoke_share_link(ME, link.id)  # a dead link takes no rating: the page says so, nothing changes
    at.feedback(key=f"sfb-{conv.id}-{answer}").set_value(0).run()
    assert not at.exception
    assert svc.creator_conversation(ME, conv.id).turns[-1].rating == 1


def test_the_page_file_picks_a_gpt_then_shows_its_conversations(svc, gpt_id):
    from pathlib import Path

    path = str(Path(__file__).resolve().parents[2] / "pages" / "conversations.py")
    chat(svc, gpt_id, "Hello there")
    at = AppTest.from_file(path, default_timeout=60)
    at.run()
    assert not at.exception
    at.selectbox[0].set_value(next(g for g in svc.list_gpts(ME) if g.id == gpt_id)).run()
    assert not at.exception
    assert at.query_params["gpt"] == gpt_id
    assert [t.value for t in at.title] == ["Conversations · Bloom helper"]
    assert list(at.dataframe[0].value["Title"]) == ["Hello there"]
