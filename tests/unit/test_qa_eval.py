"""Test questions: the JSON-lines format, the scoring rules, a run through the
real chat path (echo stand-in, then the real bundled model), and the
`personal-gpt eval` command's text and --json output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from personal_gpt import qa_eval
from personal_gpt.auth import Principal
from personal_gpt.cli import main
from personal_gpt.errors import InvalidInput
from personal_gpt.services import Services
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
PRICES = b"""# Bloom & Branch price list

## Delivery
Delivery in Leeds costs 4.99 pounds and is free for orders over 50 pounds.

## Bouquets
The Sunrise bouquet costs 35 pounds. The Meadow bouquet costs 42 pounds.
"""
HOURS = b"Our shop in Leeds opens Monday to Saturday from 9am to 5pm. We are closed on Sundays."
QUESTIONS = [
    {"question": "How much is the Meadow bouquet?", "answers": ["42 pounds"]},
    {"question": "How much does delivery cost in Leeds?", "answers": ["4.99 pounds"], "file": "prices.md"},
    {"question": "How much is the Tulip bouquet?", "unanswerable": True},
    {"question": "Do you sell wedding cakes?", "unanswerable": True},
]


def lines(rows):
    return [json.dumps(r) for r in rows]


def test_questions_file_format_and_one_sentence_errors():
    qs = qa_eval.parse_questions(["# a comment", ""] + lines(QUESTIONS) + ['{"question": "Hi?", "answers": "Hello"}'])
    assert [q.unanswerable for q in qs] == [False, False, True, True, False]
    assert qs[1].file == "prices.md" and qs[4].answers == ["Hello"]
    for bad, says in [("not json", "Line 1 is not valid JSON"), ('{"answers": ["x"]}', 'Line 1 needs a "question"'),
                      ('{"question": "q", "answer": "x"}', "keys this command does not know: answer"),
                      ('{"question": "q", "answers": ["x"], "unanswerable": true}', "also gives answers"),
                      ('{"question": "q", "unanswerable": "yes"}', "true or false")]:
        with pytest.raises(InvalidInput, match=says):
            qa_eval.parse_questions([bad])
    with pytest.raises(InvalidInput, match="no questions"):
        qa_eval.parse_questions(["", "# nothing"])


def test_containment_uses_squad_normalisation():
    assert qa_eval.contains_answer("It costs 42 Pounds.", ["42 pounds"])
    assert qa_eval.contains_answer("In the 10th century", ["10th century"])
    assert not qa_eval.contains_answer("It costs 142 pounds", ["42 pounds"])
    assert qa_eval.normalize("The Meadow, a bouquet!") == "meadow bouquet"


def test_scores_count_each_kind_of_outcome():
    q_ans = qa_eval.EvalQuestion("q1", ["42"])
    q_una = qa_eval.EvalQuestion("q2", [], True)
    cite = [{"file": "prices.md", "text": "The Meadow bouquet costs 42 pounds."}]
    items = [
        qa_eval.judge(q_ans, "42 pounds", None, cite, "Nope.", 1.0),  # right, cited right
        qa_eval.judge(q_ans, "17 pounds", None, [{"text": "Delivery costs 4.99."}], "Nope.", 1.0),  # wrong, cited wrong
        qa_eval.judge(q_ans, "Nope.", {"action": "refuse"}, [], "Nope.", 1.0),  # false abstention
        qa_eval.judge(q_una, "I don't know.", None, [], "Nope.", 1.0),  # model abstained: right
        qa_eval.judge(q_una, "It is 9 pounds.", None, cite, "Nope.", 3.0),  # should have abstained
    ]
    r = qa_eval.score(items)
    assert (r.answerable, r.unanswerable) == (3, 2)
    assert r.containment == pytest.approx(1 / 3, abs=1e-3) and r.false_abstention == pytest.approx(1 / 3, abs=1e-3)
    assert r.abstention == 0.5 and r.citation_accuracy == 0.5 and r.seconds_per_answer == 1.4
    assert [i.verdict for i in items] == ["right", "wrong", "abstained (wrong)", "abstained (right)",
                                          "answered (should abstain)"]
    text = qa_eval.format_report(r)
    assert "answer containment:           33%" in text and "abstention on unanswerables:  50%" in text


@pytest.fixture
def shop(home):
    svc = Services(models=FakeRegistry())
    gpt = svc.create_gpt(ME, name="Shop")
    svc.add_knowledge(ME, gpt.id, [("prices.md", PRICES), ("hours.txt", HOURS)], run_jobs=False)
    svc.jobs.run_until_idle()
    spec = svc.get_gpt(ME, gpt.id).spec.model_copy(update={"knowledge_only": True})
    gpt = svc.save_draft(ME, gpt.id, spec, gpt.revision)
    svc.publish(ME, gpt.id)
    yield svc, gpt
    svc.close()


def test_run_eval_goes_through_the_chat_path_in_test_conversations(shop):
    svc, gpt = shop
    report = qa_eval.run_eval(svc, ME, gpt.id, qa_eval.parse_questions(lines(QUESTIONS)))
    # the echo model never answers; knowledge-only turns it into quotes of the evidence or refusals
    meadow, delivery, tulip, cakes = report.items
    assert meadow.answer == "The files say: “The Meadow bouquet costs 42 pounds.” [1]" and meadow.contained
    assert delivery.cited_ok and delivery.citations[0]["file"] == "prices.md"
    assert tulip.abstained and cakes.abstained
    assert report.abstention == 1.0 and report.false_abstention == 0.0 and report.citation_accuracy == 1.0
    assert {c.source for c in svc.list_conversations(ME, gpt.id)} == {"test"}


def test_eval_command_prints_figures_and_json(shop, tmp_path, monkeypatch):
    svc, gpt = shop
    monkeypatch.setattr("personal_gpt.cli._services", lambda: svc)
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines(QUESTIONS)), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", gpt.id, str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "abstention on unanswerables:  100%" in result.stdout and "citation accuracy:" in result.stdout
    result = runner.invoke(main, ["eval", gpt.id, str(path), "--json"], catch_exceptions=False)
    data = json.loads(result.stdout)
    assert data["abstention"] == 1.0 and data["answerable"] == 2 and len(data["items"]) == 4
    assert data["items"][2]["verdict"] == "abstained (right)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": ""}\n', encoding="utf-8")
    result = runner.invoke(main, ["eval", gpt.id, str(bad)])
    assert result.exit_code == 2 and 'Line 1 needs a "question"' in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_real_model_answers_what_the_files_say_and_abstains_otherwise(home):
    svc = Services()
    try:
        gpt = svc.create_gpt(ME, name="Shop")
        svc.add_knowledge(ME, gpt.id, [("prices.md", PRICES), ("hours.txt", HOURS)], run_jobs=False)
        svc.jobs.run_until_idle()
        spec = gpt.spec.model_copy(update={
            "knowledge_only": True, "instructions": "You answer questions for Bloom & Branch, a flower shop.",
            "generation": gpt.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 40})})
        report = qa_eval.run_eval(svc, ME, gpt.id, qa_eval.parse_questions(lines(QUESTIONS)), spec=spec)
    finally:
        svc.close()
    meadow, delivery, tulip, cakes = report.items
    assert meadow.contained and delivery.contained, [i.answer for i in report.items]
    assert tulip.abstained and cakes.abstained
    assert report.citation_accuracy == 1.0
