"""Repository functions for share links and the conversations made through them.

Creator-side functions take the GPT id (the services layer has checked the GPT
is the creator's); counters are single atomic UPDATEs. The visitor side has
exactly two unscoped look-ups, both by a secret: the token's SHA-256, and the
link id carried in a signed cookie. Tokens themselves never reach this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.sharing import LinkFacts
from personal_gpt.store.repos import ConversationRow, _aware, _conv, insert_conversation, new_id, now
from personal_gpt.store.schema import conversations, gpts, share_links, users


@dataclass
class LinkRow:
    id: str
    gpt_id: str
    label: str
    policy: str
    allowed_emails: list[str]
    allowed_domains: list[str]
    expires_at: datetime | None
    message_quota: int | None
    messages_used: int
    opens: int
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    updated_at: datetime
    conversations: int = 0


@dataclass
class Visit:
    """A link as a visitor reaches it: the facts to decide on, plus what the chat
    needs (whose GPT it is, for their model providers; the published version)."""

    facts: LinkFacts
    owner_id: int
    published_version: int | None


def _conversation_count():
    return (
        sa.select(sa.func.count(conversations.c.id))
        .where(conversations.c.share_link_id == share_links.c.id)
        .scalar_subquery()
        .label("conversation_count")
    )


def _link(r: Any) -> LinkRow:
    return LinkRow(
        id=r.id, gpt_id=r.gpt_id, label=r.label, policy=r.policy,
        allowed_emails=list(r.allowed_emails or []), allowed_domains=list(r.allowed_domains or []),
        expires_at=_aware(r.expires_at), message_quota=r.message_quota, messages_used=r.messages_used,
        opens=r.opens, last_used_at=_aware(r.last_used_at), revoked_at=_aware(r.revoked_at),
        created_at=_aware(r.created_at), updated_at=_aware(r.updated_at), conversations=r.conversation_count or 0,
    )


# --- creator side -----------------------------------------------------------------


def insert_link(
    conn: Connection, gpt_id: str, token_hash: str, *, label: str, policy: str, emails: list[str],
    domains: list[str], expires_at: datetime | None, quota: int | None,
) -> str:
    link_id = new_id("shl", 8)
    t = now()
    conn.execute(
        sa.insert(share_links).values(
            id=link_id, gpt_id=gpt_id, label=label, token_hash=token_hash, policy=policy,
            allowed_emails=list(emails), allowed_domains=list(domains), expires_at=expires_at,
            message_quota=quota, messages_used=0, opens=0, created_at=t, updated_at=t,
        )
    )
    return link_id


def list_links(conn: Connection, gpt_id: str) -> list[LinkRow]:
    rows = conn.execute(
        sa.select(share_links, _conversation_count())
        .where(share_links.c.gpt_id == gpt_id)
        .order_by(share_links.c.created_at.desc(), share_links.c.id)
    ).all()
    return [_link(r) for r in rows]


def get_link(conn: Connection, gpt_id: str, link_id: str) -> LinkRow | None:
    r = conn.execute(
        sa.select(share_links, _conversation_count()).where(share_links.c.id == link_id, share_links.c.gpt_id == gpt_id)
    ).first()
    return _link(r) if r else None


def link_gpt_id(conn: Connection, owner_id: int, link_id: str) -> str | None:
    """The GPT of ``link_id`` if that GPT belongs to ``owner_id`` (else None)."""
    return conn.execute(
        sa.select(share_links.c.gpt_id)
        .join(gpts, gpts.c.id == share_links.c.gpt_id)
        .where(share_links.c.id == link_id, gpts.c.owner_id == owner_id)
    ).scalar()


def revoke_link(conn: Connection, gpt_id: str, link_id: str) -> bool:
    """Mark revoked (the first revocation time is kept). False when no such link."""
    t = now()
    result = conn.execute(
        sa.update(share_links)
        .where(share_links.c.id == link_id, share_links.c.gpt_id == gpt_id, share_links.c.revoked_at.is_(None))
        .values(revoked_at=t, updated_at=t)
    )
    if result.rowcount == 1:
        return True
    return get_link(conn, gpt_id, link_id) is not None


def rotate_link(conn: Connection, gpt_id: str, link_id: str, token_hash: str) -> bool:
    """Give a live link a new token hash; everything else stays. False when missing or revoked."""
    result = conn.execute(
        sa.update(share_links)
        .where(share_links.c.id == link_id, share_links.c.gpt_id == gpt_id, share_links.c.revoked_at.is_(None))
        .values(token_hash=token_hash, updated_at=now())
    )
    return result.rowcount == 1


# --- visitor side ------------------------------------------------------------------


def _visit_query():
    return sa.select(share_links, gpts.c.owner_id, gpts.c.published_version).join(
        gpts, gpts.c.id == share_links.c.gpt_id
    )


def _visit(r: Any) -> Visit:
    facts = LinkFacts(
        id=r.id, gpt_id=r.gpt_id, policy=r.policy,
        allowed_emails=tuple(r.allowed_emails or ()), allowed_domains=tuple(r.allowed_domains or ()),
        expires_at=_aware(r.expires_at), message_quota=r.message_quota, messages_used=r.messages_used,
        revoked_at=_aware(r.revoked_at), gpt_published=r.published_version is not None,
    )
    return Visit(facts, r.owner_id, r.published_version)


def visit_by_token_hash(conn: Connection, token_hash: str) -> Visit | None:
    r = conn.execute(_visit_query().where(share_links.c.token_hash == token_hash)).first()
    return _visit(r) if r else None


def visit_by_id(conn: Connection, link_id: str) -> Visit | None:
    """By the link id from a signed cookie (only ever minted after a valid token)."""
    r = conn.execute(_visit_query().where(share_links.c.id == link_id)).first()
    return _visit(r) if r else None


def count_open(conn: Connection, gpt_id: str, link_id: str) -> None:
    t = now()
    conn.execute(
        sa.update(share_links)
        .where(share_links.c.id == link_id, share_links.c.gpt_id == gpt_id)
        .values(opens=share_links.c.opens + 1, last_used_at=t)
    )


def take_message(conn: Connection, gpt_id: str, link_id: str) -> bool:
    """Count one message against the link's limit, atomically: False (nothing
    counted) when the link is revoked or its limit is already reached."""
    result = conn.execute(
        sa.update(share_links)
        .where(
            share_links.c.id == link_id,
            share_links.c.gpt_id == gpt_id,
            share_links.c.revoked_at.is_(None),
            sa.or_(share_links.c.message_quota.is_(None), share_links.c.messages_used < share_links.c.message_quota),
        )
        .values(messages_used=share_links.c.messages_used + 1, last_used_at=now())
    )
    return result.rowcount == 1


def return_message(conn: Connection, gpt_id: str, link_id: str) -> None:
    """Undo ``take_message`` when the answer could not even start (nothing was saved)."""
    conn.execute(
        sa.update(share_links)
        .where(share_links.c.id == link_id, share_links.c.gpt_id == gpt_id, share_links.c.messages_used > 0)
        .values(messages_used=share_links.c.messages_used - 1)
    )


def find_user(conn: Connection, issuer: str, subject: str) -> int | None:
    return conn.execute(sa.select(users.c.id).where(users.c.issuer == issuer, users.c.subject == subject)).scalar()


def insert_shared_conversation(
    conn: Connection, gpt_id: str, user_id: int, link_id: str, version_number: int | None
) -> str:
    conv_id = insert_conversation(conn, gpt_id, user_id, "share", version_number)
    conn.execute(sa.update(conversations).where(conversations.c.id == conv_id).values(share_link_id=link_id))
    return conv_id


def _shared(gpt_id: str, user_id: int, link_id: str):
    return sa.select(conversations).where(
        conversations.c.gpt_id == gpt_id,
        conversations.c.user_id == user_id,
        conversations.c.share_link_id == link_id,
        conversations.c.source == "share",
    )


def list_shared_conversations(conn: Connection, gpt_id: str, user_id: int, link_id: str) -> list[ConversationRow]:
    rows = conn.execute(_shared(gpt_id, user_id, link_id).order_by(conversations.c.updated_at.desc())).all()
    return [_conv(r) for r in rows]


def get_shared_conversation(
    conn: Connection, gpt_id: str, user_id: int, link_id: str, conv_id: str
) -> ConversationRow | None:
    r = conn.execute(_shared(gpt_id, user_id, link_id).where(conversations.c.id == conv_id)).first()
    return _conv(r) if r else None
