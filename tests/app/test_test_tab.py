"""The builder's Test tab through AppTest: the template's test questions are
listed, a run asks them through the real chat path (echo stand-in at the
ChatModel seam, real database and embedder) and shows the four figures."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
HOURS = b"Our shop in Leeds opens Monday to Saturday from 9am to 5pm. We are closed on Sundays."


def tab_script(gpt_id: str) -> None:
    from personal_gpt.auth import Principal
    from personal_gpt.web import glue
    from personal_gpt.web.test_tab import render_test_tab

    render_test_tab(glue.services(), Principal.local(), gpt_id)


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


def test_template_questions_run_and_show_the_figures(svc):
    gpt = svc.create_gpt(ME, template_id="faq-bot", blanks={"business_name": "Bloom & Branch",
                                                            "topic": "flowers", "contact": "hi@bloom.example"})
    svc.add_knowledge(ME, gpt.id, [("hours.txt", HOURS)], run_jobs=False)
    svc.jobs.run_until_idle()
    spec = gpt.spec.model_copy(update={"knowledge_only": True})
    svc.save_draft(ME, gpt.id, spec, gpt.revision)
    template = next(t for t in svc.templates() if t.id == "faq-bot")

    at = AppTest.from_function(tab_script, kwargs={"gpt_id": gpt.id}, default_timeout=60)
    at.run()
    assert not at.exception
    (button,) = at.button
    assert button.label == f"Run {len(template.test_questions)} test questions"
    button.click().run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) == {"Right answers", "Said “I don't know” when it should", "Said “I don't know” wrongly",
                            "Cited the right place"}
    # no expected answers and nothing marked unanswerable: the figures that need them say so
    assert metrics["Right answers"] == "—" and metrics["Said “I don't know” when it should"] == "—"
    assert len(at.expander) == len(template.test_questions)
    assert {c.source for c in svc.list_conversations(ME, gpt.id)} == {"test"}


def test_the_creators_rows_become_questions():
    from personal_gpt.web.test_tab import questions_from_rows

    qs = questions_from_rows([
        {"question": "  When are you   open? ", "answer": "9am", "unanswerable": False},
        {"question": "Do you sell cakes?", "answer": "ignored", "unanswerable": True},
        {"question": "", "answer": "x", "unanswerable": False},
        {"question": None, "answer": None, "unanswerable": None},
    ])
    assert [(q.question, q.answers, q.unanswerable) for q in qs] == [
        ("When are you open?", ["9am"], False), ("Do you sell cakes?", [], True)]
