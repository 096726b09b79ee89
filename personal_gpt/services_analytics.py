"""Services mixin: analytics figures per GPT and across GPTs (mixed into Services).

Scopes every read by the GPT's owner (``gpts.owner_id``) through joins in
``store.analytics``; the figures themselves are counted in ``personal_gpt.analytics``.
pandas is imported inside the methods only (this module loads with Services on the
first page render). Evaluation runs (source "test") are left out unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput

DEFAULT_DAYS = 30
MAX_DAYS = 3660  # ten years: a window wider than this is a typo


@dataclass
class AnalyticsReport:
    """Every figure of the analytics page for one GPT (``gpt_id``) or all of a creator's
    GPTs (``gpt_id`` None; then ``per_gpt`` has one row per GPT). Days are UTC, both ends included."""

    gpt_id: str | None
    since: date
    until: date
    totals: dict[str, Any]
    per_day: Any  # DataFrame: day, conversations, messages, people
    first_token: Any  # DataFrame: day, answers, median_s, p90_s
    links: Any  # DataFrame: where, conversations, messages, people (share links by label)
    sites: Any  # the same for widget sites
    api_keys: Any  # the same for API keys
    negative_feedback: Any  # DataFrame: when, gpt, question, answer, comment, where, person, conversation_id
    unanswered: Any  # DataFrame: when, gpt, question, answer, why, passages, best_evidence, ...
    per_gpt: Any = None  # DataFrame when across GPTs
    conversations: Any = field(default=None, repr=False)  # the underlying frames (for exports)
    messages: Any = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        return self.totals.get("messages", 0) == 0


def _window(since: date | datetime | None, until: date | datetime | None) -> tuple[date, date]:
    from personal_gpt.analytics import as_day

    until_day = as_day(until) or datetime.now(timezone.utc).date()
    since_day = as_day(since) or until_day - timedelta(days=DEFAULT_DAYS - 1)
    if since_day > until_day:
        raise InvalidInput("The start date is after the end date: pick a start on or before the end.")
    if (until_day - since_day).days >= MAX_DAYS:
        raise InvalidInput("Pick a date range of at most ten years.")
    return since_day, until_day


def _bounds(since_day: date, until_day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(since_day, time.min, tzinfo=timezone.utc)
    end = datetime.combine(until_day + timedelta(days=1), time.min, tzinfo=timezone.utc)
    return start, end


class AnalyticsMethods:
    def _analytics_rows(self, p: Principal, gpt_id: str | None, since, until, include_test: bool,
                        with_conversations: bool = True):
        from personal_gpt.store import analytics as store

        since_day, until_day = _window(since, until)
        start, end = _bounds(since_day, until_day)
        uid = self._uid(p)
        with self.store.read() as conn:
            if gpt_id is not None:
                row = self._row(conn, uid, gpt_id)  # NotFound for someone else's GPT
                gpts = [(row.id, row.name)]
            else:
                from personal_gpt.store import repos

                gpts = [(r.id, r.name) for r in repos.list_gpts(conn, uid)]
            convs = store.conversation_rows(conn, uid, gpt_id, start, end, include_test) if with_conversations else []
            msgs = store.message_rows(conn, uid, gpt_id, start, end, include_test)
        return since_day, until_day, gpts, convs, msgs

    def analytics(
        self, p: Principal, gpt_id: str | None, since: date | datetime | None = None,
        until: date | datetime | None = None, *, include_test: bool = False,
    ) -> AnalyticsReport:
        """The figures of one of ``p``'s GPTs, or of all of them (``gpt_id`` None), for the UTC
        days ``since`` .. ``until`` (both included; default: the last 30 days up to today).
        Conversations through share links, the widget and the API count (they belong to
        visitors but to the owner's GPT); evaluation runs do not unless ``include_test``."""
        from personal_gpt import analytics as a

        since_day, until_day, gpts, conv_rows, msg_rows = self._analytics_rows(p, gpt_id, since, until, include_test)
        convs, msgs = a.conversations_frame(conv_rows), a.messages_frame(msg_rows)
        return AnalyticsReport(
            gpt_id=gpt_id, since=since_day, until=until_day,
            totals=a.totals(convs, msgs),
            per_day=a.per_day(convs, msgs, since_day, until_day),
            first_token=a.first_token_per_day(msgs),
            links=a.busiest(convs, msgs, "share"),
            sites=a.busiest(convs, msgs, "embed"),
            api_keys=a.busiest(convs, msgs, "api"),
            negative_feedback=a.negative_feedback(msgs),
            unanswered=a.unanswered(msgs),
            per_gpt=a.per_gpt(convs, msgs, gpts) if gpt_id is None else None,
            conversations=convs, messages=msgs,
        )

    def conversations_table(
        self, p: Principal, gpt_id: str | None, since: date | datetime | None = None,
        until: date | datetime | None = None, *, include_test: bool = False,
    ):
        """Every message of the window as one row (for the conversations CSV): conversation_id,
        gpt, source, where, person, role, text, when, rating. Unrecorded turns have no text."""
        from personal_gpt import analytics as a

        *_, msg_rows = self._analytics_rows(p, gpt_id, since, until, include_test, with_conversations=False)
        return a.conversations_export(a.messages_frame(msg_rows))
