"""Abuse and cost limits for visitors (embed widget, HTTP API, share links): the
``Limits`` a creator sets per GPT, the size checks of a message and a conversation,
and the rate check (one or two queries over ``messages``). Pure apart from
``check_rate`` and ``stored_limits``; it never writes and never imports streamlit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from personal_gpt.errors import InvalidInput, RateLimited, TooLarge

# The chat path refuses anything longer whatever the limits say (chat.MAX_MESSAGE_CHARS).
HARD_MAX_MESSAGE_CHARS = 8_000

VISITOR_SOURCES = ("embed", "api", "share")  # conversations that count against the GPT's daily limit
MINUTE = timedelta(seconds=60)
DAY = timedelta(hours=24)

TOO_FAST = "You're sending messages quickly — please wait a minute and try again."
VISITOR_DAY_FULL = "You've reached today's message limit for this chat — please come back tomorrow."
GPT_DAY_FULL = "This chat has reached today's message limit — please come back tomorrow."
CONVERSATION_FULL = "This conversation has reached its length limit — please start a new chat."
EMPTY_MESSAGE = "Type a message first."

# name -> (smallest, largest, what a creator calls it)
_RANGES: dict[str, tuple[int, int, str]] = {
    "per_visitor_minute": (1, 1_000, "Messages per visitor per minute"),
    "per_visitor_day": (1, 100_000, "Messages per visitor per day"),
    "per_gpt_day": (1, 10_000_000, "Messages per day for all visitors"),
    "max_message_chars": (20, HARD_MAX_MESSAGE_CHARS, "Longest message (characters)"),
    "max_conversation_messages": (2, 10_000, "Messages in one conversation"),
}


@dataclass(frozen=True)
class Limits:
    per_visitor_minute: int = 10  # user messages per visitor per rolling minute
    per_visitor_day: int = 200  # per visitor per rolling 24 h
    per_gpt_day: int = 2000  # all widget+API+share visitors of one GPT per rolling 24 h
    max_message_chars: int = 4000
    max_conversation_messages: int = 100  # user+assistant messages in one conversation

    @classmethod
    def from_json(cls, data: dict | None) -> "Limits":
        """Stored limits -> Limits. Tolerant: a missing, unknown or out-of-range value
        takes its default (the stored dict was checked when saved; this never raises)."""
        if not isinstance(data, dict):
            return cls()
        values: dict[str, int] = {}
        for name, (low, high, _label) in _RANGES.items():
            value = _as_int(data.get(name))
            if value is not None and low <= value <= high:
                values[name] = value
        return cls(**values)

    def to_json(self) -> dict:
        return asdict(self)


def _as_int(value: Any) -> int | None:
    """An int from an int, an integral float or a string of digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def check_limits_input(data: dict) -> Limits:
    """A creator's values (form or CLI; numbers or digit strings) -> Limits. Missing
    keys keep their defaults; anything else wrong is refused with one sentence."""
    if not isinstance(data, dict):
        raise InvalidInput("The limits must be a set of numbers, such as messages per minute.")
    unknown = sorted(str(k) for k in data if k not in _RANGES)
    if unknown:
        raise InvalidInput(f"Unknown limit: {', '.join(unknown)}. Known limits: {', '.join(_RANGES)}.")
    values: dict[str, int] = {}
    for name, raw in data.items():
        low, high, label = _RANGES[name]
        value = _as_int(raw)
        if value is None:
            raise InvalidInput(f"{label} must be a whole number.")
        if not low <= value <= high:
            raise InvalidInput(f"{label} must be between {low:,} and {high:,}.")
        values[name] = value
    limits = Limits(**values)
    if limits.per_visitor_day < limits.per_visitor_minute:
        raise InvalidInput("Messages per visitor per day cannot be fewer than messages per visitor per minute.")
    return limits


def check_message(limits: Limits, message: str) -> str:
    """The message stripped; empty -> InvalidInput, longer than the limit -> TooLarge."""
    if not isinstance(message, str):
        raise InvalidInput("A message must be text.")
    message = message.strip()
    if not message:
        raise InvalidInput(EMPTY_MESSAGE)
    longest = min(limits.max_message_chars, HARD_MAX_MESSAGE_CHARS)
    if len(message) > longest:
        raise TooLarge(f"That message is too long ({len(message):,} characters); keep it under {longest:,}.")
    return message


def check_conversation(limits: Limits, message_count: int) -> None:
    """TooLarge when a conversation of ``message_count`` messages (user + assistant)
    has no room left for one more question and its answer."""
    if message_count + 2 > limits.max_conversation_messages:
        raise TooLarge(CONVERSATION_FULL)


# --- rate ------------------------------------------------------------------------


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _retry(oldest: datetime | None, window: timedelta, now: datetime) -> int:
    if oldest is None:  # cannot happen when a limit is hit; be safe all the same
        return math.ceil(window.total_seconds())
    return max(1, math.ceil((_utc(oldest) + window - now).total_seconds()))


def check_rate(conn, limits: Limits, gpt_id: str, user_id: int, now: datetime) -> None:
    """RateLimited when one more message from ``user_id`` to ``gpt_id`` would exceed a
    limit: the visitor's user messages in the last minute or 24 h, or all visitors'
    (sources embed, api, share) user messages to the GPT in the last 24 h. ``retry_after``
    is the time until enough counted messages leave their window for one more to fit
    (the oldest one, unless concurrent sends went past the limit). The daily sentences
    win over the per-minute one when several limits are hit."""
    from personal_gpt.store.schema import conversations, messages

    now = _utc(now)
    minute_start, day_start = now - MINUTE, now - DAY
    base = messages.join(conversations, conversations.c.id == messages.c.conversation_id)
    in_day = sa.and_(
        conversations.c.gpt_id == gpt_id, messages.c.role == "user",
        messages.c.created_at > day_start, messages.c.created_at <= now,
    )
    mine = conversations.c.user_id == user_id
    mine_minute = sa.and_(mine, messages.c.created_at > minute_start)
    visitor = conversations.c.source.in_(VISITOR_SOURCES)

    def count(cond):
        return sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0)

    row = conn.execute(
        sa.select(count(mine_minute).label("minute"), count(mine).label("day"), count(visitor).label("gpt"))
        .select_from(base).where(in_day, sa.or_(mine, visitor))
    ).one()
    # (window condition, window, limit, count, sentence) for each limit reached, strongest sentence first
    hit = [
        (cond, window, limit, int(n), sentence)
        for cond, window, limit, n, sentence in (
            (visitor, DAY, limits.per_gpt_day, row.gpt, GPT_DAY_FULL),
            (mine, DAY, limits.per_visitor_day, row.day, VISITOR_DAY_FULL),
            (mine_minute, MINUTE, limits.per_visitor_minute, row.minute, TOO_FAST),
        )
        if int(n) >= limit
    ]
    if not hit:
        return
    # the message whose leaving frees a place: the oldest counted, or later ones when the count overshot
    frees = [
        sa.select(messages.c.created_at).select_from(base).where(in_day, cond)
        .order_by(messages.c.created_at, messages.c.id).offset(n - limit).limit(1).scalar_subquery()
        for cond, _window, limit, n, _sentence in hit
    ]
    times = conn.execute(sa.select(*frees)).one()
    retry_after = max(_retry(t, window, now) for t, (_c, window, *_rest) in zip(times, hit))
    raise RateLimited(hit[0][4], retry_after=retry_after)


def stored_limits(conn, gpt_id: str) -> Limits:
    """The GPT's saved limits (``embed_settings.limits``; read-only here: the embed
    settings module writes them); the defaults when none were saved."""
    from personal_gpt.store.schema import embed_settings

    data = conn.execute(sa.select(embed_settings.c.limits).where(embed_settings.c.gpt_id == gpt_id)).scalar()
    return Limits.from_json(data if isinstance(data, dict) else None)
