"""Every page through streamlit.testing's AppTest, on the real database, with
the echo stand-in at the ChatModel seam so page runs stay fast (the real model
is exercised by the model tests and the browser test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
APP = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


def app(page: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(query)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def test_my_gpts_empty_state_and_gallery(svc):
    at = app()
    assert not at.exception
    assert any("You have no GPTs yet" in t for t in texts(at.info))
    labels = [b.label for b in at.button]
    assert labels.count("Use template") >= 10 and "Start blank" in labels


def test_create_from_template_dialog(svc):
    at = app()
    tpl = svc.templates()[0]
    at.button(key=f"tpl-{tpl.id}").click().run()
    assert not at.exception
    for blank in tpl.blanks:
        at.text_input(key=f"blank-{tpl.id}-{blank.key}").input(blank.example or "Acme")
    next(b for b in at.button if b.label == "Create GPT").click().run()
    assert not at.exception
    gpts = svc.list_gpts(ME)
    assert len(gpts) == 1 and gpts[0].name == tpl.name


def test_create_with_missing_blanks_shows_one_sentence(svc):
    tpl = next(t for t in svc.templates() if any(b.required for b in t.blanks))
    at = app()
    at.button(key=f"tpl-{tpl.id}").click().run()
    next(b for b in at.button if b.label == "Create GPT").click().run()
    assert not at.exception
    assert any("Fill in" in t for t in texts(at.error))
    assert svc.list_gpts(ME) == []


def test_my_gpts_lists_cards(svc):
    g = svc.create_gpt(ME, name="Ask Maria")
    svc.publish(ME, g.id)
    svc.create_gpt(ME, name="Draft only")
    at = app()
    assert not at.exception
    md = " ".join(texts(at.markdown))
    assert "Ask Maria" in md and "Draft only" in md
    assert any("Published v1" in t for t in texts(at.caption))
    assert at.button(key=f"chat-{g.id}").disabled is False


def test_builder_edit_save_publish(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py", gpt=g.id)
    assert not at.exception
    k = f"{g.id}-{g.revision}"
    at.text_area(key=f"instr-{k}").input("Answer in one short sentence.")
    at.text_area(key=f"starters-{k}").input("What do you do?\nHow much?")
    next(b for b in at.button if b.label == "Save draft").click().run()
    assert not at.exception
    saved = svc.get_gpt(ME, g.id)
    assert saved.latest_version == 2 and saved.spec.instructions == "Answer in one short sentence."
    assert saved.spec.starters == ["What do you do?", "How much?"]
    next(b for b in at.button if b.label == "Publish").click().run()
    assert not at.exception
    assert svc.get_gpt(ME, g.id).published_version == 2


def test_builder_empty_name_blocks_saving_with_a_sentence(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py", gpt=g.id)
    at.text_input(key=f"name-{g.id}-{g.revision}").input("   ").run()
    assert not at.exception
    assert "Give your GPT a name." in texts(at.error)
    assert next(b for b in at.button if b.label == "Save draft").disabled
    assert svc.get_gpt(ME, g.id).latest_version == 1


def test_builder_token_count_against_window(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py", gpt=g.id)
    assert any("context window" in (p.text or "") for p in at.get("progress"))


def test_builder_preview_chat_uses_unsaved_draft(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py", gpt=g.id)
    at.text_area(key=f"instr-{g.id}-{g.revision}").input("Unsaved instructions")
    at.chat_input(key=f"pinput-{g.id}").set_value("hello there").run()
    assert not at.exception
    assert any("You said: hello there" in t for t in texts(at.markdown))
    assert svc.models.model.calls[-1][0]["content"] == "Unsaved instructions"
    assert svc.get_gpt(ME, g.id).latest_version == 1, "previewing saves no version"


def test_builder_versions_restore(svc):
    g = svc.create_gpt(ME, name="Helper")
    svc.save_draft(ME, g.id, g.spec.model_copy(update={"instructions": "v2 text"}), g.revision)
    at = app("pages/builder.py", gpt=g.id)
    at.button(key="restore-1").click().run()
    assert not at.exception
    latest = svc.get_gpt(ME, g.id)
    assert latest.latest_version == 3 and latest.spec.instructions == g.spec.instructions


def test_builder_delete_needs_confirmation(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py", gpt=g.id)
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not at.exception
    assert len(svc.list_gpts(ME)) == 1, "one click deletes nothing"
    next(b for b in at.button if b.label == "Delete forever").click().run()
    assert not at.exception
    assert svc.list_gpts(ME) == []


@pytest.mark.parametrize("bad", ["gpt_000000000000", "../etc/passwd", "x" * 5000])
def test_unknown_gpt_in_url(svc, bad):
    at = app("pages/builder.py", gpt=bad)
    assert not at.exception
    assert "There is no GPT with that id." in texts(at.error)
    at = app("pages/chat.py", gpt=bad)
    assert not at.exception
    assert "There is no GPT with that id." in texts(at.error)


def test_chat_page_unpublished_gpt(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/chat.py", gpt=g.id)
    assert not at.exception
    assert any("is not published yet" in t for t in texts(at.error))


def test_chat_starters_answer_regenerate_new_chat(svc):
    g = svc.create_gpt(ME, name="Helper")
    svc.save_draft(ME, g.id, g.spec.model_copy(update={"starters": ["What can you do?"]}), g.revision)
    svc.publish(ME, g.id)
    at = app("pages/chat.py", gpt=g.id)
    assert not at.exception
    next(b for b in at.button if b.label == "What can you do?").click().run()
    assert not at.exception
    assert any("You said: What can you do?" in t for t in texts(at.markdown))
    at.run()  # the page shows the saved conversation on the next run
    next(b for b in at.button if b.label == "Regenerate").click().run()
    at.run()
    assert not at.exception
    convs = svc.list_conversations(ME, g.id, source="chat")
    assert len(convs) == 1
    assert [m.role for m in svc.messages(ME, convs[0].id)] == ["user", "assistant"]
    next(b for b in at.sidebar.button if b.label == "New chat").click().run()
    at.chat_input[0].set_value("second chat").run()
    assert len(svc.list_conversations(ME, g.id, source="chat")) == 2


def test_chat_without_selection_lists_published(svc):
    at = app("pages/chat.py")
    assert not at.exception
    assert any("Publish a GPT" in t for t in texts(at.info))


@pytest.fixture
def openai_server():
    """A real OpenAI-compatible HTTP server on 127.0.0.1 (tests/support/openai_server.py)."""
    from tests.support.openai_server import running_openai_server

    with running_openai_server(api_key="sk-page-test") as server:
        yield server


def test_settings_add_test_remove_provider(svc, openai_server):
    openai_server.api_key, openai_server.model = "sk-page-test", "echo"
    at = app("pages/settings.py")
    assert not at.exception
    at.text_input[0].input("Local test server")
    at.text_input[1].input("not a url")
    at.text_input[2].input(openai_server.model)
    at.text_input[3].input(openai_server.api_key)
    next(b for b in at.button if b.label == "Add provider").click().run()
    assert any("must start with http://" in t for t in texts(at.error))
    at.text_input[0].input("Local test server")
    at.text_input[1].input(openai_server.base_url)
    at.text_input[2].input(openai_server.model)
    at.text_input[3].input(openai_server.api_key)
    next(b for b in at.button if b.label == "Add provider").click().run()
    assert not at.exception
    (prov,) = svc.list_providers(ME)
    at.button(key=f"test-{prov.id}").click().run()
    assert not at.exception
    assert any("Connected" in t for t in texts(at.success))
    at.button(key=f"del-{prov.id}").click().run()
    at.button(key=f"yes-{prov.id}").click().run()
    assert svc.list_providers(ME) == []


def test_builder_knowledge_tab_lists_removes_and_searches(svc):
    g = svc.create_gpt(ME, name="Shop")
    svc.add_knowledge(ME, g.id, [("hours.txt", b"We are closed on Sundays."), ("broken.pdf", b"%PDF-1.4 nonsense"),
                                 ("empty.txt", b"")], run_jobs=False)
    svc.jobs.run_until_idle()
    at = app("pages/builder.py", gpt=g.id)
    assert not at.exception
    md = " ".join(texts(at.markdown))
    assert "hours.txt" in md and "broken.pdf" in md
    captions = " ".join(texts(at.caption))
    assert "1 passages" in captions or "passages" in captions
    broken = next(f for f in svc.list_knowledge(ME, g.id) if f.display_name == "broken.pdf")
    assert broken.status == "failed" and broken.error in captions
    at.text_input(key=f"ksearch-{g.id}").input("When are you closed?").run()
    assert not at.exception
    assert any("hours.txt" in t for t in texts(at.caption))
    at.button(key=f"krm-{broken.id}").click().run()
    assert len(svc.list_knowledge(ME, g.id)) == 2, "removing asks first"
    at.button(key="kconfirm-yes").click().run()
    assert not at.exception
    assert [f.display_name for f in svc.list_knowledge(ME, g.id)] == ["hours.txt"]


def test_chat_shows_sources(svc):
    g = svc.create_gpt(ME, name="Shop")
    svc.add_knowledge(ME, g.id, [("hours.txt", b"We are closed on Sundays and open 9 to 5 otherwise.")], run_jobs=False)
    svc.jobs.run_until_idle()
    svc.publish(ME, g.id)
    at = app("pages/chat.py", gpt=g.id)
    at.chat_input[0].set_value("Are you open on Sundays?").run()
    at.run()
    assert not at.exception
    assert any(e.label.startswith("Sources (") for e in at.expander)
    assert any("[1] hours.txt" in t for t in texts(at.caption))


def test_builder_without_selection_offers_a_picker(svc):
    at = app("pages/builder.py")
    assert not at.exception
    assert any("You have no GPTs yet" in t for t in texts(at.info))
    g = svc.create_gpt(ME, name="Helper")
    at = app("pages/builder.py")
    at.selectbox[0].set_value(svc.list_gpts(ME)[0]).run()
    assert not at.exception
    assert at.query_params.get("gpt") in (g.id, [g.id])
