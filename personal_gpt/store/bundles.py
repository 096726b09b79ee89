"""Repository functions for GPT bundles: the rows an export reads and an import writes
that have no Services method of their own (corrections, privacy settings when H4's
methods are absent, version notes). Every query is scoped by GPT id; the services
layer has checked ownership. Must not: touch files, or decide what a bundle holds.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware, new_id, now
from personal_gpt.store.schema import corrections, gpt_versions, privacy_settings


def list_corrections(conn: Connection, gpt_id: str) -> list[dict]:
    """The GPT's "fix this answer" corrections, oldest first, as plain dicts."""
    q = sa.select(corrections).where(corrections.c.gpt_id == gpt_id).order_by(corrections.c.created_at,
                                                                                  corrections.c.id)
    return [
        {"question": r.question, "answer": r.answer, "target": r.target, "knowledge_file_id": r.knowledge_file_id,
         "created_at": _aware(r.created_at)}
        for r in conn.execute(q).all()
    ]


def insert_correction(conn: Connection, gpt_id: str, *, question: str, answer: str, target: str,
                      knowledge_file_id: str | None, created_at: datetime | None = None) -> str:
    """One imported correction (no message: conversations are never exported)."""
    cid = new_id("fix", 8)
    conn.execute(sa.insert(corrections).values(
        id=cid, gpt_id=gpt_id, message_id=None, question=question, answer=answer, target=target,
        knowledge_file_id=knowledge_file_id, created_at=created_at or now(),
    ))
    return cid


def get_privacy(conn: Connection, gpt_id: str) -> dict | None:
    """retention_days, record, redact of a GPT; None when never saved (the defaults apply)."""
    r = conn.execute(sa.select(privacy_settings).where(privacy_settings.c.gpt_id == gpt_id)).first()
    if r is None:
        return None
    return {"retention_days": r.retention_days, "record": bool(r.record), "redact": bool(r.redact)}


def save_privacy(conn: Connection, gpt_id: str, *, retention_days: int | None, record: bool, redact: bool) -> None:
    conn.execute(sa.delete(privacy_settings).where(privacy_settings.c.gpt_id == gpt_id))
    conn.execute(sa.insert(privacy_settings).values(
        gpt_id=gpt_id, retention_days=retention_days, record=bool(record), redact=bool(redact), updated_at=now(),
    ))


def set_version_note(conn: Connection, gpt_id: str, number: int, note: str) -> None:
    """Keep an imported version's own note ("Saved", "Restored version 2")."""
    conn.execute(sa.update(gpt_versions).where(gpt_versions.c.gpt_id == gpt_id, gpt_versions.c.number == int(number))
                 .values(note=str(note)[:200]))
