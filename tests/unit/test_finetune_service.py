"""The fine-tuning half of the services facade on a real SQLite database: data
checks before anything is queued, one job per GPT, cancel, adapter versions
(activate / switch off / delete / export) and the chat path picking the active
adapter. No training here (tests/unit/test_finetune_worker.py trains for real);
adapters here are complete peft folders written by the test."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.errors import Conflict, InvalidInput, NotFound
from personal_gpt.finetune.data import Example
from personal_gpt.services import Services
from personal_gpt.store import finetune as fstore
from personal_gpt.store import knowledge as kstore
from tests.support.fake_model import EchoModel, FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
TINY = {"epochs": 1, "rank": 4, "max_length": 64, "batch_size": 4, "eval_share": 0.2}
TOPICS = ["opening hours", "gift vouchers", "parking", "late returns", "book clubs", "signed copies",
          "school orders", "rare maps", "reading glasses", "poetry nights", "used books", "the kids' corner"]


def style_examples(n: int = 12) -> list[Example]:
    return [Example.single(f"Tell me about {t}.",
                           f"Ahoy from Harbour Books! About {t}: ask at the front desk. Fair winds! - Skipper")
            for t in TOPICS[:n]]


def jsonl(examples: list[Example]) -> bytes:
    return "".join(json.dumps(ex.to_json()) + "\n" for ex in examples).encode()


class AdapterRecordingRegistry(FakeRegistry):
    """The echo stand-in, remembering which adapter each ``get`` asked for."""

    def __init__(self):
        super().__init__(EchoModel())
        self.adapters: list = []

    def get(self, ref, provider_lookup=None, adapter=None):
        self.adapters.append(adapter)
        return super().get(ref, provider_lookup)


@pytest.fixture
def svc(home: Path, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")  # nothing trains here: queued jobs stay queued
    s = Services(Settings.from_env(), models=AdapterRecordingRegistry())
    yield s
    s.close()


def gpt_of(svc, p=ALICE, name="Harbour"):
    return svc.create_gpt(p, name=name)


def job_rows(svc) -> list:
    with svc.store.read() as conn:
        return conn.execute(sa.text("SELECT id, status FROM jobs WHERE kind = 'finetune'")).all()


def fake_adapter(svc, gpt_id: str, *, base: str = "bundled:smollm2-135m-instruct", active: bool = False) -> int:
    """A complete peft folder (config + safetensors) published as the next version."""
    from safetensors.numpy import save_file
    import numpy as np

    adapter_id = fstore.new_adapter_id()
    rel = Path("gpts") / gpt_id / "adapters" / adapter_id
    folder = svc.settings.home / rel
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "base_model_name_or_path": base}))
    save_file({"x": np.zeros((1,), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    with svc.store.tx() as conn:
        number = fstore.insert_adapter(conn, gpt_id, adapter_id=adapter_id, job_id=None, base_model=base,
                                       path=rel.as_posix(), settings=TINY, data_summary={"train": 10},
                                       metrics={"eval_loss_before": 2.0, "eval_loss_after": 1.5}, samples=[])
        if active:
            fstore.set_active(conn, gpt_id, number)
    return number


# --- checking the data before anything is queued -----------------------------------


def test_preview_reads_and_checks_an_upload(svc):
    gpt = gpt_of(svc)
    loaded, report = svc.preview_training_data(ALICE, gpt.id, jsonl(style_examples()), "style.jsonl", settings=TINY)
    assert loaded.format == "openai-chat" and len(loaded.examples) == 12
    assert report.ok and report.usable == 12
    assert report.train + report.eval == 12 and report.eval == round(12 * 0.2)
    assert 0 < report.tokens_min <= report.tokens_max <= 64
    assert job_rows(svc) == []  # a preview queues nothing


def test_edited_examples_are_checked_without_queuing(svc):
    gpt = gpt_of(svc)
    examples = style_examples() + [style_examples()[0], Example.single("Empty?", "")]
    report = svc.check_training_examples(ALICE, gpt.id, examples, TINY)
    assert report.ok and report.usable == 12 and report.duplicates == 1 and report.empty == 1
    assert any("duplicate" in w for w in report.warnings)
    with pytest.raises(InvalidInput, match="Rank must be"):
        svc.check_training_examples(ALICE, gpt.id, examples, {"rank": 0})
    assert job_rows(svc) == []


@pytest.mark.parametrize("data, name, says", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n',
     "bad.jsonl", "Line 2 is not valid JSON"),
    (b"", "empty.jsonl", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "photo.png", "not training data"),
    (b'{"colour": "red"}\n', "wrong.jsonl", "not in a training-data format"),
])
def test_bad_data_is_refused_with_a_sentence_and_nothing_is_queued(svc, data, name, says):
    gpt = gpt_of(svc)
    with pytest.raises(InvalidInput, match=says):
        svc.preview_training_data(ALICE, gpt.id, data, name)
    with pytest.raises(InvalidInput, match="no training examples"):
        svc.start_finetune(ALICE, gpt.id, [], TINY, start_worker=False)
    assert job_rows(svc) == []
    assert not (svc.settings.home / "gpts" / gpt.id / "finetune").exists()


def test_examples_without_answers_are_refused(svc):
    gpt = gpt_of(svc)
    empty = [Example.single(f"Question {i}?", "") for i in range(3)]
    with pytest.raises(InvalidInput, match="no usable examples"):
        svc.start_finetune(ALICE, gpt.id, empty, TINY, start_worker=False)
    assert job_rows(svc) == []


@pytest.mark.parametrize("settings, says", [
    ({"rank": 0}, "Rank must be a whole number between 1 and 256."),
    ({"epochs": 500}, "Epochs must be a whole number between 1 and 20."),
    ({"learning_rate": -1}, "Learning rate must be between"),
    ({"max_length": 5}, "Maximum length must be"),
    ({"colour": "blue"}, '"colour" is not a training setting.'),
])
def test_out_of_range_settings_get_a_sentence_and_nothing_is_queued(svc, settings, says):
    gpt = gpt_of(svc)
    with pytest.raises(InvalidInput, match=says):
        svc.start_finetune(ALICE, gpt.id, style_examples(), settings, start_worker=False)
    with pytest.raises(InvalidInput, match=says):
        svc.preview_training_data(ALICE, gpt.id, jsonl(style_examples()), "style.jsonl", settings=settings)
    assert job_rows(svc) == []


def test_a_gpt_on_a_model_server_cannot_be_fine_tuned(svc):
    prov = svc.add_provider(ALICE, name="Cloud", base_url="http://127.0.0.1:9/v1", model="m")
    gpt = gpt_of(svc)
    svc.save_draft(ALICE, gpt.id, {**gpt.spec.model_dump(), "model": prov.ref}, gpt.revision)
    with pytest.raises(InvalidInput, match="only with a model that runs on this computer"):
        svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    assert job_rows(svc) == []


# --- jobs -------------------------------------------------------------------------


def test_start_saves_the_dataset_and_its_split_and_queues_one_job(svc):
    gpt = gpt_of(svc)
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    assert job_id.startswith("ftj_")
    job = svc.finetune_job(ALICE, gpt.id, job_id)
    assert job.status == "queued" and job.progress == 0 and job.active
    assert job.base_model == "bundled:smollm2-135m-instruct"
    assert job.settings["rank"] == 4 and job.data_summary["usable"] == 12
    folder = svc.settings.home / "gpts" / gpt.id / "finetune" / job_id
    lines = {name: (folder / name).read_text().splitlines() for name in ("dataset.jsonl", "train.jsonl", "eval.jsonl")}
    assert len(lines["dataset.jsonl"]) == 12
    assert len(lines["train.jsonl"]) + len(lines["eval.jsonl"]) == 12 and lines["eval.jsonl"]
    assert not set(lines["train.jsonl"]) & set(lines["eval.jsonl"])
    assert [j.id for j in svc.finetune_jobs(ALICE, gpt.id)] == [job_id]
    assert [j.id for j in svc.finetune_jobs(ALICE)] == [job_id]
    assert svc.find_finetune_job(ALICE, job_id).gpt_id == gpt.id


def test_sample_prompts_are_held_out_questions_and_the_templates_test_questions(svc):
    tpl = svc.templates()[0]
    gpt = svc.create_gpt(ALICE, template_id=tpl.id, name="From template",
                         blanks={b.key: (b.example or "Acme") for b in tpl.blanks})
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    with svc.store.read() as conn:
        payload = fstore.get_job(conn, gpt.id, job_id).payload
    prompts = [p[-1]["content"] for p in payload["sample_prompts"]]
    held_out = [json.loads(line)["messages"][0]["content"] for line in
                (svc.settings.home / payload["dir"] / "eval.jsonl").read_text().splitlines()]
    assert prompts[:len(held_out)] == held_out
    assert prompts[len(held_out):] == tpl.test_questions[:3]
    assert all(p[-1]["role"] == "user" for p in payload["sample_prompts"])


def test_a_second_job_on_the_same_gpt_is_a_conflict_until_the_first_is_cancelled(svc):
    gpt = gpt_of(svc)
    first = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    with pytest.raises(Conflict, match="already being fine-tuned"):
        svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    assert len(job_rows(svc)) == 1
    other = gpt_of(svc, name="Other")  # another GPT may train at the same time (it queues)
    assert svc.start_finetune(ALICE, other.id, style_examples(), TINY, start_worker=False)

    cancelled = svc.cancel_finetune(ALICE, gpt.id, first)
    assert cancelled.status == "cancelled" and not cancelled.active
    assert not (svc.settings.home / "gpts" / gpt.id / "finetune" / first).exists()
    with pytest.raises(InvalidInput, match="nothing to cancel"):
        svc.cancel_finetune(ALICE, gpt.id, first)
    again = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    assert again != first and svc.finetune_job(ALICE, gpt.id, again).status == "queued"


def test_two_starts_at_once_give_one_job_and_one_conflict(svc):
    gpt = gpt_of(svc)
    outcomes: list = []
    barrier = threading.Barrier(2)

    def start():
        barrier.wait()
        try:
            outcomes.append(svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False))
        except Conflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "str"]
    assert len(job_rows(svc)) == 1
    jobs_dir = svc.settings.home / "gpts" / gpt.id / "finetune"
    assert [p.name for p in jobs_dir.iterdir()] == [next(o for o in outcomes if isinstance(o, str))]


def test_a_running_job_is_asked_to_stop(svc):
    gpt = gpt_of(svc)
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    with svc.store.tx() as conn:
        claimed = fstore.claim_next(conn, {"host": "elsewhere", "pid": 1})
    assert claimed.id == job_id and claimed.attempts == 1
    job = svc.cancel_finetune(ALICE, gpt.id, job_id)
    assert job.status == "cancelling" and job.active  # the worker ends it at its next step
    with svc.store.read() as conn:
        assert fstore.job_status(conn, job_id, 1) == "cancelling"
    with pytest.raises(Conflict):  # still holds the GPT until the worker has stopped
        svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)


def test_progress_history_and_eta_come_from_the_job_row(svc):
    gpt = gpt_of(svc)
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    with svc.store.tx() as conn:
        job = fstore.claim_next(conn, {"host": "h", "pid": 1})
        assert fstore.report_progress(conn, job_id, job.attempts, progress=0.5, message="Training: step 2 of 4",
                                      live={"step": 2, "total_steps": 4, "eta_s": 30.0},
                                      metrics=[(1, {"loss": 2.5}), (2, {"loss": 2.0})])
        # a resumed run logs step 2 again; the chart keeps one point per step, the latest
        assert fstore.report_progress(conn, job_id, job.attempts, metrics=[(2, {"loss": 1.9, "eval_loss": 2.2})])
        assert not fstore.report_progress(conn, job_id, job.attempts + 1, progress=0.9)  # not that worker's claim
    view = svc.finetune_job(ALICE, gpt.id, job_id)
    assert view.status == "running" and view.progress == 0.5 and view.step == 2 and view.total_steps == 4
    assert 0 < view.eta_s <= 30
    assert view.history == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.9, "eval_loss": 2.2}]
    assert svc.finetune_jobs(ALICE, gpt.id)[0].history == []  # the list stays light


def test_training_pairs_come_from_the_gpts_ready_passages_only(svc):
    gpt = gpt_of(svc)
    with pytest.raises(InvalidInput, match="no ready knowledge"):
        svc.training_pairs_from_knowledge(ALICE, gpt.id)
    text = ("Harbour Books opens at nine every weekday. Late returns cost ten cents a day. "
            "Signed copies of local authors sit by the window, and the poetry night is on Thursdays.")
    with svc.store.tx() as conn:
        ready = kstore.insert_file(conn, gpt.id, "guide.txt", "a" * 64, 100)
        pending = kstore.insert_file(conn, gpt.id, "draft.txt", "b" * 64, 100)
        kstore.replace_chunks(conn, gpt.id, ready, [{"ordinal": 0, "text": text, "page": 1, "section": "Visiting",
                                                     "embedding": b""}])
        kstore.replace_chunks(conn, gpt.id, pending, [{"ordinal": 0, "text": "SECRET draft text " * 10,
                                                       "page": None, "section": None, "embedding": b""}])
        kstore.set_file_status(conn, ready, "ready")
    pairs = svc.training_pairs_from_knowledge(ALICE, gpt.id, limit=10)
    assert pairs and all(isinstance(p, Example) for p in pairs)
    assert all(p.prompt and p.response for p in pairs)
    assert not any("SECRET" in p.response for p in pairs)
    with pytest.raises(NotFound):
        svc.training_pairs_from_knowledge(BOB, gpt.id)


# --- adapter versions -------------------------------------------------------------------


def test_activate_switch_off_and_exactly_one_active(svc):
    gpt = gpt_of(svc)
    one, two = fake_adapter(svc, gpt.id), fake_adapter(svc, gpt.id)
    assert (one, two) == (1, 2)
    assert [a.is_active for a in svc.list_adapters(ALICE, gpt.id)] == [False, False]
    assert svc.active_adapter(ALICE, gpt.id) is None
    assert svc.activate_adapter(ALICE, gpt.id, 1).is_active
    assert svc.activate_adapter(ALICE, gpt.id, 2).number == 2
    assert [a.is_active for a in svc.list_adapters(ALICE, gpt.id)] == [False, True]
    assert svc.active_adapter(ALICE, gpt.id).number == 2
    assert svc.activate_adapter(ALICE, gpt.id, None) is None
    assert not any(a.is_active for a in svc.list_adapters(ALICE, gpt.id))
    with pytest.raises(NotFound, match="no adapter version 7"):
        svc.activate_adapter(ALICE, gpt.id, 7)
    with pytest.raises(InvalidInput, match="is a number"):
        svc.activate_adapter(ALICE, gpt.id, "latest")


def test_an_adapter_for_another_base_model_is_not_activated(svc):
    gpt = gpt_of(svc)
    fake_adapter(svc, gpt.id, base="hf:/somewhere/else")
    with pytest.raises(InvalidInput, match="trained for another model"):
        svc.activate_adapter(ALICE, gpt.id, 1)
    assert svc.active_adapter(ALICE, gpt.id) is None


def test_an_incomplete_adapter_folder_is_not_activated(svc):
    gpt = gpt_of(svc)
    fake_adapter(svc, gpt.id)
    (svc.get_adapter(ALICE, gpt.id, 1).path / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="missing or incomplete"):
        svc.activate_adapter(ALICE, gpt.id, 1)


def test_delete_refuses_the_active_version_and_removes_an_inactive_ones_files(svc):
    gpt = gpt_of(svc)
    fake_adapter(svc, gpt.id, active=True)
    fake_adapter(svc, gpt.id)
    active_path = svc.get_adapter(ALICE, gpt.id, 1).path
    with pytest.raises(Conflict, match="switch to another version or to the base model first"):
        svc.delete_adapter(ALICE, gpt.id, 1)
    assert active_path.is_dir() and svc.active_adapter(ALICE, gpt.id).number == 1
    inactive_path = svc.get_adapter(ALICE, gpt.id, 2).path
    svc.delete_adapter(ALICE, gpt.id, 2)
    assert not inactive_path.exists() and [a.number for a in svc.list_adapters(ALICE, gpt.id)] == [1]
    svc.activate_adapter(ALICE, gpt.id, None)
    svc.delete_adapter(ALICE, gpt.id, 1)
    assert not active_path.exists() and svc.list_adapters(ALICE, gpt.id) == []
    with pytest.raises(NotFound):
        svc.delete_adapter(ALICE, gpt.id, 1)


def test_export_copies_a_peft_folder(svc, tmp_path):
    gpt = gpt_of(svc)
    fake_adapter(svc, gpt.id)
    dest = svc.export_adapter(ALICE, gpt.id, 1, tmp_path / "out")
    assert (dest / "adapter_config.json").is_file() and (dest / "adapter_model.safetensors").is_file()


# --- the chat path ----------------------------------------------------------------------


def test_chat_uses_the_active_adapter_only_on_its_base_model(svc):
    gpt = gpt_of(svc)
    svc.publish(ALICE, gpt.id)
    registry = svc.models

    def ask():
        conv = svc.start_conversation(ALICE, gpt.id)
        list(svc.send(ALICE, conv, "hello").pieces)
        return registry.adapters[-1]

    assert ask() is None
    fake_adapter(svc, gpt.id, active=True)
    adapter = ask()
    version = svc.active_adapter(ALICE, gpt.id)
    assert adapter.name == version.id and Path(adapter.path) == version.path and "1" in adapter.label
    svc.activate_adapter(ALICE, gpt.id, None)
    assert ask() is None

    # the GPT moves to a model server: its adapter is not offered to that model
    svc.activate_adapter(ALICE, gpt.id, 1)
    prov = svc.add_provider(ALICE, name="Cloud", base_url="http://127.0.0.1:9/v1", model="m")
    current = svc.get_gpt(ALICE, gpt.id)
    svc.save_draft(ALICE, gpt.id, {**current.spec.model_dump(), "model": prov.ref}, current.revision)
    svc.publish(ALICE, gpt.id)
    assert ask() is None


# --- tenancy ----------------------------------------------------------------------------


def test_another_creator_can_neither_see_nor_touch_jobs_or_adapters(svc, tmp_path):
    gpt = gpt_of(svc)
    fake_adapter(svc, gpt.id, active=True)
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    attempts = [
        lambda: svc.finetune_jobs(BOB, gpt.id),
        lambda: svc.finetune_job(BOB, gpt.id, job_id),
        lambda: svc.find_finetune_job(BOB, job_id),
        lambda: svc.cancel_finetune(BOB, gpt.id, job_id),
        lambda: svc.start_finetune(BOB, gpt.id, style_examples(), TINY, start_worker=False),
        lambda: svc.preview_training_data(BOB, gpt.id, jsonl(style_examples()), "x.jsonl"),
        lambda: svc.check_training_examples(BOB, gpt.id, style_examples(), TINY),
        lambda: svc.list_adapters(BOB, gpt.id),
        lambda: svc.get_adapter(BOB, gpt.id, 1),
        lambda: svc.active_adapter(BOB, gpt.id),
        lambda: svc.activate_adapter(BOB, gpt.id, None),
        lambda: svc.delete_adapter(BOB, gpt.id, 1),
        lambda: svc.export_adapter(BOB, gpt.id, 1, tmp_path / "stolen"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound):
            attempt()
    bob_gpt = gpt_of(svc, BOB, name="Bob's")
    with pytest.raises(NotFound):  # a real job id, through B's own GPT
        svc.finetune_job(BOB, bob_gpt.id, job_id)
    with pytest.raises(NotFound):
        svc.cancel_finetune(BOB, bob_gpt.id, job_id)
    assert svc.finetune_jobs(BOB) == []
    assert not (tmp_path / "stolen").exists()
    assert svc.finetune_job(ALICE, gpt.id, job_id).status == "queued"
    assert svc.active_adapter(ALICE, gpt.id).number == 1


@pytest.mark.parametrize("bad", ["../x", "ftj_1' OR '1'='1", "x" * 5000, "", "ftj_ZZZZZZZZZZZZ"])
def test_malformed_job_ids_are_not_found(svc, bad):
    gpt = gpt_of(svc)
    with pytest.raises(NotFound):
        svc.finetune_job(ALICE, gpt.id, bad)
    with pytest.raises(NotFound):
        svc.find_finetune_job(ALICE, bad)
