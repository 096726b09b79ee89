"""Deleting a GPT deletes everything it owns, verified by listing what is left: every
table's rows (each column's value searched for the GPT's ids, its conversations',
links', keys', adapters', jobs', files' and visitors' ids and a marker word typed in
every conversation and knowledge file), every file under the home, and the in-memory
caches — while a second GPT of the same creator, built the same way, is untouched.

Real SQLite and PostgreSQL, real knowledge ingest (parse, chunk, embed), real
fine-tune job rows (queued, claimed, metrics, done) with a complete peft adapter
folder written by the fine-tune tests' helper; the echo stand-in at the ChatModel seam."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.errors import NotFound, Unauthorized
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.store import finetune as fstore
from personal_gpt.store.schema import corrections, feedback, login_states, messages, metadata, users
from tests.support.fake_model import EchoModel, FakeRegistry
from tests.support.pg import settings_on
from tests.unit.test_finetune_service import TINY, fake_adapter, style_examples

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
SITE = "https://www.bloom.example"


class ForgettingRegistry(FakeRegistry):
    """The echo stand-in, remembering which adapters it was told to forget."""

    def __init__(self):
        super().__init__(EchoModel())
        self.forgotten: list[str] = []

    def forget_adapter(self, name: str) -> bool:
        self.forgotten.append(name)
        return True


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, home: Path, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")  # nothing trains here
    yield from settings_on(request)


@pytest.fixture
def svc(settings):
    s = Services(settings, models=ForgettingRegistry())
    yield s
    s.close()


def drain(reply) -> str:
    return "".join(reply.pieces)


def build(svc, name: str, marker: str, n: int) -> dict:
    """A GPT with everything a GPT can own; returns the ids (strings) it made."""
    now = datetime.now(timezone.utc)
    gpt = svc.create_gpt(ALICE, spec={"name": name, "instructions": f"Talk about {marker}.", "starters": ["Hi"]})
    gpt = svc.save_draft(ALICE, gpt.id, {**gpt.spec.model_dump(), "description": "v2"}, gpt.revision)
    svc.publish(ALICE, gpt.id)
    ids = {"gpt": [gpt.id], "conv": [], "visitor": [], "kf": [], "job": [], "link": [], "key": [], "adapter": [],
           "fix": []}

    # knowledge, really ingested; searching fills the retriever's in-memory index
    added = svc.add_knowledge(ALICE, gpt.id, [("notes.md", f"# Notes\n\nThe {marker} shop opens at 9am.\n".encode())],
                              run_jobs=False)
    svc.jobs.run_until_idle()
    ids["kf"] += [f.file_id for f in added.files]
    ids["job"].append(added.job_id)
    assert svc.search_knowledge(ALICE, gpt.id, f"When does the {marker} shop open?")[0].file == "notes.md"

    # a fine-tune: queued (data set under the GPT's folder), claimed, metrics, done; and an adapter
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    ids["job"].append(job_id)
    with svc.store.tx() as conn:
        claimed = fstore.claim_next(conn, {"host": "test", "pid": 1})
        assert claimed.id == job_id
        assert fstore.report_progress(conn, job_id, 1, progress=0.5, metrics=[(1, {"loss": 2.0}), (2, {"loss": 1.5})])
        assert fstore.finish_job(conn, job_id, 1, "done", "Finished.")
    number = fake_adapter(svc, gpt.id)
    ids["adapter"].append(svc.get_adapter(ALICE, gpt.id, number).id)

    # the creator's own preview
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    drain(svc.send(ALICE, conv, f"Tell me about {marker}"))
    ids["conv"].append(conv)

    # a share link: an anonymous visitor and a signed-in one (Bob, a real account)
    link, _token = svc.create_share_link(ALICE, gpt.id, public=True, label=f"{marker} link")
    ids["link"].append(link.id)
    anon = Visitor(visitor_id=f"deletevisitor{n:02d}" + "x" * 16)
    ids["visitor"].append(anon.visitor_id)
    bob = Visitor(principal=BOB, signed_in_at=now)
    for who in (anon, bob):
        conv = svc.start_shared_conversation(link.id, who)
        drain(svc.send_shared(link.id, who, conv, f"Share question about {marker}"))
        ids["conv"].append(conv)
    with svc.store.tx() as conn:  # a sign-in in flight that would come back to the link
        conn.execute(sa.insert(login_states).values(
            state_hash=uuid.uuid4().hex * 2, browser_hash="b" * 64, provider="test", nonce="n", code_verifier="v",
            return_link_id=link.id, created_at=now))

    # the embed widget, with do-not-record on (its text lives in this process's memory)
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE], policy="public")
    svc.save_privacy_settings(ALICE, gpt.id, retention_days=90, record=False, redact=True)
    widget = Visitor(visitor_id=f"deletewidget{n:02d}" + "y" * 16)
    ids["visitor"].append(widget.visitor_id)
    conv = svc.start_embed_conversation(gpt.id, widget, SITE)
    drain(svc.send_embed(gpt.id, widget, conv, f"Widget question about {marker}"))
    ids["conv"].append(conv)
    assert svc.unrecorded_texts.get(conv)
    svc.save_privacy_settings(ALICE, gpt.id, retention_days=90, record=True, redact=True)

    # the HTTP API: a call as the key itself and one on behalf of an end user
    key, secret = svc.create_api_key(ALICE, gpt.id, name=f"{marker} key")
    ids["key"].append(key.id)
    for user in (None, "cust-1"):
        turn = svc.api_chat(secret, gpt.id, [{"role": "user", "content": f"API question about {marker}"}], user=user)
        drain(turn.reply)
        ids["conv"].append(turn.conversation_id)
    ids["visitor"] += [key.id, f"{key.id}:cust-1"]

    # feedback on an answer and a creator's correction (SQL: those services are another helper's)
    with svc.store.tx() as conn:
        answer = conn.execute(sa.select(messages.c.id).where(messages.c.conversation_id == ids["conv"][1],
                                                             messages.c.role == "assistant")).scalar_one()
        conn.execute(sa.insert(feedback).values(gpt_id=gpt.id, message_id=answer, rating=-1,
                                                comment=f"not about {marker}", created_at=now, updated_at=now))
        fix_id = f"fix_{uuid.uuid4().hex[:16]}"
        conn.execute(sa.insert(corrections).values(
            id=fix_id, gpt_id=gpt.id, message_id=answer, question=f"about {marker}?", answer=f"{marker}!",
            target="finetune", knowledge_file_id=ids["kf"][0], created_at=now))
        ids["fix"].append(fix_id)
    return ids


def table_rows(svc) -> dict[str, list[str]]:
    """Every row of every table, each as one string of all its values."""
    out = {}
    with svc.store.read() as conn:
        for table in metadata.sorted_tables:
            out[table.name] = [json.dumps(list(r), default=str, ensure_ascii=False)
                               for r in conn.execute(sa.select(table)).all()]
    return out


def mentions(svc, needles: list[str]) -> list[str]:
    """'table: row' for every row that contains one of ``needles``."""
    return [f"{name}: {row[:200]}" for name, rows in table_rows(svc).items() for row in rows
            if any(n in row for n in needles)]


def files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def files_naming(home: Path, needles: list[str]) -> list[str]:
    return [f for f in files(home) if any(n in f for n in needles)]


def user_ids(svc, issuer: str, subjects: list[str]) -> list[int]:
    with svc.store.read() as conn:
        return [r.id for r in conn.execute(sa.select(users.c.id).where(users.c.issuer == issuer,
                                                                        users.c.subject.in_(subjects))).all()]


def test_deleting_a_gpt_leaves_nothing_it_owned(svc):
    home = svc.settings.home
    gone = build(svc, "Doomed", "zanzibar", 1)
    kept = build(svc, "Keeper", "kilimanjaro", 2)
    doomed_id, keeper_id = gone["gpt"][0], kept["gpt"][0]
    needles = [v for values in gone.values() for v in values] + ["zanzibar"]
    keeper_needles = [v for values in kept.values() for v in values] + ["kilimanjaro"]

    # before: every kind of row and file is really there, for both GPTs
    before = mentions(svc, needles)
    for table in ("gpts", "gpt_versions", "conversations", "messages", "knowledge_files", "chunks", "jobs",
                  "job_metrics", "adapters", "share_links", "login_states", "api_keys", "embed_settings",
                  "privacy_settings", "feedback", "corrections", "users"):
        assert any(m.startswith(f"{table}: ") for m in before), f"nothing of the GPT in {table} to begin with"
    assert any("/blobs/" in f for f in files_naming(home, [doomed_id]))
    assert any("/finetune/" in f and f.endswith("dataset.jsonl") for f in files_naming(home, [doomed_id]))
    assert any(f.endswith("adapter_model.safetensors") for f in files_naming(home, gone["adapter"]))
    keeper_rows, keeper_files = mentions(svc, keeper_needles), files_naming(home, [keeper_id])
    anonymous = (user_ids(svc, "visitor", gone["visitor"]) + user_ids(svc, "api", gone["visitor"]))
    assert len(anonymous) == 4  # two anonymous browsers, the API key and the key's end user
    bob = user_ids(svc, BOB.issuer, [BOB.subject])
    assert svc.retriever._indexes.get(doomed_id) is not None

    svc.delete_gpt(ALICE, doomed_id)

    # no row anywhere mentions the GPT, its conversations, links, keys, adapters, jobs, files, visitors or words
    assert mentions(svc, needles) == []
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)
                            .where(users.c.id.in_(anonymous))).scalar() == 0
    assert user_ids(svc, BOB.issuer, [BOB.subject]) == bob  # a signed-in person's account stays
    # no file under the home carries any of its ids
    assert files_naming(home, needles) == []
    assert not (home / "gpts" / doomed_id).exists()
    if svc.store.dialect == "sqlite":  # nor do the database's bytes (free pages, write-ahead log) keep its words
        assert [f for f in files(home) if (home / f).is_file() and b"zanzibar" in (home / f).read_bytes()] == []
    # nothing in memory
    assert doomed_id not in svc.retriever._indexes
    assert all(svc.unrecorded_texts.get(c) == {} for c in gone["conv"])
    assert svc.models.forgotten == gone["adapter"]
    # its doors are shut
    with pytest.raises(NotFound):
        svc.get_gpt(ALICE, doomed_id)
    with pytest.raises(NotFound):
        svc.embed_page(doomed_id)
    with pytest.raises(NotFound):
        svc.start_shared_conversation(gone["link"][0], Visitor(visitor_id="latecomer" + "z" * 16))

    # the other GPT of the same creator is untouched, and still works
    assert mentions(svc, keeper_needles) == keeper_rows
    assert files_naming(home, [keeper_id]) == keeper_files
    assert svc.search_knowledge(ALICE, keeper_id, "When does the kilimanjaro shop open?")[0].file == "notes.md"
    conv = svc.start_conversation(ALICE, keeper_id)
    assert "kilimanjaro" in drain(svc.send(ALICE, conv, "kilimanjaro again"))
    assert [a.id for a in svc.list_adapters(ALICE, keeper_id)] == kept["adapter"]


def test_api_keys_of_a_deleted_gpt_stop_at_once(svc):
    gpt = svc.create_gpt(ALICE, name="Keyed")
    svc.publish(ALICE, gpt.id)
    _key, secret = svc.create_api_key(ALICE, gpt.id)
    svc.delete_gpt(ALICE, gpt.id)
    with pytest.raises(Unauthorized):
        svc.api_chat(secret, gpt.id, [{"role": "user", "content": "hello"}])


def test_a_running_fine_tune_is_stopped_by_the_deletion(svc):
    """The chosen behaviour: deleting is allowed while a fine-tune runs; its job row goes,
    so the worker's next heartbeat or stop check finds nothing and it stops, writing nothing."""
    gpt = svc.create_gpt(ALICE, name="Training")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    with svc.store.tx() as conn:
        assert fstore.claim_next(conn, {"host": "elsewhere", "pid": 1}).id == job_id
    svc.delete_gpt(ALICE, gpt.id)
    with svc.store.tx() as conn:
        assert fstore.job_status(conn, job_id, 1) is None  # what the worker's stop check reads
        assert not fstore.report_progress(conn, job_id, 1, progress=0.9, metrics=[(3, {"loss": 1.0})])
        assert conn.execute(sa.text("SELECT count(*) FROM job_metrics")).scalar() == 0
    assert not (svc.settings.home / "gpts" / gpt.id).exists()


def test_another_creator_cannot_delete_and_nothing_goes(svc):
    gpt = svc.create_gpt(ALICE, name="Mine")
    svc.publish(ALICE, gpt.id)
    conv = svc.start_conversation(ALICE, gpt.id)
    drain(svc.send(ALICE, conv, "hello"))
    with pytest.raises(NotFound):
        svc.delete_gpt(BOB, gpt.id)
    assert len(svc.messages(ALICE, conv)) == 2 and svc.get_gpt(ALICE, gpt.id).name == "Mine"
