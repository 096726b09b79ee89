"""The builder's Fine-tune tab through AppTest, on the real database: the empty state,
training pairs drafted from knowledge -> validation report -> start -> progress ->
cancel, and tuned versions (switch on, compare, switch off, delete with confirmation).
Training itself is exercised for real by tests/unit/test_finetune_*; here no worker
process is started (PGPT_FINETUNE_LOCAL_WORKER=0) so the page sees a queued job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.store import finetune as fstore
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
APP = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")


@pytest.fixture
def svc(home, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


def builder(gpt_id: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params["gpt"] = gpt_id
    at.run()
    at.switch_page("pages/builder.py")
    at.run()
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def add_version(svc, gpt_id: str, eval_before=2.0, eval_after=1.0) -> int:
    """An adapter version row with (placeholder) files, as the worker would leave it."""
    rel = Path("gpts") / gpt_id / "adapters" / fstore.new_adapter_id()
    folder = svc.settings.home / rel
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"placeholder")
    with svc.store.tx() as conn:
        return fstore.insert_adapter(
            conn, gpt_id, adapter_id=rel.name, job_id=None, base_model="bundled:smollm2-135m-instruct",
            path=rel.as_posix(), settings={"epochs": 2, "rank": 16}, data_summary={"train": 18},
            metrics={"eval_loss_before": eval_before, "eval_loss_after": eval_after},
            samples=[{"prompt": "Where are you?", "base": "In Leeds.", "tuned": "Ahoy! In Leeds. — Cheers, Kelp"}],
        )


def test_finetune_tab_empty_state(svc):
    g = svc.create_gpt(ME, name="Helper")
    at = builder(g.id)
    assert not at.exception
    assert any("Upload a file of examples" in t for t in texts(at.info))
    assert not any("Tuned versions" in t for t in texts(at.subheader))


def test_versions_switch_on_compare_and_delete_with_confirmation(svc):
    g = svc.create_gpt(ME, name="Helper")
    add_version(svc, g.id)
    at = builder(g.id)
    assert not at.exception
    assert any("Version 1" in t for t in texts(at.markdown))
    assert any("Evaluation loss 2.000 → 1.000" in t for t in texts(at.caption))
    assert any("Compare answers" in e.label for e in at.expander)
    assert any("Ahoy! In Leeds." in t for t in texts(at.markdown))
    at.button(key="ft-on-1").click().run()
    assert not at.exception
    assert svc.active_adapter(ME, g.id).number == 1
    assert any("tuned version 1" in t for t in texts(at.caption))

    at.button(key="ft-del-1").click().run()
    assert len(svc.list_adapters(ME, g.id)) == 1, "one click deletes nothing"
    at.button(key="ft-del-yes").click().run()
    assert not at.exception
    assert any("switch" in t.lower() for t in texts(at.error)), "the version in use is not deleted"
    assert len(svc.list_adapters(ME, g.id)) == 1

    at.button(key="ft-off").click().run()
    assert svc.active_adapter(ME, g.id) is None
    at.button(key="ft-del-1").click().run()
    at.button(key="ft-del-yes").click().run()
    assert not at.exception
    assert svc.list_adapters(ME, g.id) == []


def test_pairs_from_knowledge_report_start_and_cancel(svc):
    g = svc.create_gpt(ME, name="Shop")
    text = "\n\n".join(
        f"# {topic}\n\n{topic} is handled by our team every weekday. We answer within one day and keep "
        f"a record of every {topic.lower()} request so nothing is lost." for topic in
        ["Delivery", "Returns", "Opening hours", "Gift cards", "Repairs", "Custom orders"]
    )
    svc.add_knowledge(ME, g.id, [("faq.md", text.encode())], run_jobs=False)
    svc.jobs.run_until_idle()
    at = builder(g.id)
    at.radio(key=f"ft-src-{g.id}").set_value("Make pairs from my knowledge files").run()
    at.button(key=f"ft-mkpairs-{g.id}").click().run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert {"Examples", "Training", "Evaluation", "Too long (cut)"} <= set(labels)
    examples = int(next(m.value for m in at.metric if m.label == "Examples"))
    assert examples >= 3
    assert any("at least 10" in t for t in texts(at.warning)), "few examples: a warning, not silence"
    start = at.button(key=f"ft-go-{g.id}")
    assert not start.disabled
    start.click().run()
    assert not at.exception
    jobs = svc.finetune_jobs(ME, g.id)
    assert len(jobs) == 1 and jobs[0].status == "queued"
    assert any("Waiting for the training worker" in (p.text or "") for p in at.get("progress"))
    at.button(key=f"ftcancel-{jobs[0].id}").click().run()
    assert svc.finetune_jobs(ME, g.id)[0].status == "queued", "cancel asks first"
    at.button(key="ftcancel-yes").click().run()
    assert not at.exception
    assert svc.finetune_jobs(ME, g.id)[0].status == "cancelled"


def test_data_of_an_earlier_fine_tune_is_offered_again(svc):
    """Every fine-tune keeps the data it trained on (and an imported GPT brings its own):
    the tab offers it as a source, loads it into the editable table, and nobody else's
    GPT or a made-up name reaches it."""
    from personal_gpt.errors import NotFound
    from personal_gpt.finetune.data import Example, write_jsonl

    g = svc.create_gpt(ME, name="Shop")
    examples = [Example.single(f"Do you open on day {i}?", f"Yes, from 9 to 5 on day {i}.") for i in range(12)]
    job_id = svc.start_finetune(ME, g.id, examples, {"epochs": 1}, start_worker=False)
    write_jsonl(examples[:3], svc.settings.home / "gpts" / g.id / "finetune" / "imported-1" / "dataset.jsonl")

    sets = svc.training_sets(ME, g.id)
    assert {s.name: s.examples for s in sets} == {job_id: 12, "imported-1": 3}
    assert [e.messages for e in svc.load_training_set(ME, g.id, job_id)] == [e.messages for e in examples]
    for bad in ("../" + job_id, "imported-9", "", "a/b"):
        with pytest.raises(NotFound):
            svc.load_training_set(ME, g.id, bad)
    bob = Principal(issuer="https://idp.example", subject="bob")
    with pytest.raises(NotFound):
        svc.training_sets(bob, g.id)
    with pytest.raises(NotFound):
        svc.load_training_set(bob, g.id, job_id)

    import sqlalchemy as sa

    from personal_gpt.store.schema import jobs

    with svc.store.tx() as conn:  # as a worker leaves a finished run: its data set stays in the job's folder
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(status="done", progress=1.0))
    at = builder(g.id)
    source = at.radio(key=f"ft-src-{g.id}")
    assert "Data from an earlier fine-tune or import (2)" in source.options
    source.set_value("Data from an earlier fine-tune or import").run()
    assert not at.exception
    at.selectbox(key=f"ft-set-{g.id}").set_value(job_id).run()
    assert not at.exception
    frames = [f.value for f in at.get("arrow_data_frame")] or [f.value for f in at.dataframe]
    table = next(f for f in frames if "prompt" in f.columns)  # the editable table of what will be trained on
    assert list(table["prompt"])[:2] == ["Do you open on day 0?", "Do you open on day 1?"]
    assert len(table) == 12
