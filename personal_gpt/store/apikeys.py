"""Repository functions for API keys and the conversations made with them.

Creator-side functions take the GPT id (the services layer has checked the GPT is
the creator's). The caller side has exactly one unscoped look-up, by a secret: the
key's SHA-256. Keys themselves never reach this module, only their hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware, insert_conversation, new_id, now
from personal_gpt.store.schema import api_keys, conversations, gpts, messages, users


@dataclass
class KeyRow:
    id: str
    gpt_id: str
    name: str
    hint: str
    uses: int
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass
class KeyCaller:
    """A key as a caller reaches it: the key, and what the chat needs of its GPT."""

    key: KeyRow
    owner_id: int
    gpt_name: str
    published_version: int | None
    gpt_created: datetime


def _key(r: Any) -> KeyRow:
    return KeyRow(
        id=r.id, gpt_id=r.gpt_id, name=r.name, hint=r.hint, uses=r.uses, created_at=_aware(r.created_at),
        last_used_at=_aware(r.last_used_at), revoked_at=_aware(r.revoked_at),
    )


# --- creator side -----------------------------------------------------------------


def insert_key(conn: Connection, gpt_id: str, name: str, key_hash: str, hint: str) -> str:
    key_id = new_id("key", 8)
    conn.execute(
        sa.insert(api_keys).values(
            id=key_id, gpt_id=gpt_id, name=name, key_hash=key_hash, hint=hint, uses=0, created_at=now(),
        )
    )
    return key_id


def list_keys(conn: Connection, gpt_id: str) -> list[KeyRow]:
    rows = conn.execute(
        sa.select(api_keys).where(api_keys.c.gpt_id == gpt_id).order_by(api_keys.c.created_at.desc(), api_keys.c.id)
    ).all()
    return [_key(r) for r in rows]


def count_active_keys(conn: Connection, gpt_id: str) -> int:
    return conn.execute(
        sa.select(sa.func.count(api_keys.c.id)).where(api_keys.c.gpt_id == gpt_id, api_keys.c.revoked_at.is_(None))
    ).scalar_one()


def get_key(conn: Connection, gpt_id: str, key_id: str) -> KeyRow | None:
    r = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id, api_keys.c.gpt_id == gpt_id)).first()
    return _key(r) if r else None


def key_gpt_id(conn: Connection, owner_id: int, key_id: str) -> str | None:
    """The GPT of ``key_id`` if that GPT belongs to ``owner_id`` (else None)."""
    return conn.execute(
        sa.select(api_keys.c.gpt_id)
        .join(gpts, gpts.c.id == api_keys.c.gpt_id)
        .where(api_keys.c.id == key_id, gpts.c.owner_id == owner_id)
    ).scalar()


def revoke_key(conn: Connection, gpt_id: str, key_id: str) -> None:
    """Mark revoked; the first revocation time is kept."""
    conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.gpt_id == gpt_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now())
    )


# --- caller side -------------------------------------------------------------------


def caller_by_hash(conn: Connection, key_hash: str) -> KeyCaller | None:
    """The key with this hash and its GPT's owner and published version (revoked keys too:
    the caller decides)."""
    r = conn.execute(
        sa.select(api_keys, gpts.c.owner_id, gpts.c.name.label("gpt_name"), gpts.c.published_version,
                  gpts.c.created_at.label("gpt_created"))
        .join(gpts, gpts.c.id == api_keys.c.gpt_id)
        .where(api_keys.c.key_hash == key_hash)
    ).first()
    return KeyCaller(_key(r), r.owner_id, r.gpt_name, r.published_version, _aware(r.gpt_created)) if r else None


def count_use(conn: Connection, key_id: str) -> None:
    conn.execute(
        sa.update(api_keys).where(api_keys.c.id == key_id).values(uses=api_keys.c.uses + 1, last_used_at=now())
    )


def find_user(conn: Connection, issuer: str, subject: str) -> int | None:
    return conn.execute(sa.select(users.c.id).where(users.c.issuer == issuer, users.c.subject == subject)).scalar()


def insert_api_conversation(
    conn: Connection, gpt_id: str, user_id: int, key_id: str, version_number: int | None
) -> str:
    conv_id = insert_conversation(conn, gpt_id, user_id, "api", version_number)
    conn.execute(sa.update(conversations).where(conversations.c.id == conv_id).values(api_key_id=key_id))
    return conv_id


def delete_if_empty(conn: Connection, conv_id: str) -> None:
    """Remove an API conversation whose turn never started (nothing was saved in it)."""
    has_messages = conn.execute(
        sa.select(sa.func.count(messages.c.id)).where(messages.c.conversation_id == conv_id)
    ).scalar_one()
    if not has_messages:
        conn.execute(sa.delete(conversations).where(conversations.c.id == conv_id, conversations.c.source == "api"))




@dataclass
class ApiConversationRow:
    id: str
    key_id: str | None
    key_name: str
    end_user: str
    title: str
    created_at: datetime
    message_count: int


def list_api_conversations(conn: Connection, gpt_id: str, limit: int = 50) -> list[ApiConversationRow]:
    """The GPT's API conversations, newest first, with the key's name and the caller's end user."""
    count = (
        sa.select(sa.func.count(messages.c.id)).where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery().label("message_count")
    )
    rows = conn.execute(
        sa.select(conversations.c.id, conversations.c.api_key_id, conversations.c.title, conversations.c.created_at,
                  api_keys.c.name.label("key_name"), users.c.subject, count)
        .join(users, users.c.id == conversations.c.user_id)
        .outerjoin(api_keys, api_keys.c.id == conversations.c.api_key_id)
        .where(conversations.c.gpt_id == gpt_id, conversations.c.source == "api")
        .order_by(conversations.c.created_at.desc(), conversations.c.id)
        .limit(limit)
    ).all()
    return [
        ApiConversationRow(r.id, r.api_key_id, r.key_name or "", r.subject.partition(":")[2], r.title,
                           _aware(r.created_at), r.message_count or 0)
        for r in rows
    ]


def api_conversation_exists(conn: Connection, gpt_id: str, conv_id: str) -> bool:
    return conn.execute(
        sa.select(conversations.c.id).where(
            conversations.c.id == conv_id, conversations.c.gpt_id == gpt_id, conversations.c.source == "api"
        )
    ).first() is not None
