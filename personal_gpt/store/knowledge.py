"""Repository functions for knowledge files, their chunks and durable jobs.

Every query is scoped by GPT id (the services layer has already checked that
the GPT belongs to the acting creator). Chunks of a file are written in the
same transaction that marks it ready, so a file is never half-indexed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware, new_id, now
from personal_gpt.store.schema import chunks, jobs, knowledge_files

ACTIVE_FILE_STATES = ("queued", "parsing", "embedding")


@dataclass
class KnowledgeFileRow:
    id: str
    gpt_id: str
    display_name: str
    content_hash: str
    size_bytes: int
    filetype: str
    status: str
    error: str
    pages: int | None
    chunk_count: int
    created_at: datetime
    updated_at: datetime


@dataclass
class ChunkRow:
    id: int
    file_id: str
    ordinal: int
    text: str
    page: int | None
    section: str | None
    embedding: bytes | None = None
    file_name: str = ""


@dataclass
class JobRow:
    id: str
    gpt_id: str
    kind: str
    status: str
    progress: float
    message: str
    payload: dict
    attempts: int
    created_at: datetime
    updated_at: datetime


def _file(r: Any) -> KnowledgeFileRow:
    return KnowledgeFileRow(
        r.id, r.gpt_id, r.display_name, r.content_hash, r.size_bytes, r.filetype, r.status, r.error, r.pages,
        r.chunk_count, _aware(r.created_at), _aware(r.updated_at),
    )


def _job(r: Any) -> JobRow:
    return JobRow(
        r.id, r.gpt_id, r.kind, r.status, r.progress, r.message, dict(r.payload or {}), r.attempts,
        _aware(r.created_at), _aware(r.updated_at),
    )


# --- files ------------------------------------------------------------------


def list_files(conn: Connection, gpt_id: str) -> list[KnowledgeFileRow]:
    q = sa.select(knowledge_files).where(knowledge_files.c.gpt_id == gpt_id).order_by(knowledge_files.c.created_at)
    return [_file(r) for r in conn.execute(q).all()]


def get_file(conn: Connection, gpt_id: str, file_id: str) -> KnowledgeFileRow | None:
    r = conn.execute(
        sa.select(knowledge_files).where(knowledge_files.c.gpt_id == gpt_id, knowledge_files.c.id == file_id)
    ).first()
    return _file(r) if r else None


def find_by_hash(conn: Connection, gpt_id: str, content_hash: str) -> KnowledgeFileRow | None:
    r = conn.execute(
        sa.select(knowledge_files).where(
            knowledge_files.c.gpt_id == gpt_id, knowledge_files.c.content_hash == content_hash
        )
    ).first()
    return _file(r) if r else None


def find_by_name(conn: Connection, gpt_id: str, display_name: str) -> list[KnowledgeFileRow]:
    q = sa.select(knowledge_files).where(
        knowledge_files.c.gpt_id == gpt_id, knowledge_files.c.display_name == display_name
    )
    return [_file(r) for r in conn.execute(q).all()]


def insert_file(conn: Connection, gpt_id: str, display_name: str, content_hash: str, size: int) -> str:
    fid = new_id("kf", 8)
    t = now()
    conn.execute(
        sa.insert(knowledge_files).values(
            id=fid, gpt_id=gpt_id, display_name=display_name, content_hash=content_hash, size_bytes=size,
            filetype="", status="queued", error="", pages=None, chunk_count=0, created_at=t, updated_at=t,
        )
    )
    return fid


def set_file_status(conn: Connection, file_id: str, status: str, **values: Any) -> None:
    conn.execute(
        sa.update(knowledge_files)
        .where(knowledge_files.c.id == file_id)
        .values(status=status, updated_at=now(), **values)
    )


def delete_file(conn: Connection, gpt_id: str, file_id: str) -> bool:
    conn.execute(sa.delete(chunks).where(chunks.c.gpt_id == gpt_id, chunks.c.file_id == file_id))
    r = conn.execute(
        sa.delete(knowledge_files).where(knowledge_files.c.gpt_id == gpt_id, knowledge_files.c.id == file_id)
    )
    return r.rowcount == 1


def hash_in_use(conn: Connection, gpt_id: str, content_hash: str) -> bool:
    return find_by_hash(conn, gpt_id, content_hash) is not None


def total_size(conn: Connection, gpt_id: str) -> int:
    return int(
        conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(knowledge_files.c.size_bytes), 0)).where(
                knowledge_files.c.gpt_id == gpt_id
            )
        ).scalar()
        or 0
    )


# --- chunks -----------------------------------------------------------------


def replace_chunks(conn: Connection, gpt_id: str, file_id: str, rows: list[dict]) -> None:
    conn.execute(sa.delete(chunks).where(chunks.c.gpt_id == gpt_id, chunks.c.file_id == file_id))
    if rows:
        conn.execute(sa.insert(chunks), [{**r, "gpt_id": gpt_id, "file_id": file_id} for r in rows])


def chunk_fingerprint(conn: Connection, gpt_id: str) -> tuple[int, int]:
    """(count, max id) of a GPT's ready chunks: changes whenever they change."""
    row = conn.execute(
        sa.select(sa.func.count(chunks.c.id), sa.func.coalesce(sa.func.max(chunks.c.id), 0))
        .select_from(chunks.join(knowledge_files, chunks.c.file_id == knowledge_files.c.id))
        .where(chunks.c.gpt_id == gpt_id, knowledge_files.c.status == "ready")
    ).first()
    return int(row[0]), int(row[1])


def ready_chunks(conn: Connection, gpt_id: str, with_embeddings: bool = True) -> list[ChunkRow]:
    cols = [chunks.c.id, chunks.c.file_id, chunks.c.ordinal, chunks.c.text, chunks.c.page, chunks.c.section,
            knowledge_files.c.display_name]
    if with_embeddings:
        cols.append(chunks.c.embedding)
    q = (
        sa.select(*cols)
        .select_from(chunks.join(knowledge_files, chunks.c.file_id == knowledge_files.c.id))
        .where(chunks.c.gpt_id == gpt_id, knowledge_files.c.status == "ready")
        .order_by(chunks.c.id)
    )
    out = []
    for r in conn.execute(q).all():
        out.append(ChunkRow(r.id, r.file_id, r.ordinal, r.text, r.page, r.section,
                            r.embedding if with_embeddings else None, r.display_name))
    return out


def get_chunks(conn: Connection, gpt_id: str, ids: list[int]) -> dict[int, ChunkRow]:
    if not ids:
        return {}
    q = (
        sa.select(chunks.c.id, chunks.c.file_id, chunks.c.ordinal, chunks.c.text, chunks.c.page, chunks.c.section,
                  knowledge_files.c.display_name)
        .select_from(chunks.join(knowledge_files, chunks.c.file_id == knowledge_files.c.id))
        .where(chunks.c.gpt_id == gpt_id, chunks.c.id.in_(ids))
    )
    return {r.id: ChunkRow(r.id, r.file_id, r.ordinal, r.text, r.page, r.section, None, r.display_name)
            for r in conn.execute(q).all()}


def count_chunks(conn: Connection, gpt_id: str | None = None, file_id: str | None = None) -> int:
    q = sa.select(sa.func.count(chunks.c.id))
    if gpt_id:
        q = q.where(chunks.c.gpt_id == gpt_id)
    if file_id:
        q = q.where(chunks.c.file_id == file_id)
    return int(conn.execute(q).scalar() or 0)


# --- jobs -------------------------------------------------------------------


def insert_job(conn: Connection, gpt_id: str, kind: str, payload: dict) -> str:
    jid = new_id("job", 8)
    t = now()
    conn.execute(
        sa.insert(jobs).values(
            id=jid, gpt_id=gpt_id, kind=kind, status="queued", progress=0.0, message="Waiting to start…",
            payload=payload, attempts=0, created_at=t, updated_at=t,
        )
    )
    return jid


def get_job(conn: Connection, job_id: str) -> JobRow | None:
    r = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    return _job(r) if r else None


def list_jobs(conn: Connection, gpt_id: str, kind: str | None = None, limit: int = 20) -> list[JobRow]:
    q = sa.select(jobs).where(jobs.c.gpt_id == gpt_id)
    if kind:
        q = q.where(jobs.c.kind == kind)
    return [_job(r) for r in conn.execute(q.order_by(jobs.c.created_at.desc()).limit(limit)).all()]


def claim_next_job(conn: Connection, kind: str) -> JobRow | None:
    """Mark the oldest queued job of ``kind`` running and return it (None if none)."""
    r = conn.execute(
        sa.select(jobs.c.id).where(jobs.c.kind == kind, jobs.c.status == "queued").order_by(jobs.c.created_at).limit(1)
    ).first()
    if r is None:
        return None
    res = conn.execute(
        sa.update(jobs)
        .where(jobs.c.id == r.id, jobs.c.status == "queued")
        .values(status="running", attempts=jobs.c.attempts + 1, updated_at=now(), message="Starting…")
    )
    if res.rowcount != 1:
        return None  # another worker took it
    return get_job(conn, r.id)


def update_job(conn: Connection, job_id: str, **values: Any) -> None:
    conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(updated_at=now(), **values))


def requeue_interrupted(conn: Connection, kind: str) -> list[str]:
    """After a crash or restart: running jobs go back to the queue; their files that
    were mid-way go back to queued (their chunks were never committed)."""
    ids = [r.id for r in conn.execute(sa.select(jobs.c.id).where(jobs.c.kind == kind, jobs.c.status == "running"))]
    if ids:
        conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(ids)).values(status="queued", message="Resuming after a restart…",
                                                             updated_at=now())
        )
    conn.execute(
        sa.update(knowledge_files)
        .where(knowledge_files.c.status.in_(("parsing", "embedding")))
        .values(status="queued", updated_at=now())
    )
    return ids
