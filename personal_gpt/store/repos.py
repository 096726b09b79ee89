"""Repository functions: plain data in, plain data out, every query scoped.

Each function takes an open connection (the caller owns the transaction) and
the owner's user id or the GPT id. A row that belongs to someone else is
indistinguishable from a missing one: both return None.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.schema import (
    adapters,
    api_keys,
    chunks,
    conversations,
    corrections,
    embed_settings,
    feedback,
    gpt_versions,
    gpts,
    job_metrics,
    jobs,
    knowledge_files,
    login_states,
    messages,
    privacy_settings,
    providers,
    share_links,
    users,
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def new_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


# --- users -----------------------------------------------------------------


def ensure_user(conn: Connection, issuer: str, subject: str, email: str | None, name: str | None) -> int:
    row = conn.execute(
        sa.select(users.c.id, users.c.email, users.c.name).where(users.c.issuer == issuer, users.c.subject == subject)
    ).first()
    if row is not None:
        if (email and email != row.email) or (name and name != row.name):
            conn.execute(sa.update(users).where(users.c.id == row.id).values(email=email or row.email, name=name or row.name))
        return row.id
    try:
        with conn.begin_nested():
            return conn.execute(
                sa.insert(users).values(issuer=issuer, subject=subject, email=email, name=name, created_at=now())
            ).inserted_primary_key[0]
    except sa.exc.IntegrityError:  # created concurrently
        return conn.execute(
            sa.select(users.c.id).where(users.c.issuer == issuer, users.c.subject == subject)
        ).scalar_one()


# --- GPTs and versions -----------------------------------------------------


@dataclass
class GptRow:
    id: str
    owner_id: int
    name: str
    draft: dict
    revision: int
    published_version: int | None
    created_at: datetime
    updated_at: datetime
    latest_version: int | None = None


@dataclass
class VersionRow:
    number: int
    spec: dict
    note: str
    created_at: datetime


def _gpt(row: Any, latest: int | None = None) -> GptRow:
    return GptRow(
        id=row.id,
        owner_id=row.owner_id,
        name=row.name,
        draft=dict(row.draft),
        revision=row.revision,
        published_version=row.published_version,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        latest_version=latest,
    )


def _latest_subq():
    return (
        sa.select(sa.func.max(gpt_versions.c.number))
        .where(gpt_versions.c.gpt_id == gpts.c.id)
        .scalar_subquery()
        .label("latest")
    )


def list_gpts(conn: Connection, owner_id: int) -> list[GptRow]:
    rows = conn.execute(
        sa.select(gpts, _latest_subq()).where(gpts.c.owner_id == owner_id).order_by(gpts.c.updated_at.desc())
    ).all()
    return [_gpt(r, r.latest) for r in rows]


def recently_chatted_published(conn: Connection, limit: int) -> list[GptRow]:
    """Published GPTs, the one with the newest conversation first (any owner; for warming models at start)."""
    last = (sa.select(sa.func.max(conversations.c.updated_at)).where(conversations.c.gpt_id == gpts.c.id)
            .scalar_subquery().label("last_chat"))
    rows = conn.execute(
        sa.select(gpts, last).where(gpts.c.published_version.is_not(None), last.is_not(None))
        .order_by(last.desc()).limit(max(0, int(limit)))
    ).all()
    return [_gpt(r) for r in rows]


def get_gpt(conn: Connection, owner_id: int, gpt_id: str) -> GptRow | None:
    row = conn.execute(sa.select(gpts, _latest_subq()).where(gpts.c.id == gpt_id, gpts.c.owner_id == owner_id)).first()
    return _gpt(row, row.latest) if row else None


def insert_gpt(conn: Connection, owner_id: int, spec: dict, note: str) -> str:
    gpt_id = new_id("gpt", 6)
    t = now()
    conn.execute(
        sa.insert(gpts).values(
            id=gpt_id, owner_id=owner_id, name=spec["name"], draft=spec, revision=1, published_version=None,
            created_at=t, updated_at=t,
        )
    )
    conn.execute(sa.insert(gpt_versions).values(gpt_id=gpt_id, number=1, spec=spec, note=note, created_at=t))
    return gpt_id


def update_draft(conn: Connection, owner_id: int, gpt_id: str, spec: dict, expected_revision: int, note: str) -> int | None:
    """Write a new draft and version row if nobody else saved since ``expected_revision``.

    Returns the new version number, or None when the revision is stale.
    """
    result = conn.execute(
        sa.update(gpts)
        .where(gpts.c.id == gpt_id, gpts.c.owner_id == owner_id, gpts.c.revision == expected_revision)
        .values(name=spec["name"], draft=spec, revision=expected_revision + 1, updated_at=now())
    )
    if result.rowcount != 1:
        return None
    number = (
        conn.execute(sa.select(sa.func.max(gpt_versions.c.number)).where(gpt_versions.c.gpt_id == gpt_id)).scalar() or 0
    ) + 1
    conn.execute(sa.insert(gpt_versions).values(gpt_id=gpt_id, number=number, spec=spec, note=note, created_at=now()))
    return number


def set_published(conn: Connection, owner_id: int, gpt_id: str, number: int | None) -> bool:
    result = conn.execute(
        sa.update(gpts)
        .where(gpts.c.id == gpt_id, gpts.c.owner_id == owner_id)
        .values(published_version=number, updated_at=now())
    )
    return result.rowcount == 1


def list_versions(conn: Connection, gpt_id: str) -> list[VersionRow]:
    rows = conn.execute(
        sa.select(gpt_versions).where(gpt_versions.c.gpt_id == gpt_id).order_by(gpt_versions.c.number.desc())
    ).all()
    return [VersionRow(r.number, dict(r.spec), r.note, _aware(r.created_at)) for r in rows]


def get_version(conn: Connection, gpt_id: str, number: int) -> VersionRow | None:
    r = conn.execute(
        sa.select(gpt_versions).where(gpt_versions.c.gpt_id == gpt_id, gpt_versions.c.number == number)
    ).first()
    return VersionRow(r.number, dict(r.spec), r.note, _aware(r.created_at)) if r else None


# Visitors without an account: anonymous browsers on links and widgets, and API callers
# (subject = key id [+ ":" + the caller's user]). Their user rows exist only for the GPT's conversations.
ANONYMOUS_ISSUERS = ("visitor", "api")


@dataclass
class DeletedGpt:
    """What went with a deleted GPT, for the caches outside the database."""

    conversation_ids: list[str]
    share_link_ids: list[str]
    api_key_ids: list[str]
    adapter_ids: list[str]
    visitors_removed: int


def delete_gpt(conn: Connection, owner_id: int, gpt_id: str) -> DeletedGpt | None:
    """Delete the GPT and every row that belongs to it, explicitly (not trusting ON DELETE
    CASCADE alone): versions; every person's conversations, messages and feedback;
    corrections; knowledge files and passages; jobs and their metrics (a running fine-tune
    sees its job gone and stops); adapters; share links and logins in flight through them;
    API keys; embed and privacy settings; and the anonymous visitors' and API callers'
    user rows left without any conversation. None when ``owner_id`` has no such GPT."""
    if conn.execute(sa.select(gpts.c.id).where(gpts.c.id == gpt_id, gpts.c.owner_id == owner_id)).first() is None:
        return None
    if conn.dialect.name == "sqlite":  # deleted rows overwritten with zeros, not left in free pages
        conn.exec_driver_sql("PRAGMA secure_delete=ON")
    col = lambda table, name: sa.select(table.c[name]).where(table.c.gpt_id == gpt_id)  # noqa: E731
    conv_ids = [r[0] for r in conn.execute(col(conversations, "id")).all()]
    link_ids = [r[0] for r in conn.execute(col(share_links, "id")).all()]
    key_ids = [r[0] for r in conn.execute(col(api_keys, "id")).all()]
    adapter_ids = [r[0] for r in conn.execute(col(adapters, "id")).all()]
    people = {r[0] for r in conn.execute(sa.select(conversations.c.user_id).distinct()
                                         .where(conversations.c.gpt_id == gpt_id)).all()}
    convs = col(conversations, "id")
    message_ids = sa.select(messages.c.id).where(messages.c.conversation_id.in_(convs))
    conn.execute(sa.delete(feedback).where(sa.or_(feedback.c.gpt_id == gpt_id, feedback.c.message_id.in_(message_ids))))
    conn.execute(sa.delete(corrections).where(corrections.c.gpt_id == gpt_id))
    conn.execute(sa.update(corrections).where(corrections.c.message_id.in_(message_ids)).values(message_id=None))
    conn.execute(sa.delete(messages).where(messages.c.conversation_id.in_(convs)))
    conn.execute(sa.delete(conversations).where(conversations.c.gpt_id == gpt_id))
    conn.execute(sa.delete(chunks).where(chunks.c.gpt_id == gpt_id))
    conn.execute(sa.delete(knowledge_files).where(knowledge_files.c.gpt_id == gpt_id))
    conn.execute(sa.delete(job_metrics).where(job_metrics.c.job_id.in_(col(jobs, "id"))))
    conn.execute(sa.delete(jobs).where(jobs.c.gpt_id == gpt_id))
    conn.execute(sa.delete(adapters).where(adapters.c.gpt_id == gpt_id))
    if link_ids:
        conn.execute(sa.delete(login_states).where(login_states.c.return_link_id.in_(link_ids)))
    conn.execute(sa.update(conversations).where(conversations.c.share_link_id.in_(col(share_links, "id")))
                 .values(share_link_id=None))  # never another GPT's; be safe all the same
    conn.execute(sa.delete(share_links).where(share_links.c.gpt_id == gpt_id))
    conn.execute(sa.update(conversations).where(conversations.c.api_key_id.in_(col(api_keys, "id")))
                 .values(api_key_id=None))
    conn.execute(sa.delete(api_keys).where(api_keys.c.gpt_id == gpt_id))
    conn.execute(sa.delete(embed_settings).where(embed_settings.c.gpt_id == gpt_id))
    conn.execute(sa.delete(privacy_settings).where(privacy_settings.c.gpt_id == gpt_id))
    conn.execute(sa.delete(gpt_versions).where(gpt_versions.c.gpt_id == gpt_id))
    conn.execute(sa.delete(gpts).where(gpts.c.id == gpt_id))
    removed = 0
    still_chatting = sa.select(conversations.c.id).where(conversations.c.user_id == users.c.id).exists()
    if people:
        removed += conn.execute(
            sa.delete(users).where(users.c.id.in_(people), users.c.issuer.in_(ANONYMOUS_ISSUERS), ~still_chatting)
        ).rowcount
    for key_id in key_ids:  # API callers of the GPT's keys whose call left no conversation (e.g. it failed)
        removed += conn.execute(
            sa.delete(users).where(
                users.c.issuer == "api", ~still_chatting,
                sa.or_(users.c.subject == key_id, users.c.subject.startswith(key_id + ":", autoescape=True)),
            )
        ).rowcount
    return DeletedGpt(conv_ids, link_ids, key_ids, adapter_ids, removed)


# --- conversations ----------------------------------------------------------


@dataclass
class ConversationRow:
    id: str
    gpt_id: str
    user_id: int
    source: str
    version_number: int | None
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass
class MessageRow:
    id: int
    role: str
    content: str
    meta: dict = field(default_factory=dict)
    created_at: datetime | None = None


def _conv(r: Any) -> ConversationRow:
    return ConversationRow(
        r.id, r.gpt_id, r.user_id, r.source, r.version_number, r.title, _aware(r.created_at), _aware(r.updated_at)
    )


def insert_conversation(conn: Connection, gpt_id: str, user_id: int, source: str, version_number: int | None) -> str:
    conv_id = new_id("conv", 8)
    t = now()
    conn.execute(
        sa.insert(conversations).values(
            id=conv_id, gpt_id=gpt_id, user_id=user_id, source=source, version_number=version_number, title="",
            created_at=t, updated_at=t,
        )
    )
    return conv_id


def get_conversation(conn: Connection, user_id: int, conv_id: str) -> ConversationRow | None:
    r = conn.execute(
        sa.select(conversations).where(conversations.c.id == conv_id, conversations.c.user_id == user_id)
    ).first()
    return _conv(r) if r else None


def list_conversations(conn: Connection, user_id: int, gpt_id: str, source: str | None = None) -> list[ConversationRow]:
    q = sa.select(conversations).where(conversations.c.gpt_id == gpt_id, conversations.c.user_id == user_id)
    if source:
        q = q.where(conversations.c.source == source)
    return [_conv(r) for r in conn.execute(q.order_by(conversations.c.updated_at.desc())).all()]


def list_messages(conn: Connection, conv_id: str) -> list[MessageRow]:
    rows = conn.execute(sa.select(messages).where(messages.c.conversation_id == conv_id).order_by(messages.c.id)).all()
    return [MessageRow(r.id, r.role, r.content, dict(r.meta or {}), _aware(r.created_at)) for r in rows]


def add_message(conn: Connection, conv_id: str, role: str, content: str, meta: dict | None = None) -> int:
    t = now()
    mid = conn.execute(
        sa.insert(messages).values(conversation_id=conv_id, role=role, content=content, meta=meta or {}, created_at=t)
    ).inserted_primary_key[0]
    values: dict[str, Any] = {"updated_at": t}
    if role == "user":
        title = conn.execute(sa.select(conversations.c.title).where(conversations.c.id == conv_id)).scalar()
        if not title:
            values["title"] = " ".join(content.split())[:80]
    conn.execute(sa.update(conversations).where(conversations.c.id == conv_id).values(**values))
    return mid


def delete_messages_from(conn: Connection, conv_id: str, message_id: int) -> None:
    conn.execute(sa.delete(messages).where(messages.c.conversation_id == conv_id, messages.c.id >= message_id))


# --- model providers ---------------------------------------------------------


@dataclass
class ProviderRow:
    id: str
    name: str
    base_url: str
    model: str
    api_key_encrypted: str
    context_window: int
    created_at: datetime


def _prov(r: Any) -> ProviderRow:
    return ProviderRow(r.id, r.name, r.base_url, r.model, r.api_key_encrypted, r.context_window, _aware(r.created_at))


def list_providers(conn: Connection, owner_id: int) -> list[ProviderRow]:
    rows = conn.execute(sa.select(providers).where(providers.c.owner_id == owner_id).order_by(providers.c.name)).all()
    return [_prov(r) for r in rows]


def get_provider(conn: Connection, owner_id: int, provider_id: str) -> ProviderRow | None:
    r = conn.execute(
        sa.select(providers).where(providers.c.id == provider_id, providers.c.owner_id == owner_id)
    ).first()
    return _prov(r) if r else None


def insert_provider(
    conn: Connection, owner_id: int, name: str, base_url: str, model: str, api_key_encrypted: str, context_window: int
) -> str:
    pid = new_id("prov", 5)
    conn.execute(
        sa.insert(providers).values(
            id=pid, owner_id=owner_id, name=name, base_url=base_url, model=model,
            api_key_encrypted=api_key_encrypted, context_window=context_window, created_at=now(),
        )
    )
    return pid


def delete_provider(conn: Connection, owner_id: int, provider_id: str) -> bool:
    r = conn.execute(sa.delete(providers).where(providers.c.id == provider_id, providers.c.owner_id == owner_id))
    return r.rowcount == 1
