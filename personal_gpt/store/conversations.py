"""Repository functions for the creator's view of every conversation of a GPT (any
source, any person), the feedback on answers, and corrected answers.

Creator-side queries are scoped by the GPT's owner (``gpts.owner_id`` through a join),
never by ``conversations.user_id``: a visitor's conversation belongs to the visitor.
No validation of people's input here (the services layer does it); SQL that works on
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from personal_gpt.store.repos import _aware, new_id, now
from personal_gpt.store.schema import (
    api_keys,
    conversations,
    corrections,
    feedback,
    gpts,
    knowledge_files,
    messages,
    share_links,
    users,
)

ANONYMOUS = "anonymous visitor"  # the person filter's value for anonymous visitors (share links, widget)
YOU = "you"  # ... and for the creator's own conversations (builder preview, chat, CLI)
VISITOR_ISSUER = "visitor"
API_ISSUER = "api"


@dataclass
class ConversationSummary:
    """One conversation as its GPT's creator sees it in the list."""

    id: str
    gpt_id: str
    source: str
    title: str
    created_at: datetime
    updated_at: datetime
    person: str  # "You", "anonymous visitor", an e-mail address, "API caller", ...
    share_link_id: str | None = None
    link_label: str = ""
    site: str = ""
    api_key_id: str | None = None
    key_name: str = ""
    messages: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0


@dataclass
class TurnRow:
    id: int
    role: str
    content: str
    meta: dict = field(default_factory=dict)
    created_at: datetime | None = None
    rating: int | None = None
    comment: str = ""


@dataclass
class FeedbackRow:
    message_id: int
    rating: int
    comment: str
    updated_at: datetime | None = None


@dataclass
class CorrectionRow:
    id: str
    gpt_id: str
    message_id: int | None
    question: str
    answer: str
    target: str
    knowledge_file_id: str | None
    knowledge_file_name: str
    knowledge_file_status: str
    created_at: datetime


@dataclass
class Filters:
    source: str | None = None
    link_id: str | None = None
    site: str | None = None
    key_id: str | None = None
    person: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    text: str | None = None


def like_pattern(text: str) -> str:
    """``%text%`` with LIKE's own characters escaped (the escape character is a backslash)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _person_label(owner_id: int, user_id: int, issuer: str | None, subject: str | None, email: str | None,
                  name: str | None) -> str:
    if user_id == owner_id:
        return "You"
    if issuer == VISITOR_ISSUER:
        return ANONYMOUS
    if issuer == API_ISSUER:
        caller = (subject or "").partition(":")[2]
        return f"API caller {caller}" if caller else "API caller"
    return (email or "").lower() or name or "signed-in visitor"


def _summary_query(owner_id: int):
    count = (
        sa.select(sa.func.count(messages.c.id)).where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery()
    )

    def rated(value: int):
        return (
            sa.select(sa.func.count(feedback.c.id))
            .select_from(feedback.join(messages, messages.c.id == feedback.c.message_id))
            .where(messages.c.conversation_id == conversations.c.id, feedback.c.rating == value)
            .scalar_subquery()
        )

    return (
        sa.select(
            conversations, gpts.c.owner_id,
            users.c.issuer, users.c.subject, users.c.email, users.c.name,
            share_links.c.label.label("link_label"), api_keys.c.name.label("key_name"),
            count.label("message_count"), rated(1).label("up"), rated(-1).label("down"),
        )
        .select_from(
            conversations.join(gpts, gpts.c.id == conversations.c.gpt_id)
            .join(users, users.c.id == conversations.c.user_id)
            .outerjoin(share_links, share_links.c.id == conversations.c.share_link_id)
            .outerjoin(api_keys, api_keys.c.id == conversations.c.api_key_id)
        )
        .where(gpts.c.owner_id == owner_id)
    )


def _summary(r: Any) -> ConversationSummary:
    return ConversationSummary(
        id=r.id, gpt_id=r.gpt_id, source=r.source, title=r.title or "", created_at=_aware(r.created_at),
        updated_at=_aware(r.updated_at),
        person=_person_label(r.owner_id, r.user_id, r.issuer, r.subject, r.email, r.name),
        share_link_id=r.share_link_id, link_label=r.link_label or "", site=r.site or "",
        api_key_id=r.api_key_id, key_name=r.key_name or "", messages=r.message_count or 0,
        thumbs_up=r.up or 0, thumbs_down=r.down or 0,
    )


def list_for_creator(conn: Connection, owner_id: int, gpt_id: str, filters: Filters, limit: int = 200
                     ) -> list[ConversationSummary]:
    """The GPT's conversations (every source and person) that match ``filters``, newest first."""
    q = _summary_query(owner_id).where(conversations.c.gpt_id == gpt_id)
    f = filters
    if f.source:
        q = q.where(conversations.c.source == f.source)
    if f.link_id:
        q = q.where(conversations.c.share_link_id == f.link_id)
    if f.site:
        q = q.where(conversations.c.site == f.site)
    if f.key_id:
        q = q.where(conversations.c.api_key_id == f.key_id)
    if f.person:
        if f.person == YOU:
            q = q.where(conversations.c.user_id == owner_id)
        elif f.person == ANONYMOUS:
            q = q.where(users.c.issuer == VISITOR_ISSUER)
        else:
            q = q.where(sa.func.lower(users.c.email) == f.person.lower())
    if f.since is not None:
        q = q.where(conversations.c.created_at >= f.since)
    if f.until is not None:
        q = q.where(conversations.c.created_at < f.until)
    if f.text:
        q = q.where(
            sa.exists().where(
                messages.c.conversation_id == conversations.c.id,
                messages.c.content.ilike(like_pattern(f.text), escape="\\"),
            )
        )
    q = q.order_by(conversations.c.updated_at.desc(), conversations.c.id).limit(limit)
    return [_summary(r) for r in conn.execute(q).all()]


def get_for_creator(conn: Connection, owner_id: int, conv_id: str) -> ConversationSummary | None:
    r = conn.execute(_summary_query(owner_id).where(conversations.c.id == conv_id)).first()
    return _summary(r) if r else None


def turns(conn: Connection, conv_id: str) -> list[TurnRow]:
    """A conversation's messages in order, each with its feedback (if any)."""
    rows = conn.execute(
        sa.select(messages, feedback.c.rating, feedback.c.comment)
        .select_from(messages.outerjoin(feedback, feedback.c.message_id == messages.c.id))
        .where(messages.c.conversation_id == conv_id)
        .order_by(messages.c.id)
    ).all()
    return [
        TurnRow(r.id, r.role, r.content, dict(r.meta or {}), _aware(r.created_at), r.rating, r.comment or "")
        for r in rows
    ]


@dataclass
class FilterChoices:
    links: list[tuple[str, str]] = field(default_factory=list)  # (id, label)
    sites: list[str] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (id, name)
    people: list[str] = field(default_factory=list)  # e-mail addresses of signed-in visitors


def filter_choices(conn: Connection, owner_id: int, gpt_id: str) -> FilterChoices:
    """What the filters can pick from for one GPT (its links, keys, and the sites and
    people seen in its conversations). The caller has checked the GPT is the creator's."""
    links = conn.execute(
        sa.select(share_links.c.id, share_links.c.label).where(share_links.c.gpt_id == gpt_id)
        .order_by(share_links.c.created_at)
    ).all()
    keys = conn.execute(
        sa.select(api_keys.c.id, api_keys.c.name).where(api_keys.c.gpt_id == gpt_id).order_by(api_keys.c.created_at)
    ).all()
    sites = conn.execute(
        sa.select(conversations.c.site).where(conversations.c.gpt_id == gpt_id, conversations.c.site.is_not(None))
        .distinct()
    ).scalars().all()
    people = conn.execute(  # signed-in visitors (the creator is "you")
        sa.select(users.c.email).select_from(conversations.join(users, users.c.id == conversations.c.user_id))
        .where(conversations.c.gpt_id == gpt_id, conversations.c.user_id != owner_id, users.c.email.is_not(None),
               users.c.issuer.not_in([VISITOR_ISSUER, API_ISSUER]))
        .distinct()
    ).scalars().all()
    return FilterChoices(
        [(r.id, r.label or "") for r in links], sorted(s for s in sites if s), [(r.id, r.name or "") for r in keys],
        sorted({p.lower() for p in people if p}),
    )


# --- answers and feedback -------------------------------------------------------------------


def answer_in_conversation(conn: Connection, conv_id: str, message_id: int):
    """The assistant message ``message_id`` of ``conv_id`` (id, role, content, meta), or None."""
    return conn.execute(
        sa.select(messages.c.id, messages.c.role, messages.c.content, messages.c.meta)
        .where(messages.c.id == message_id, messages.c.conversation_id == conv_id, messages.c.role == "assistant")
    ).first()


def owned_answer(conn: Connection, owner_id: int, message_id: int):
    """An assistant message in any conversation of one of ``owner_id``'s GPTs:
    (id, content, meta, conversation_id, gpt_id), or None."""
    return conn.execute(
        sa.select(messages.c.id, messages.c.content, messages.c.meta, messages.c.conversation_id,
                  conversations.c.gpt_id)
        .select_from(messages.join(conversations, conversations.c.id == messages.c.conversation_id)
                     .join(gpts, gpts.c.id == conversations.c.gpt_id))
        .where(messages.c.id == message_id, messages.c.role == "assistant", gpts.c.owner_id == owner_id)
    ).first()


def question_before(conn: Connection, conv_id: str, message_id: int):
    """The person's turn just before answer ``message_id`` (content, meta), or None."""
    return conn.execute(
        sa.select(messages.c.content, messages.c.meta)
        .where(messages.c.conversation_id == conv_id, messages.c.id < message_id, messages.c.role == "user")
        .order_by(messages.c.id.desc()).limit(1)
    ).first()


def save_feedback(conn: Connection, gpt_id: str, message_id: int, rating: int, comment: str) -> None:
    """One rating per answer: rating again replaces the earlier one."""
    t = now()
    values = {"rating": rating, "comment": comment, "updated_at": t}
    done = conn.execute(sa.update(feedback).where(feedback.c.message_id == message_id).values(**values)).rowcount
    if done:
        return
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(feedback).values(gpt_id=gpt_id, message_id=message_id, created_at=t, **values))
    except IntegrityError:  # rated at the same moment elsewhere: this one wins
        conn.execute(sa.update(feedback).where(feedback.c.message_id == message_id).values(**values))


def feedback_of(conn: Connection, conv_id: str) -> dict[int, FeedbackRow]:
    rows = conn.execute(
        sa.select(feedback.c.message_id, feedback.c.rating, feedback.c.comment, feedback.c.updated_at)
        .select_from(feedback.join(messages, messages.c.id == feedback.c.message_id))
        .where(messages.c.conversation_id == conv_id)
    ).all()
    return {r.message_id: FeedbackRow(r.message_id, r.rating, r.comment or "", _aware(r.updated_at)) for r in rows}


# --- corrections -------------------------------------------------------------------------------


def insert_correction(conn: Connection, gpt_id: str, message_id: int | None, question: str, answer: str,
                      target: str, knowledge_file_id: str | None, correction_id: str | None = None) -> str:
    cid = correction_id or new_id("fix", 8)
    conn.execute(sa.insert(corrections).values(
        id=cid, gpt_id=gpt_id, message_id=message_id, question=question, answer=answer, target=target,
        knowledge_file_id=knowledge_file_id, created_at=now(),
    ))
    return cid


def _correction_query():
    return sa.select(
        corrections, knowledge_files.c.display_name.label("file_name"), knowledge_files.c.status.label("file_status"),
    ).select_from(corrections.outerjoin(knowledge_files, knowledge_files.c.id == corrections.c.knowledge_file_id))


def _correction(r: Any) -> CorrectionRow:
    return CorrectionRow(
        r.id, r.gpt_id, r.message_id, r.question, r.answer, r.target, r.knowledge_file_id, r.file_name or "",
        r.file_status or "", _aware(r.created_at),
    )


def list_corrections(conn: Connection, gpt_id: str, target: str | None = None) -> list[CorrectionRow]:
    q = _correction_query().where(corrections.c.gpt_id == gpt_id)
    if target:
        q = q.where(corrections.c.target == target)
    return [_correction(r) for r in conn.execute(q.order_by(corrections.c.created_at.desc(), corrections.c.id)).all()]


def owned_correction(conn: Connection, owner_id: int, correction_id: str) -> CorrectionRow | None:
    r = conn.execute(
        _correction_query().join(gpts, gpts.c.id == corrections.c.gpt_id)
        .where(corrections.c.id == correction_id, gpts.c.owner_id == owner_id)
    ).first()
    return _correction(r) if r else None


def delete_correction(conn: Connection, gpt_id: str, correction_id: str) -> bool:
    return bool(conn.execute(
        sa.delete(corrections).where(corrections.c.id == correction_id, corrections.c.gpt_id == gpt_id)
    ).rowcount)
