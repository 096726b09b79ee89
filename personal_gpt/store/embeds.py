"""Repository functions for the embed widget: the one writer of ``embed_settings``,
and the conversations visitors start through a GPT's widget (source ``embed``,
labelled with the embedding site).

Creator-side functions take the GPT id (the services layer has checked the GPT is
the creator's). Visitor-side functions take the GPT id and the visitor's user id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import ConversationRow, _aware, _conv, insert_conversation, now
from personal_gpt.store.schema import conversations, embed_settings, gpts, messages

SOURCE = "embed"


@dataclass
class EmbedRow:
    gpt_id: str
    allowed_sites: list[str] = field(default_factory=list)
    policy: str = "public"
    allowed_emails: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    theme: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    updated_at: datetime | None = None


@dataclass
class EmbedVisit:
    """A GPT as a widget visitor reaches it: its settings (None when never set), whose GPT
    it is (for model providers) and the published version (None: not published)."""

    gpt_id: str
    settings: EmbedRow | None
    owner_id: int
    published_version: int | None


@dataclass
class EmbedConversation:
    """A widget conversation as its creator sees it."""

    id: str
    site: str
    title: str
    created_at: datetime
    updated_at: datetime
    messages: int
    visitor: str  # "anonymous" or the signed-in visitor's e-mail


def _row(r: Any) -> EmbedRow:
    return EmbedRow(
        gpt_id=r.gpt_id, allowed_sites=list(r.allowed_sites or []), policy=r.policy,
        allowed_emails=list(r.allowed_emails or []), allowed_domains=list(r.allowed_domains or []),
        theme=dict(r.theme or {}), limits=dict(r.limits or {}), updated_at=_aware(r.updated_at),
    )


def get_settings(conn: Connection, gpt_id: str) -> EmbedRow | None:
    r = conn.execute(sa.select(embed_settings).where(embed_settings.c.gpt_id == gpt_id)).first()
    return _row(r) if r else None


def limits_json(conn: Connection, gpt_id: str) -> dict:
    """The stored limits dict of a GPT's widget and API visitors; ``{}`` when never set
    (``Limits.from_json({})`` gives the defaults)."""
    value = conn.execute(sa.select(embed_settings.c.limits).where(embed_settings.c.gpt_id == gpt_id)).scalar()
    return dict(value) if isinstance(value, dict) else {}


def save_settings(
    conn: Connection, gpt_id: str, *, allowed_sites: list[str], policy: str, allowed_emails: list[str],
    allowed_domains: list[str], theme: dict, limits: dict,
) -> None:
    """Insert or replace the whole row (the caller has validated every field)."""
    values = dict(
        allowed_sites=list(allowed_sites), policy=policy, allowed_emails=list(allowed_emails),
        allowed_domains=list(allowed_domains), theme=dict(theme), limits=dict(limits), updated_at=now(),
    )
    updated = conn.execute(sa.update(embed_settings).where(embed_settings.c.gpt_id == gpt_id).values(**values))
    if updated.rowcount == 0:
        conn.execute(sa.insert(embed_settings).values(gpt_id=gpt_id, **values))


def visit(conn: Connection, gpt_id: str) -> EmbedVisit | None:
    """The GPT and its widget settings, by id (the widget's public address); None if no such GPT."""
    r = conn.execute(
        sa.select(gpts.c.id, gpts.c.owner_id, gpts.c.published_version).where(gpts.c.id == gpt_id)
    ).first()
    if r is None:
        return None
    return EmbedVisit(r.id, get_settings(conn, gpt_id), r.owner_id, r.published_version)


# --- visitors' conversations -----------------------------------------------------------


def insert_conversation_for(conn: Connection, gpt_id: str, user_id: int, site: str, version: int | None) -> str:
    conv_id = insert_conversation(conn, gpt_id, user_id, SOURCE, version)
    conn.execute(sa.update(conversations).where(conversations.c.id == conv_id).values(site=site))
    return conv_id


def _visitor_query(gpt_id: str, user_id: int):
    return sa.select(conversations).where(
        conversations.c.gpt_id == gpt_id, conversations.c.user_id == user_id, conversations.c.source == SOURCE,
    )


def list_visitor_conversations(conn: Connection, gpt_id: str, user_id: int, limit: int = 50) -> list[ConversationRow]:
    rows = conn.execute(_visitor_query(gpt_id, user_id).order_by(conversations.c.updated_at.desc()).limit(limit)).all()
    return [_conv(r) for r in rows]


def get_visitor_conversation(conn: Connection, gpt_id: str, user_id: int, conv_id: str) -> tuple[ConversationRow, str] | None:
    """(the conversation, its site) when it is this visitor's, through this GPT's widget."""
    r = conn.execute(_visitor_query(gpt_id, user_id).where(conversations.c.id == conv_id)).first()
    return (_conv(r), r.site or "") if r else None


def count_messages(conn: Connection, conv_id: str) -> int:
    return conn.execute(
        sa.select(sa.func.count(messages.c.id)).where(messages.c.conversation_id == conv_id)
    ).scalar_one()


# --- the creator's view ----------------------------------------------------------------


def list_embed_conversations(conn: Connection, gpt_id: str, limit: int = 100) -> list[EmbedConversation]:
    """The GPT's widget conversations, newest activity first, with message counts."""
    from personal_gpt.store.schema import users

    count = (
        sa.select(sa.func.count(messages.c.id)).where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery().label("message_count")
    )
    rows = conn.execute(
        sa.select(conversations, count, users.c.issuer, users.c.email)
        .join(users, users.c.id == conversations.c.user_id)
        .where(conversations.c.gpt_id == gpt_id, conversations.c.source == SOURCE)
        .order_by(conversations.c.updated_at.desc(), conversations.c.id)
        .limit(limit)
    ).all()
    return [
        EmbedConversation(
            r.id, r.site or "", r.title, _aware(r.created_at), _aware(r.updated_at), r.message_count or 0,
            "anonymous" if r.issuer == "visitor" else (r.email or "signed in"),
        )
        for r in rows
    ]


def embed_conversation_exists(conn: Connection, gpt_id: str, conv_id: str) -> bool:
    return conn.execute(
        sa.select(conversations.c.id).where(
            conversations.c.id == conv_id, conversations.c.gpt_id == gpt_id, conversations.c.source == SOURCE
        )
    ).first() is not None
