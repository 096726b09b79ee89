"""The fine-tuning worker with the real bundled model and real LoRA training:
a worker subprocess runs a job to a new (inactive) adapter version that chat then
uses; SIGKILL mid-training and the job resumes from its checkpoint; cancel; a
failing job leaves the active adapter alone; dead-worker recovery, the one-worker
lock and atomic claims. Training settings are tiny (12 examples, 64 tokens, rank 4)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.finetune import worker as fworker
from personal_gpt.finetune.data import Example
from personal_gpt.services import Services
from personal_gpt.store import finetune as fstore

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
TOPICS = ["opening hours", "gift vouchers", "parking", "late returns", "book clubs", "signed copies",
          "school orders", "rare maps", "reading glasses", "poetry nights", "used books", "the kids' corner"]
SIGN_OFF = "Fair winds! - Skipper"
TINY = {"epochs": 1, "rank": 4, "max_length": 64, "batch_size": 4, "eval_share": 0.2, "learning_rate": 5e-3}
REPO = Path(__file__).resolve().parents[2]


def style_examples(n: int = 12) -> list[Example]:
    return [Example.single(f"Tell me about {t}.", f"Ahoy from Harbour Books! About {t}: ask at the desk. {SIGN_OFF}")
            for t in TOPICS[:n]]


@pytest.fixture
def svc(home: Path, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_SAMPLE_TOKENS", "12")  # side-by-side answers: short is enough here
    monkeypatch.setenv("PERSONAL_GPT_TORCH_THREADS", "1")
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")  # the tests start each worker themselves
    s = Services(Settings.from_env())
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_svc(request, home: Path, monkeypatch):
    """Services on SQLite and on PostgreSQL (the database GPU workers share)."""
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")
    base = Settings.from_env()
    if request.param == "sqlite":
        s = Services(base)
        yield s
        s.close()
        return
    import uuid

    pg = request.getfixturevalue("postgres_url")
    admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(pg).set(database=name).render_as_string(hide_password=False)
    s = Services(Settings(home=base.home, database_url=url, templates_dir=base.templates_dir,
                          model_cache=base.model_cache))
    yield s
    s.close()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_worker_process(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personal_gpt.finetune.worker", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def job(svc, gpt_id, job_id):
    return svc.finetune_job(ALICE, gpt_id, job_id)


def greedy_gpt(svc, name="Harbour"):
    gpt = svc.create_gpt(ALICE, name=name)
    spec = gpt.spec.model_dump()
    spec["generation"] = {**spec["generation"], "temperature": 0.0, "max_new_tokens": 24}
    gpt = svc.save_draft(ALICE, gpt.id, spec, gpt.revision)
    svc.publish(ALICE, gpt.id)
    return gpt


def ask(svc, gpt_id, text):
    conv = svc.start_conversation(ALICE, gpt_id)
    reply = svc.send(ALICE, conv, text)
    answer = "".join(reply.pieces)
    return answer, reply.model_name


# --- the whole path, in a worker process ------------------------------------------------


@pytest.mark.slow
def test_a_worker_process_trains_a_new_inactive_version_that_chat_then_uses(svc):
    gpt = greedy_gpt(svc)
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    done = run_worker_process("--once")
    assert done.returncode == 0, done.stderr[-3000:]

    finished = job(svc, gpt.id, job_id)
    assert finished.status == "done", finished.message
    assert finished.progress == 1.0 and finished.adapter_number == 1
    assert "version 1" in finished.message
    m = finished.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"]  # it learned the house style
    steps = [h["step"] for h in finished.history if "loss" in h]
    assert steps == sorted(steps) and steps[-1] == finished.total_steps  # the live chart's points
    with svc.store.read() as conn:
        payload = fstore.get_job(conn, gpt.id, job_id).payload
    assert payload["worker"]["pid"] != os.getpid() and payload["worker"]["host"] == socket.gethostname()

    [version] = svc.list_adapters(ALICE, gpt.id)
    assert version.number == 1 and not version.is_active and version.job_id == job_id
    assert (version.path / "adapter_config.json").is_file() and (version.path / "adapter_model.safetensors").is_file()
    assert version.path.parent.name == "adapters" and not any(version.path.parent.glob(".tmp-*"))
    assert version.samples and {"prompt", "base", "tuned"} <= set(version.samples[0])
    assert version.data_summary["usable"] == 12 and version.settings["rank"] == 4
    assert not (svc.settings.home / payload["dir"] / "work" / "checkpoints").exists()

    question = "Tell me about poetry nights."
    base_answer, base_model = ask(svc, gpt.id, question)
    svc.activate_adapter(ALICE, gpt.id, 1)
    tuned_answer, tuned_model = ask(svc, gpt.id, question)
    assert "fine-tune 1" in tuned_model and "fine-tune" not in base_model
    assert tuned_answer != base_answer
    svc.activate_adapter(ALICE, gpt.id, None)
    assert ask(svc, gpt.id, question) == (base_answer, base_model)


@pytest.mark.slow
def test_a_killed_worker_is_detected_and_the_job_resumes_from_its_checkpoint(svc):
    gpt = svc.create_gpt(ALICE, name="Resumable")
    in_use = _published_adapter(svc, gpt.id, "bundled:smollm2-135m-instruct")  # stays in use throughout
    settings = {**TINY, "epochs": 2, "batch_size": 2, "checkpoint_every": 2}  # 10 steps, a checkpoint every 2
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), settings, start_worker=False)
    with svc.store.read() as conn:
        work = svc.settings.home / fstore.get_job(conn, gpt.id, job_id).payload["dir"] / "work"
    proc = subprocess.Popen([sys.executable, "-m", "personal_gpt.finetune.worker", "--once"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if list((work / "checkpoints").glob("step-*")) and (job(svc, gpt.id, job_id).step or 0) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the job never reached a checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    killed = job(svc, gpt.id, job_id)
    assert killed.status == "running" and 0 < killed.step < killed.total_steps
    assert svc.active_adapter(ALICE, gpt.id).number == in_use
    assert [a.number for a in svc.list_adapters(ALICE, gpt.id)] == [in_use]  # nothing half-made was published

    assert svc.recover_finetune(start_worker=False) == [job_id]  # the server's start-up does this
    assert job(svc, gpt.id, job_id).status == "queued"
    done = run_worker_process("--once")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = job(svc, gpt.id, job_id)
    assert resumed.status == "done", resumed.message
    assert resumed.attempts == 2
    assert resumed.resumed_from and resumed.resumed_from >= 2
    assert resumed.metrics["resumed_from_step"] == resumed.resumed_from
    assert [(a.number, a.is_active) for a in svc.list_adapters(ALICE, gpt.id)] == [(in_use, True), (2, False)]


@pytest.mark.slow
def test_a_stopped_worker_puts_its_job_back_in_the_queue(svc):
    gpt = svc.create_gpt(ALICE, name="Paused")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), {**TINY, "epochs": 5, "batch_size": 2},
                                start_worker=False)
    proc = subprocess.Popen([sys.executable, "-m", "personal_gpt.finetune.worker"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while job(svc, gpt.id, job_id).status != "running":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # e.g. the machine shuts down
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    paused = job(svc, gpt.id, job_id)
    assert paused.status == "queued" and "resumes from the last checkpoint" in paused.message, stderr[-2000:]
    assert svc.list_adapters(ALICE, gpt.id) == [] and not fworker.worker_running(svc.settings.home)


@pytest.mark.slow
def test_cancelling_a_running_job_stops_it_without_a_version(svc):
    gpt = svc.create_gpt(ALICE, name="Cancel me")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), {**TINY, "epochs": 5, "batch_size": 2},
                                start_worker=False)
    worker = fworker.Worker(services=svc)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_one()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while job(svc, gpt.id, job_id).status != "running":  # loading the model, measuring, or training
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    assert svc.cancel_finetune(ALICE, gpt.id, job_id).status == "cancelling"
    thread.join(timeout=120)
    assert outcome == [True]
    stopped = job(svc, gpt.id, job_id)
    assert stopped.status == "cancelled" and (stopped.step or 0) < (stopped.total_steps or 1)
    assert svc.list_adapters(ALICE, gpt.id) == []
    assert not (svc.settings.home / "gpts" / gpt.id / "finetune" / job_id / "work").exists()


@pytest.mark.slow
def test_deleting_the_gpt_mid_training_stops_the_job_and_leaves_no_files(svc):
    gpt = svc.create_gpt(ALICE, name="Short-lived")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), {**TINY, "epochs": 5, "batch_size": 2},
                                start_worker=False)
    worker = fworker.Worker(services=svc)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_one()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while job(svc, gpt.id, job_id).status != "running":
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    svc.delete_gpt(ALICE, gpt.id)
    thread.join(timeout=120)
    assert outcome == [True] and not thread.is_alive()
    assert not (svc.settings.home / "gpts" / gpt.id).exists()
    with svc.store.read() as conn:
        assert fstore.get_job_by_id(conn, job_id) is None


def test_a_failing_job_says_why_and_leaves_the_active_adapter_alone(svc, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not a model")
    gpt = svc.create_gpt(ALICE, name="Broken base")
    svc.save_draft(ALICE, gpt.id, {**gpt.spec.model_dump(), "model": f"hf:{broken}"}, gpt.revision)
    active = _published_adapter(svc, gpt.id, f"hf:{broken}")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)

    assert fworker.Worker(services=svc).run_one()
    failed = job(svc, gpt.id, job_id)
    assert failed.status == "failed" and not failed.active
    assert "could not be loaded" in failed.message and "Traceback" not in failed.message
    [version] = svc.list_adapters(ALICE, gpt.id)
    assert version.is_active and version.number == active
    assert (version.path / "adapter_model.safetensors").is_file()
    assert not any((svc.settings.home / "gpts" / gpt.id / "adapters").glob(".tmp-*"))
    assert not (svc.settings.home / "gpts" / gpt.id / "finetune" / job_id / "work").exists()
    # the GPT is free again
    assert svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)


def _published_adapter(svc, gpt_id: str, base: str) -> int:
    from safetensors.numpy import save_file
    import numpy as np

    adapter_id = fstore.new_adapter_id()
    folder = svc.settings.home / "gpts" / gpt_id / "adapters" / adapter_id
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    save_file({"x": np.zeros((1,), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    with svc.store.tx() as conn:
        number = fstore.insert_adapter(conn, gpt_id, adapter_id=adapter_id, job_id=None, base_model=base,
                                       path=folder.relative_to(svc.settings.home).as_posix(), settings={},
                                       data_summary={}, metrics={}, samples=[])
        fstore.set_active(conn, gpt_id, number)
    return number


@pytest.mark.parametrize("exc, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "The disk is full"),
    (MemoryError(), "ran out of memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate"), "ran out of memory"),
    (ValueError("boom"), "failed unexpectedly"),
])
def test_failures_become_one_sentence(exc, says):
    sentence = fworker.failure_sentence(exc)
    assert says in sentence and "boom" not in sentence and "CUDA" not in sentence and sentence.endswith(".")


# --- recovery, the lock, claims (no training) ------------------------------------------------


def _running_job(svc, gpt_id: str, worker: dict, *, status: str = "running", attempts: int = 1,
                 age_s: float = 0.0) -> str:
    job_id = svc.start_finetune(ALICE, gpt_id, style_examples(), TINY, start_worker=False)
    with svc.store.tx() as conn:
        from personal_gpt.store.schema import jobs

        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
            status=status, attempts=attempts, payload={**fstore.get_job(conn, gpt_id, job_id).payload, "worker": worker},
            updated_at=fstore.stale_before(age_s)))
    return job_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_sweep_requeues_only_jobs_whose_worker_is_gone(any_svc):
    svc = any_svc
    here = socket.gethostname()
    gpts = [svc.create_gpt(ALICE, name=f"G{i}") for i in range(6)]
    dead = _running_job(svc, gpts[0].id, {"host": here, "pid": _dead_pid()})
    alive = _running_job(svc, gpts[1].id, {"host": here, "pid": os.getppid()})
    silent = _running_job(svc, gpts[2].id, {"host": "gpu-box", "pid": 4242}, age_s=fworker.STALE_AFTER_S + 60)
    remote = _running_job(svc, gpts[3].id, {"host": "gpu-box", "pid": 4242}, age_s=5)
    stopping = _running_job(svc, gpts[4].id, {"host": here, "pid": _dead_pid()}, status="cancelling")
    worn = _running_job(svc, gpts[5].id, {"host": here, "pid": _dead_pid()}, attempts=fworker.MAX_ATTEMPTS)

    assert sorted(svc.recover_finetune(start_worker=False)) == sorted([dead, silent])
    status = {j.id: j for g in gpts for j in svc.finetune_jobs(ALICE, g.id)}
    assert status[dead].status == status[silent].status == "queued"
    assert "resuming from the last checkpoint" in status[dead].message
    assert status[alive].status == status[remote].status == "running"
    assert status[stopping].status == "cancelled"
    assert status[worn].status == "failed" and "given up" in status[worn].message


def test_only_one_worker_claims_a_job(any_svc):
    svc = any_svc
    gpt = svc.create_gpt(ALICE, name="Claimed")
    job_id = svc.start_finetune(ALICE, gpt.id, style_examples(), TINY, start_worker=False)
    results: list = []
    barrier = threading.Barrier(4)

    def claim(n):
        barrier.wait()
        with svc.store.tx() as conn:
            results.append(fstore.claim_next(conn, {"host": "h", "pid": n}))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = [r for r in results if r is not None]
    assert len(claimed) == 1 and claimed[0].id == job_id and claimed[0].attempts == 1
    assert job(svc, gpt.id, job_id).status == "running"


def test_one_local_worker_per_home(svc, monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "1")
    lock = fworker.HomeLock(svc.settings.home)
    assert lock.acquire()
    try:
        assert fworker.worker_running(svc.settings.home)
        assert not fworker.HomeLock(svc.settings.home).acquire()
        assert fworker.spawn_local_worker(svc.settings) is False  # one is "running": none started
        assert fworker.run_worker(svc.settings, once=True) == -1
    finally:
        lock.release()
    assert not fworker.worker_running(svc.settings.home)

    # none running: one starts, holds the lock, and leaves after its idle time
    assert fworker.spawn_local_worker(svc.settings, idle_exit_s=0.5) is True
    deadline = time.monotonic() + 60
    seen = False
    while time.monotonic() < deadline:
        running = fworker.worker_running(svc.settings.home)
        seen = seen or running
        if seen and not running:
            break
        time.sleep(0.05)
    assert seen and not fworker.worker_running(svc.settings.home)
    log = (svc.settings.home / "logs" / fworker.LOG_NAME).read_text()
    assert "Traceback" not in log

    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")  # the operator runs workers elsewhere
    assert fworker.spawn_local_worker(svc.settings) is False and not fworker.worker_running(svc.settings.home)


def test_a_job_whose_worker_died_gets_a_new_worker_when_looked_at(svc, monkeypatch):
    gpt = svc.create_gpt(ALICE, name="Orphan")
    job_id = _running_job(svc, gpt.id, {"host": socket.gethostname(), "pid": _dead_pid()})
    monkeypatch.setattr(fworker, "spawn_local_worker", lambda settings, idle_exit_s=None: started.append(1) or True)
    started: list = []
    assert job(svc, gpt.id, job_id).status == "running"  # what was read; the sweep ran meanwhile
    assert started == []  # local workers are off in these tests
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "1")
    job(svc, gpt.id, job_id)
    assert started == [1]
    assert job(svc, gpt.id, job_id).status == "queued"


def test_worker_once_with_nothing_queued_exits_at_once(svc):
    started = time.monotonic()
    done = run_worker_process("--once", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert not fworker.worker_running(svc.settings.home)
