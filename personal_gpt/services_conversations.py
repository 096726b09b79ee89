"""Services mixin: creators' view of their GPTs' conversations, feedback on answers, corrected answers (mixed into Services).

Creators list and read every conversation of their own GPTs (any source, any person) and
write a corrected answer once, into the GPT's knowledge or its fine-tuning data. People rate
answers in their own conversations only: the creator's chat, a share link's visitor (same
access check as sending) and a widget visitor. No Streamlit, no HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput, NotFound
from personal_gpt.store import conversations as cstore
from personal_gpt.store import repos

SOURCES = ("preview", "chat", "cli", "share", "embed", "api", "test")
OWN_SOURCES = ("preview", "chat", "cli", "test")  # the creator's own conversations (rate_answer)
TARGETS = ("knowledge", "finetune")
MAX_COMMENT = 1000
MAX_ANSWER = 8000
MAX_SEARCH = 200
NOT_RECORDED = "Not recorded (privacy setting)"
NO_ANSWER = "There is no answer with that id in this conversation."
NO_CORRECTION = "There is no corrected answer with that id."

ANONYMOUS = cstore.ANONYMOUS
YOU = cstore.YOU
ConversationSummary = cstore.ConversationSummary
FilterChoices = cstore.FilterChoices


@dataclass
class Feedback:
    message_id: int
    rating: int  # 1 thumbs up, -1 thumbs down
    comment: str = ""


@dataclass
class Turn:
    """One message of a conversation as the creator reads it."""

    id: int
    role: str
    content: str  # "" when not recorded
    created_at: datetime | None
    recorded: bool = True
    stopped: bool = False
    citations: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    rating: int | None = None
    comment: str = ""


@dataclass
class ConversationDetail:
    summary: cstore.ConversationSummary
    turns: list[Turn]


@dataclass
class Correction:
    id: str
    gpt_id: str
    message_id: int | None
    question: str
    answer: str
    target: str  # "knowledge" | "finetune"
    knowledge_file_id: str | None
    knowledge_file_name: str
    knowledge_file_status: str  # queued, ready, failed… ("" for fine-tuning data, or when the file was removed)
    created_at: datetime


def _correction(r: cstore.CorrectionRow) -> Correction:
    return Correction(r.id, r.gpt_id, r.message_id, r.question, r.answer, r.target, r.knowledge_file_id,
                      r.knowledge_file_name, r.knowledge_file_status, r.created_at)


def _unrecorded(meta: dict | None) -> bool:
    return bool((meta or {}).get("unrecorded"))


def _moment(value, end: bool) -> datetime | None:
    """A filter bound: a date is a whole day on this server's clock (``until`` includes it)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.astimezone()
    if isinstance(value, date):
        day = value + timedelta(days=1) if end else value
        return datetime.combine(day, time.min).astimezone()
    raise InvalidInput("Pick the dates from the calendar.")


def _message_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NotFound(NO_ANSWER)
    return value


def _checked_rating(rating, comment) -> tuple[int, str]:
    if isinstance(rating, bool) or rating not in (1, -1):
        raise InvalidInput("A rating is thumbs up (1) or thumbs down (-1).")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        raise InvalidInput("The comment must be text.")
    comment = comment.strip()
    if len(comment) > MAX_COMMENT:
        raise InvalidInput(f"Keep the comment under {MAX_COMMENT:,} characters.")
    return int(rating), comment


def _knowledge_file(question: str, answer: str, tag: str) -> tuple[str, bytes]:
    start = " ".join(question.split())
    start = start if len(start) <= 60 else start[:59].rstrip() + "…"
    name = f"Corrected answer – {start} ({tag}).md"
    text = f"# Corrected answer\n\n## Q: {' '.join(question.split())}\n\n{answer.strip()}\n"
    return name, text.encode("utf-8")


class ConversationMethods:
    # -- the creator's view ----------------------------------------------------------------------

    def creator_conversations(
        self, p: Principal, gpt_id: str, *, source: str | None = None, link_id: str | None = None,
        site: str | None = None, key_id: str | None = None, person: str | None = None, since=None, until=None,
        text: str | None = None, limit: int = 200,
    ) -> list[cstore.ConversationSummary]:
        """Every conversation of one of ``p``'s GPTs that matches the filters, newest first:
        source, share link, site (an origin), API key, person (an e-mail address, ``ANONYMOUS``
        or ``YOU``), dates (``since``/``until``: dates or datetimes; ``until`` includes its day)
        and words in the messages (case-insensitive)."""
        from personal_gpt.services import _check_id

        if source is not None and source not in SOURCES:
            raise InvalidInput(f"Unknown source '{str(source)[:40]}'; pick one of {', '.join(SOURCES)}.")
        if link_id:
            _check_id(link_id, "share link")
        if key_id:
            _check_id(key_id, "API key")
        text = (text or "").strip()
        if len(text) > MAX_SEARCH:
            raise InvalidInput(f"Search for at most {MAX_SEARCH} characters.")
        start, end = _moment(since, end=False), _moment(until, end=True)
        if start is not None and end is not None and start >= end:
            raise InvalidInput("The start date is after the end date.")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidInput("Ask for between 1 and 1,000 conversations.")
        filters = cstore.Filters(source=source, link_id=link_id or None, site=(site or "").strip() or None,
                                 key_id=key_id or None, person=(person or "").strip() or None, since=start,
                                 until=end, text=text or None)
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return cstore.list_for_creator(conn, uid, gpt_id, filters, limit)

    def conversation_filters(self, p: Principal, gpt_id: str) -> cstore.FilterChoices:
        """The choices for the conversations page's filters: the GPT's links (label), API
        keys (name), and the sites and signed-in people seen in its conversations."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return cstore.filter_choices(conn, uid, gpt_id)

    def creator_conversation(self, p: Principal, conv_id: str) -> ConversationDetail:
        """One conversation of one of ``p``'s GPTs with every turn, its citations and the
        feedback on each answer. Turns that were not recorded have no text (``recorded``)."""
        from personal_gpt.services import _check_id

        uid = self._uid(p)
        with self.store.read() as conn:
            summary = cstore.get_for_creator(conn, uid, _check_id(conv_id, "conversation"))
            if summary is None:
                raise NotFound("There is no conversation with that id.")
            rows = cstore.turns(conn, conv_id)
        out = []
        for r in rows:
            meta = r.meta or {}
            recorded = not _unrecorded(meta)
            out.append(Turn(
                r.id, r.role, r.content if recorded else "", r.created_at, recorded,
                meta.get("finish_reason") == "cancelled",
                list(meta.get("citations") or []) if recorded and r.role == "assistant" else [], meta,
                r.rating, r.comment,
            ))
        return ConversationDetail(summary, out)

    # -- feedback -----------------------------------------------------------------------------------

    def _rate(self, conn, gpt_id: str, conv_id: str, message_id: int, rating: int, comment: str) -> Feedback:
        if cstore.answer_in_conversation(conn, conv_id, message_id) is None:
            raise NotFound(NO_ANSWER)
        cstore.save_feedback(conn, gpt_id, message_id, rating, comment)
        return Feedback(message_id, rating, comment)

    def rate_answer(self, p: Principal, conv_id: str, message_id: int, rating: int, comment: str = "") -> Feedback:
        """Thumbs up (1) or down (-1), with an optional comment, on an answer in one of
        ``p``'s own conversations (chat, builder preview); rating again replaces it."""
        from personal_gpt.services import _check_id

        _check_id(conv_id, "conversation")
        message_id = _message_id(message_id)
        rating, comment = _checked_rating(rating, comment)
        uid = self._uid(p)
        with self.store.tx() as conn:
            conv = self._own_conv(conn, uid, conv_id)
            return self._rate(conn, conv.gpt_id, conv_id, message_id, rating, comment)

    def _own_conv(self, conn, uid: int, conv_id: str):
        """``uid``'s own chat/preview conversation (a visitor's conversation on someone's link
        is rated through the link, where the link is decided again)."""
        conv = self._conv(conn, uid, conv_id)
        if conv.source not in OWN_SOURCES:
            raise NotFound("There is no conversation with that id.")
        return conv

    def answer_feedback(self, p: Principal, conv_id: str) -> dict[int, Feedback]:
        """The ratings in one of ``p``'s own conversations, by answer id."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._own_conv(conn, uid, conv_id)
            return _feedback_map(conn, conv_id)

    def rate_shared_answer(self, link_id: str, visitor, conv_id: str, message_id: int, rating: int,
                           comment: str = "") -> Feedback:
        """A share-link visitor rates an answer in their own conversation on that link. The
        link is decided as for sending: a revoked, expired or unpublished link, or another
        visitor's conversation, give the same errors."""
        message_id = _message_id(message_id)
        rating, comment = _checked_rating(rating, comment)
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=False)
        with self.store.tx() as conn:
            self._shared_conv(conn, visit, uid, conv_id)
            return self._rate(conn, visit.facts.gpt_id, conv_id, message_id, rating, comment)

    def shared_answer_feedback(self, link_id: str, visitor, conv_id: str) -> dict[int, Feedback]:
        """The visitor's own ratings in their conversation on the link, by answer id."""
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=False)
        with self.store.read() as conn:
            self._shared_conv(conn, visit, uid, conv_id)
            return _feedback_map(conn, conv_id)

    def _embed_visitor_conv(self, gpt_id: str, visitor):
        from personal_gpt.sharing import LinkRefused

        _visit, decision = self._embed_admit(gpt_id, visitor)
        if not decision.allowed:
            raise LinkRefused(decision)
        return self._visitor_uid(visitor, create=False)

    def rate_embed_answer(self, gpt_id: str, visitor, conv_id: str, message_id: int, rating: int,
                          comment: str = "") -> Feedback:
        """A widget visitor rates an answer in their own widget conversation with this GPT
        (access decided as for sending)."""
        message_id = _message_id(message_id)
        rating, comment = _checked_rating(rating, comment)
        uid = self._embed_visitor_conv(gpt_id, visitor)
        with self.store.tx() as conn:
            self._visitor_conv(conn, gpt_id, uid, conv_id)
            return self._rate(conn, gpt_id, conv_id, message_id, rating, comment)

    def embed_answer_feedback(self, gpt_id: str, visitor, conv_id: str) -> dict[int, Feedback]:
        uid = self._embed_visitor_conv(gpt_id, visitor)
        with self.store.read() as conn:
            self._visitor_conv(conn, gpt_id, uid, conv_id)
            return _feedback_map(conn, conv_id)

    # -- corrected answers ---------------------------------------------------------------------------

    def fix_answer(self, p: Principal, message_id: int, answer: str, target: str, *,
                   run_jobs: bool = True) -> Correction:
        """The creator's right answer to the question before answer ``message_id`` (in any
        conversation of one of their GPTs). ``target`` "knowledge": a small Markdown Q&A file
        goes through ``add_knowledge`` (parsed, chunked, embedded; retrieval finds it once
        ingested); "finetune": kept as a training example for the Fine-tune tab."""
        if target not in TARGETS:
            raise InvalidInput("Choose where the corrected answer goes: knowledge or fine-tuning data.")
        if not isinstance(answer, str) or not answer.strip():
            raise InvalidInput("Write the right answer first.")
        answer = answer.strip()
        if len(answer) > MAX_ANSWER:
            raise InvalidInput(f"Keep the corrected answer under {MAX_ANSWER:,} characters.")
        if isinstance(message_id, bool) or not isinstance(message_id, int) or message_id < 1:
            raise NotFound("There is no answer with that id.")
        uid = self._uid(p)
        with self.store.read() as conn:
            found = cstore.owned_answer(conn, uid, message_id)
            if found is None:
                raise NotFound("There is no answer with that id.")
            asked = cstore.question_before(conn, found.conversation_id, message_id)
        if asked is None or _unrecorded(asked.meta) or not (asked.content or "").strip():
            raise InvalidInput("The question of this answer was not recorded, so it cannot be corrected here; "
                               "add the right answer to a knowledge file instead.")
        question, gpt_id = asked.content.strip(), found.gpt_id
        correction_id = repos.new_id("fix", 8)
        file_id = None
        if target == "knowledge":
            name, data = _knowledge_file(question, answer, correction_id[-6:])
            added = self.add_knowledge(p, gpt_id, [(name, data)], run_jobs=run_jobs).files[0]
            if added.file_id is None:
                raise InvalidInput(f"The corrected answer could not be added to the knowledge: {added.message}")
            file_id = added.file_id
        with self.store.tx() as conn:
            cstore.insert_correction(conn, gpt_id, message_id, question, answer, target, file_id, correction_id)
        return self._one_correction(uid, correction_id)

    def _one_correction(self, uid: int, correction_id: str) -> Correction:
        with self.store.read() as conn:
            row = cstore.owned_correction(conn, uid, correction_id)
        if row is None:
            raise NotFound(NO_CORRECTION)
        return _correction(row)

    def list_corrections(self, p: Principal, gpt_id: str, target: str | None = None) -> list[Correction]:
        """The GPT's corrected answers, newest first (``target`` narrows to one kind)."""
        if target is not None and target not in TARGETS:
            raise InvalidInput("Choose where the corrected answers went: knowledge or fine-tuning data.")
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return [_correction(r) for r in cstore.list_corrections(conn, gpt_id, target)]

    def delete_correction(self, p: Principal, correction_id: str) -> None:
        """Forget a corrected answer; one added to the knowledge takes its file with it."""
        from personal_gpt.services import _check_id

        uid = self._uid(p)
        row = self._one_correction(uid, _check_id(correction_id, "corrected answer"))
        with self.store.tx() as conn:
            if not cstore.delete_correction(conn, row.gpt_id, row.id):
                raise NotFound(NO_CORRECTION)
        if row.knowledge_file_id:
            try:
                self.remove_knowledge(p, row.gpt_id, row.knowledge_file_id)
            except NotFound:  # the file was removed by hand already
                pass


def _feedback_map(conn, conv_id: str) -> dict[int, Feedback]:
    return {mid: Feedback(f.message_id, f.rating, f.comment) for mid, f in cstore.feedback_of(conn, conv_id).items()}
