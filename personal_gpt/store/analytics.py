"""Read-only queries behind the analytics page and the conversations CSV.

Every query is scoped by the GPT's owner (``gpts.owner_id``) through a join, never
by ``conversations.user_id`` (a visitor's conversation belongs to the visitor). Rows
come back as plain dicts; shaping them into tables is ``personal_gpt.analytics``'s job.
Nothing here writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware
from personal_gpt.store.schema import api_keys, conversations, feedback, gpts, messages, share_links, users


def _scope(q, owner_id: int, gpt_id: str | None, include_test: bool):
    q = q.where(gpts.c.owner_id == owner_id)
    if gpt_id is not None:
        q = q.where(conversations.c.gpt_id == gpt_id)
    if not include_test:
        q = q.where(conversations.c.source != "test")
    return q


def _window(col, since: datetime | None, until: datetime | None) -> list:
    out = []
    if since is not None:
        out.append(col >= since)
    if until is not None:
        out.append(col < until)
    return out


def _who_and_where() -> tuple:
    """A conversation's GPT, source, person and where it came from (link, site, API key)."""
    return (
        conversations.c.gpt_id, gpts.c.name.label("gpt_name"), conversations.c.source,
        conversations.c.user_id.label("person_id"), users.c.issuer, users.c.subject, users.c.email,
        (conversations.c.user_id == gpts.c.owner_id).label("is_owner"),
        conversations.c.share_link_id, share_links.c.label.label("link_label"), conversations.c.site,
        conversations.c.api_key_id, api_keys.c.name.label("key_name"), api_keys.c.hint.label("key_hint"),
    )


def _with_who_and_where(joined):
    """``joined`` (which holds ``conversations``) with the tables ``_who_and_where`` reads."""
    return (
        joined.join(gpts, gpts.c.id == conversations.c.gpt_id)
        .join(users, users.c.id == conversations.c.user_id)
        .outerjoin(share_links, share_links.c.id == conversations.c.share_link_id)
        .outerjoin(api_keys, api_keys.c.id == conversations.c.api_key_id)
    )


def conversation_rows(
    conn: Connection, owner_id: int, gpt_id: str | None, since: datetime | None, until: datetime | None,
    include_test: bool = False,
) -> list[dict[str, Any]]:
    """Conversations of ``owner_id``'s GPTs whose first message falls in [since, until):
    where they came from and who had them. Conversations without any message are left out."""
    first = (
        sa.select(messages.c.conversation_id, sa.func.min(messages.c.created_at).label("started_at"),
                  sa.func.count(messages.c.id).label("message_count"))
        .group_by(messages.c.conversation_id)
        .subquery("first_message")
    )
    q = (
        sa.select(conversations.c.id.label("conversation_id"), *_who_and_where(), first.c.started_at,
                  first.c.message_count)
        .select_from(_with_who_and_where(conversations.join(first, first.c.conversation_id == conversations.c.id)))
        .where(*_window(first.c.started_at, since, until))
        .order_by(first.c.started_at, conversations.c.id)
    )
    rows = conn.execute(_scope(q, owner_id, gpt_id, include_test)).mappings().all()
    out = []
    for r in rows:
        d = dict(r)
        d["started_at"] = _aware(_as_datetime(d["started_at"]))
        d["is_owner"] = bool(d["is_owner"])
        out.append(d)
    return out


def message_rows(
    conn: Connection, owner_id: int, gpt_id: str | None, since: datetime | None, until: datetime | None,
    include_test: bool = False,
) -> list[dict[str, Any]]:
    """Every message sent in [since, until) in ``owner_id``'s GPTs, oldest first, with its
    conversation's where/who columns and the answer's rating (None when unrated)."""
    q = (
        sa.select(
            messages.c.id.label("message_id"), messages.c.conversation_id, *_who_and_where(),
            messages.c.role, messages.c.content, messages.c.meta, messages.c.created_at,
            feedback.c.rating, feedback.c.comment.label("feedback_comment"),
            feedback.c.updated_at.label("feedback_at"),
        )
        .select_from(
            _with_who_and_where(messages.join(conversations, conversations.c.id == messages.c.conversation_id))
            .outerjoin(feedback, feedback.c.message_id == messages.c.id)
        )
        .where(*_window(messages.c.created_at, since, until))
        .order_by(messages.c.created_at, messages.c.id)
    )
    rows = conn.execute(_scope(q, owner_id, gpt_id, include_test)).mappings().all()
    out = []
    for r in rows:
        d = dict(r)
        d["meta"] = dict(d["meta"] or {})
        d["created_at"] = _aware(d["created_at"])
        d["feedback_at"] = _aware(d["feedback_at"])
        d["is_owner"] = bool(d["is_owner"])
        out.append(d)
    return out


def _as_datetime(value):
    """``min(created_at)`` comes back as text on SQLite (the aggregate loses the column type)."""
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value
