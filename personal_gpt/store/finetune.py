"""Repository functions for fine-tuning: ``finetune`` rows in ``jobs``, their
per-step ``job_metrics``, and a GPT's ``adapters`` (numbered versions).

Every query is scoped by GPT id (the services layer has checked ownership) or,
for the worker, by the job id it claimed plus its attempt number, so a worker
that lost its job (re-queued as dead) can never write over the new run.
Must not: touch files, models or the clock beyond timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware, new_id, now
from personal_gpt.store.schema import adapters, gpts, job_metrics, jobs

KIND = "finetune"
ACTIVE_STATES = ("queued", "running", "cancelling")
FINISHED_STATES = ("done", "failed", "cancelled")


@dataclass
class FinetuneJobRow:
    id: str
    gpt_id: str
    status: str
    progress: float
    message: str
    payload: dict
    attempts: int
    created_at: datetime
    updated_at: datetime


@dataclass
class AdapterRow:
    id: str
    gpt_id: str
    number: int
    job_id: str | None
    base_model: str
    path: str
    settings: dict
    data_summary: dict
    metrics: dict
    samples: list
    is_active: bool
    created_at: datetime


@dataclass
class MetricRow:
    step: int
    data: dict = field(default_factory=dict)
    created_at: datetime | None = None


def _job(r: Any) -> FinetuneJobRow:
    return FinetuneJobRow(r.id, r.gpt_id, r.status, float(r.progress or 0.0), r.message or "", dict(r.payload or {}),
                          int(r.attempts or 0), _aware(r.created_at), _aware(r.updated_at))


def _adapter(r: Any) -> AdapterRow:
    return AdapterRow(r.id, r.gpt_id, int(r.number), r.job_id, r.base_model, r.path, dict(r.settings or {}),
                      dict(r.data_summary or {}), dict(r.metrics or {}), list(r.samples or []), bool(r.is_active),
                      _aware(r.created_at))


def lock_gpt(conn: Connection, gpt_id: str) -> None:
    """Take the GPT's row lock for the rest of the transaction (a no-op update):
    on PostgreSQL a row lock, on SQLite the database write lock. Two starts or two
    activations on one GPT then run one after the other, never interleaved."""
    conn.execute(sa.update(gpts).where(gpts.c.id == gpt_id).values(revision=gpts.c.revision))


# --- jobs -------------------------------------------------------------------------


def new_job_id() -> str:
    return new_id("ftj", 8)


def insert_job(conn: Connection, gpt_id: str, payload: dict, job_id: str | None = None) -> str:
    jid = job_id or new_job_id()
    t = now()
    conn.execute(
        sa.insert(jobs).values(
            id=jid, gpt_id=gpt_id, kind=KIND, status="queued", progress=0.0, message="Waiting for a worker…",
            payload=payload, attempts=0, created_at=t, updated_at=t,
        )
    )
    return jid


def get_job(conn: Connection, gpt_id: str, job_id: str) -> FinetuneJobRow | None:
    r = conn.execute(
        sa.select(jobs).where(jobs.c.id == job_id, jobs.c.gpt_id == gpt_id, jobs.c.kind == KIND)
    ).first()
    return _job(r) if r else None


def get_job_by_id(conn: Connection, job_id: str) -> FinetuneJobRow | None:
    """Unscoped: only for the worker, which claimed the job itself."""
    r = conn.execute(sa.select(jobs).where(jobs.c.id == job_id, jobs.c.kind == KIND)).first()
    return _job(r) if r else None


def find_owned_job(conn: Connection, owner_id: int, job_id: str) -> FinetuneJobRow | None:
    """A job of any GPT that ``owner_id`` owns (the CLI names jobs without their GPT)."""
    r = conn.execute(
        sa.select(jobs)
        .select_from(jobs.join(gpts, jobs.c.gpt_id == gpts.c.id))
        .where(jobs.c.id == job_id, jobs.c.kind == KIND, gpts.c.owner_id == owner_id)
    ).first()
    return _job(r) if r else None


def list_jobs(conn: Connection, gpt_id: str, limit: int = 20) -> list[FinetuneJobRow]:
    q = (sa.select(jobs).where(jobs.c.gpt_id == gpt_id, jobs.c.kind == KIND)
         .order_by(jobs.c.created_at.desc()).limit(limit))
    return [_job(r) for r in conn.execute(q).all()]


def list_owned_jobs(conn: Connection, owner_id: int, limit: int = 20) -> list[FinetuneJobRow]:
    q = (
        sa.select(jobs)
        .select_from(jobs.join(gpts, jobs.c.gpt_id == gpts.c.id))
        .where(jobs.c.kind == KIND, gpts.c.owner_id == owner_id)
        .order_by(jobs.c.created_at.desc())
        .limit(limit)
    )
    return [_job(r) for r in conn.execute(q).all()]


def active_job(conn: Connection, gpt_id: str) -> FinetuneJobRow | None:
    r = conn.execute(
        sa.select(jobs).where(jobs.c.gpt_id == gpt_id, jobs.c.kind == KIND, jobs.c.status.in_(ACTIVE_STATES))
        .order_by(jobs.c.created_at).limit(1)
    ).first()
    return _job(r) if r else None


def count_queued(conn: Connection) -> int:
    return int(conn.execute(
        sa.select(sa.func.count(jobs.c.id)).where(jobs.c.kind == KIND, jobs.c.status == "queued")
    ).scalar() or 0)


def claim_next(conn: Connection, worker: dict) -> FinetuneJobRow | None:
    """Mark the oldest queued fine-tune running for ``worker`` (host, pid) and return it.
    The update only succeeds while the row is still queued, so of several workers
    sharing the database exactly one gets each job."""
    candidates = conn.execute(
        sa.select(jobs.c.id, jobs.c.payload).where(jobs.c.kind == KIND, jobs.c.status == "queued")
        .order_by(jobs.c.created_at).limit(5)
    ).all()
    for r in candidates:
        payload = dict(r.payload or {})
        payload["worker"] = worker
        res = conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == r.id, jobs.c.status == "queued")
            .values(status="running", attempts=jobs.c.attempts + 1, payload=payload, updated_at=now(),
                    message="Starting…")
        )
        if res.rowcount == 1:
            return get_job_by_id(conn, r.id)
    return None


def _owned(job_id: str, attempt: int):
    """The worker's claim on a job: same attempt, still running or being cancelled."""
    return sa.and_(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status.in_(("running", "cancelling")))


def report_progress(conn: Connection, job_id: str, attempt: int, *, progress: float | None = None,
                    message: str | None = None, live: dict | None = None,
                    metrics: list[tuple[int, dict]] = ()) -> bool:
    """The worker's progress write (also its heartbeat). False when the job is no
    longer this worker's (cancelled and finished, re-queued, or deleted)."""
    values: dict[str, Any] = {"updated_at": now()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    if message is not None:
        values["message"] = message
    if live is not None:
        row = conn.execute(sa.select(jobs.c.payload).where(_owned(job_id, attempt))).first()
        if row is None:
            return False
        values["payload"] = {**dict(row.payload or {}), "live": live}
    res = conn.execute(sa.update(jobs).where(_owned(job_id, attempt)).values(**values))
    if res.rowcount != 1:
        return False
    if metrics:
        t = now()
        conn.execute(sa.insert(job_metrics), [{"job_id": job_id, "step": int(s), "data": d, "created_at": t}
                                              for s, d in metrics])
    return True


def job_status(conn: Connection, job_id: str, attempt: int) -> str | None:
    """What the worker's should_stop reads: the status while the claim holds, else None."""
    r = conn.execute(sa.select(jobs.c.status, jobs.c.attempts).where(jobs.c.id == job_id)).first()
    if r is None or int(r.attempts) != attempt:
        return None
    return r.status


def finish_job(conn: Connection, job_id: str, attempt: int, status: str, message: str,
               result: dict | None = None) -> bool:
    """done / failed / cancelled, once, by the worker that holds the claim."""
    assert status in FINISHED_STATES
    values: dict[str, Any] = {"status": status, "message": message, "updated_at": now()}
    if status == "done":
        values["progress"] = 1.0
    if result is not None:
        row = conn.execute(sa.select(jobs.c.payload).where(_owned(job_id, attempt))).first()
        if row is None:
            return False
        values["payload"] = {**dict(row.payload or {}), "result": result}
    res = conn.execute(sa.update(jobs).where(_owned(job_id, attempt)).values(**values))
    return res.rowcount == 1


def request_cancel(conn: Connection, gpt_id: str, job_id: str) -> str | None:
    """Queued -> cancelled at once; running -> cancelling (the worker stops at its
    next step and marks it cancelled). Returns the new status, None if it had finished."""
    base = sa.and_(jobs.c.id == job_id, jobs.c.gpt_id == gpt_id, jobs.c.kind == KIND)
    res = conn.execute(sa.update(jobs).where(base, jobs.c.status == "queued")
                       .values(status="cancelled", message="Cancelled before it started.", updated_at=now()))
    if res.rowcount == 1:
        return "cancelled"
    res = conn.execute(sa.update(jobs).where(base, jobs.c.status == "running")
                       .values(status="cancelling", message="Stopping…", updated_at=now()))
    if res.rowcount == 1:
        return "cancelling"
    r = conn.execute(sa.select(jobs.c.status).where(base)).first()
    return "cancelling" if r is not None and r.status == "cancelling" else None


def unfinished_jobs(conn: Connection) -> list[FinetuneJobRow]:
    """Running or cancelling fine-tunes of every GPT (for the dead-worker sweep)."""
    q = sa.select(jobs).where(jobs.c.kind == KIND, jobs.c.status.in_(("running", "cancelling")))
    return [_job(r) for r in conn.execute(q).all()]


def requeue_job(conn: Connection, job: FinetuneJobRow, message: str, stale_cutoff: datetime | None = None) -> bool:
    """Put a job whose worker died back in the queue, only if the same claim still
    holds (same attempt) and, for a silent worker, its heartbeat is still older
    than ``stale_cutoff``."""
    cond = [jobs.c.id == job.id, jobs.c.attempts == job.attempts, jobs.c.status == "running"]
    if stale_cutoff is not None:
        cond.append(jobs.c.updated_at < stale_cutoff)
    res = conn.execute(sa.update(jobs).where(*cond).values(status="queued", message=message, updated_at=now()))
    return res.rowcount == 1


def close_dead_job(conn: Connection, job: FinetuneJobRow, status: str, message: str) -> bool:
    res = conn.execute(
        sa.update(jobs)
        .where(jobs.c.id == job.id, jobs.c.attempts == job.attempts, jobs.c.status == job.status)
        .values(status=status, message=message, updated_at=now())
    )
    return res.rowcount == 1


def stale_before(seconds: float) -> datetime:
    return now() - timedelta(seconds=seconds)


def metrics(conn: Connection, job_id: str, limit: int = 5000) -> list[MetricRow]:
    q = (sa.select(job_metrics.c.step, job_metrics.c.data, job_metrics.c.created_at)
         .where(job_metrics.c.job_id == job_id).order_by(job_metrics.c.id).limit(limit))
    return [MetricRow(int(r.step), dict(r.data or {}), _aware(r.created_at)) for r in conn.execute(q).all()]


# --- adapters ----------------------------------------------------------------------


def new_adapter_id() -> str:
    return new_id("adp", 8)


def list_adapters(conn: Connection, gpt_id: str) -> list[AdapterRow]:
    q = sa.select(adapters).where(adapters.c.gpt_id == gpt_id).order_by(adapters.c.number)
    return [_adapter(r) for r in conn.execute(q).all()]


def get_adapter(conn: Connection, gpt_id: str, number: int) -> AdapterRow | None:
    r = conn.execute(sa.select(adapters).where(adapters.c.gpt_id == gpt_id, adapters.c.number == int(number))).first()
    return _adapter(r) if r else None


def active_adapter(conn: Connection, gpt_id: str) -> AdapterRow | None:
    r = conn.execute(
        sa.select(adapters).where(adapters.c.gpt_id == gpt_id, adapters.c.is_active == sa.true())
        .order_by(adapters.c.number.desc()).limit(1)
    ).first()
    return _adapter(r) if r else None


def insert_adapter(conn: Connection, gpt_id: str, *, adapter_id: str, job_id: str | None, base_model: str,
                   path: str, settings: dict, data_summary: dict, metrics: dict, samples: list) -> int:
    """A new version, numbered max + 1 for this GPT, never active on arrival."""
    lock_gpt(conn, gpt_id)
    top = conn.execute(sa.select(sa.func.max(adapters.c.number)).where(adapters.c.gpt_id == gpt_id)).scalar()
    number = int(top or 0) + 1
    conn.execute(
        sa.insert(adapters).values(
            id=adapter_id, gpt_id=gpt_id, number=number, job_id=job_id, base_model=base_model, path=path,
            settings=settings, data_summary=data_summary, metrics=metrics, samples=samples, is_active=False,
            created_at=now(),
        )
    )
    return number


def set_active(conn: Connection, gpt_id: str, number: int | None) -> bool:
    """Exactly one active version (``number``) or none (None); call inside one
    transaction. False when ``number`` is not a version of this GPT (nothing changed)."""
    lock_gpt(conn, gpt_id)
    if number is not None and get_adapter(conn, gpt_id, number) is None:
        return False
    conn.execute(sa.update(adapters).where(adapters.c.gpt_id == gpt_id).values(is_active=False))
    if number is not None:
        conn.execute(sa.update(adapters).where(adapters.c.gpt_id == gpt_id, adapters.c.number == int(number))
                     .values(is_active=True))
    return True


def delete_adapter(conn: Connection, gpt_id: str, number: int) -> bool:
    res = conn.execute(sa.delete(adapters).where(adapters.c.gpt_id == gpt_id, adapters.c.number == int(number)))
    return res.rowcount == 1
