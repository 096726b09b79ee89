"""Privacy rows: a GPT's settings (retention, do-not-record, redaction) and deleting
conversations whose retention has passed. Plain data in and out; every query is
scoped by the GPT id (callers have checked ownership, or run for every GPT at once
in the periodic clean-up). No decisions about what a turn stores live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware, now
from personal_gpt.store.schema import conversations, corrections, feedback, messages, privacy_settings


@dataclass(frozen=True)
class PrivacySettings:
    retention_days: int | None = None  # None = keep conversations forever
    record: bool = True  # False = messages are stored without their text
    redact: bool = False  # True = e-mail addresses and phone numbers are hidden in stored text
    updated_at: datetime | None = None

    @property
    def keeps_forever(self) -> bool:
        return self.retention_days is None


DEFAULTS = PrivacySettings()


def get_settings(conn: Connection, gpt_id: str) -> PrivacySettings:
    """The GPT's settings; the defaults (keep forever, record, no redaction) without a row."""
    r = conn.execute(sa.select(privacy_settings).where(privacy_settings.c.gpt_id == gpt_id)).first()
    if r is None:
        return DEFAULTS
    return PrivacySettings(r.retention_days, bool(r.record), bool(r.redact), _aware(r.updated_at))


def save_settings(conn: Connection, gpt_id: str, *, retention_days: int | None, record: bool, redact: bool) -> None:
    values = {"retention_days": retention_days, "record": bool(record), "redact": bool(redact), "updated_at": now()}
    done = conn.execute(sa.update(privacy_settings).where(privacy_settings.c.gpt_id == gpt_id).values(**values))
    if done.rowcount == 0:
        conn.execute(sa.insert(privacy_settings).values(gpt_id=gpt_id, **values))


def retention_rules(conn: Connection) -> list[tuple[str, int]]:
    """(gpt id, days) of every GPT that does not keep conversations forever."""
    rows = conn.execute(
        sa.select(privacy_settings.c.gpt_id, privacy_settings.c.retention_days)
        .where(privacy_settings.c.retention_days.is_not(None))
        .order_by(privacy_settings.c.gpt_id)
    ).all()
    return [(r.gpt_id, int(r.retention_days)) for r in rows]


def conversations_idle_since(conn: Connection, gpt_id: str, before: datetime) -> list[str]:
    """Ids of the GPT's conversations (every person's and source's) last active before ``before``."""
    rows = conn.execute(
        sa.select(conversations.c.id).where(conversations.c.gpt_id == gpt_id, conversations.c.updated_at < before)
    ).all()
    return [r.id for r in rows]


def delete_conversations(conn: Connection, gpt_id: str, conv_ids: list[str]) -> int:
    """Delete these conversations of the GPT with their messages and the feedback on them.
    Corrections the creator wrote stay (their link to the message is cleared).
    Returns how many conversations went."""
    if not conv_ids:
        return 0
    scrub_deletes(conn)
    deleted = 0
    for start in range(0, len(conv_ids), 500):  # keep each IN (...) list short
        batch = conv_ids[start:start + 500]
        owned = sa.select(conversations.c.id).where(conversations.c.gpt_id == gpt_id, conversations.c.id.in_(batch))
        message_ids = sa.select(messages.c.id).where(messages.c.conversation_id.in_(owned))
        conn.execute(sa.delete(feedback).where(feedback.c.message_id.in_(message_ids)))
        conn.execute(sa.update(corrections).where(corrections.c.message_id.in_(message_ids)).values(message_id=None))
        conn.execute(sa.delete(messages).where(messages.c.conversation_id.in_(owned)))
        deleted += conn.execute(
            sa.delete(conversations).where(conversations.c.gpt_id == gpt_id, conversations.c.id.in_(batch))
        ).rowcount
    return deleted


def scrub_deletes(conn: Connection) -> None:
    """SQLite: overwrite deleted rows with zeros on this connection (builds differ in
    their default), so deleted text does not linger in free pages of the file."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA secure_delete=ON")


def flush_deleted(engine) -> None:
    """SQLite: copy the write-ahead log into the database and empty it, so the old
    pages of deleted rows leave the -wal file now rather than at some later checkpoint.
    Best effort: a busy database simply keeps them until its next checkpoint."""
    if engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception:  # noqa: BLE001 - never fail a deletion over the log's housekeeping
        pass


def cutoff(days: int, at: datetime | None = None) -> datetime:
    return (at or now()) - timedelta(days=int(days))
