"""The sharing part of the services facade: share links (create, list, revoke,
rotate) for creators, and the client's side of a link (open, decide, chat).
Mixed into ``Services``; the access decision itself lives in ``sharing.py``.
A visitor only ever sees a GPT's public face (name, description, avatar,
starters) and their own conversations through that one link.
"""

from __future__ import annotations

import sqlalchemy as sa

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Iterator

from personal_gpt import chat, limits
from personal_gpt.auth import Principal
from personal_gpt.errors import PersonalGptError, Forbidden, InvalidInput, NotFound
from personal_gpt.gpts import GptSpec
from personal_gpt.knowledge.retrieval import visitor_citations
from personal_gpt.sharing import (
    MAX_SESSION_AGE,
    NOT_AVAILABLE,
    QUOTA_REACHED,
    Decision,
    LinkRefused,
    Visitor,
    decide,
    hash_token,
    link_url,
    looks_like_token,
    new_token,
    normalise_domains,
    normalise_emails,
    normalise_expiry,
    normalise_label,
    normalise_quota,
)
from personal_gpt.store import repos
from personal_gpt.store import sharing as links

log = logging.getLogger(__name__)

VISITOR_ISSUER = "visitor"  # anonymous browsers on public links; never an OIDC issuer (those are URLs)
_VISITOR_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
NO_LINK = "There is no share link with that id."


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ShareLink:
    """A link as its creator sees it (never the token: only its hash is kept)."""

    id: str
    gpt_id: str
    label: str
    policy: str  # "public" | "signin"
    allowed_emails: list[str]
    allowed_domains: list[str]
    expires_at: datetime | None
    message_quota: int | None
    messages_used: int
    opens: int
    conversations: int
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    status: str  # "active" | "revoked" | "expired"

    @property
    def public(self) -> bool:
        return self.policy == "public"


@dataclass
class SharedView:
    """What the share page may show: the decision, and only when it allows, the GPT's
    public face. Never instructions, knowledge, model or settings."""

    decision: Decision
    name: str = ""
    description: str = ""
    avatar: str = ""
    starters: list[str] = field(default_factory=list)


@dataclass
class SharedMessage:
    """One turn of a visitor's own conversation: text, and the sources (number, file, page,
    evidence sentence) only when the creator shows sources to clients; never the model."""

    role: str
    content: str
    created_at: datetime | None
    stopped: bool = False
    citations: list[dict] = field(default_factory=list)
    id: int | None = None  # the message id (feedback on answers)


def _link_view(row: links.LinkRow, now: datetime) -> ShareLink:
    if row.revoked_at is not None:
        status = "revoked"
    elif row.expires_at is not None and row.expires_at <= now:
        status = "expired"
    else:
        status = "active"
    return ShareLink(
        row.id, row.gpt_id, row.label, row.policy, list(row.allowed_emails), list(row.allowed_domains),
        row.expires_at, row.message_quota, row.messages_used, row.opens, row.conversations, row.last_used_at,
        row.revoked_at, row.created_at, status,
    )


class SharingMethods:
    share_max_session_age: timedelta | None = None  # None: the sign-in settings' maximum (default 12 h)
    share_recheck_s: float = 0.5  # a streaming answer re-reads its link at least this often

    def _max_session_age(self) -> timedelta:
        if self.share_max_session_age is not None:
            return self.share_max_session_age
        try:
            config = self.auth_config
        except PersonalGptError:
            config = None
        return config.session_max_age if config is not None else MAX_SESSION_AGE

    # -- creator side -------------------------------------------------------------

    def create_share_link(
        self, p: Principal, gpt_id: str, *, label: str = "", public: bool = False,
        emails: str | Iterable[str] = (), domains: str | Iterable[str] = (),
        expires: date | datetime | None = None, quota: int | None = None,
    ) -> tuple[ShareLink, str]:
        """A new link to one of ``p``'s GPTs. Returns the link and its token — the
        only time the token exists outside the visitor's URL (the store keeps its hash).
        ``public`` links admit anyone; otherwise visitors sign in, and non-empty
        ``emails``/``domains`` narrow who may. A date ``expires`` ends with that day (UTC)."""
        label = normalise_label(label)
        emails, domains = normalise_emails(emails), normalise_domains(domains)
        if public and (emails or domains):
            raise InvalidInput(
                "A public link is open to anyone: remove the e-mail and domain lists, or make it a sign-in link."
            )
        expires_at = normalise_expiry(expires, _now())
        quota = normalise_quota(quota)
        uid = self._uid(p)
        token = new_token()
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            link_id = links.insert_link(
                conn, gpt_id, hash_token(token), label=label, policy="public" if public else "signin",
                emails=list(emails), domains=list(domains), expires_at=expires_at, quota=quota,
            )
            row = links.get_link(conn, gpt_id, link_id)
        log.info("share link %s created for %s", link_id, gpt_id)
        return _link_view(row, _now()), token

    def list_share_links(self, p: Principal, gpt_id: str) -> list[ShareLink]:
        """Every link of the GPT, newest first, with opens, conversations and last use."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            rows = links.list_links(conn, gpt_id)
        now = _now()
        return [_link_view(r, now) for r in rows]

    @staticmethod
    def _own_link(conn, uid: int, link_id: str) -> str:
        """The GPT id of ``link_id`` when that GPT is ``uid``'s; NotFound otherwise."""
        from personal_gpt.services import _check_id

        _check_id(link_id, "share link")
        gpt_id = links.link_gpt_id(conn, uid, link_id)
        if gpt_id is None:
            raise NotFound(NO_LINK)
        return gpt_id

    def revoke_share_link(self, p: Principal, link_id: str) -> ShareLink:
        """Stop a link for good: its URL and every browser that opened it; a reply
        streaming through it stops at its next piece."""
        uid = self._uid(p)
        with self.store.tx() as conn:
            gpt_id = self._own_link(conn, uid, link_id)
            links.revoke_link(conn, gpt_id, link_id)
            row = links.get_link(conn, gpt_id, link_id)
        self._closed_links().add(link_id)
        log.info("share link %s revoked", link_id)
        return _link_view(row, _now())

    def rotate_share_link(self, p: Principal, link_id: str) -> tuple[ShareLink, str]:
        """A new URL for the same link (same audience, limits and history); the old
        URL stops working. Browsers that already opened the link keep it (their
        cookie names the link, not the token) until the cookie ages out; to shut
        everyone out, revoke. A revoked link cannot be brought back: make a new one."""
        uid = self._uid(p)
        token = new_token()
        with self.store.tx() as conn:
            gpt_id = self._own_link(conn, uid, link_id)
            if not links.rotate_link(conn, gpt_id, link_id, hash_token(token)):
                raise InvalidInput("This link was revoked, so it cannot get a new address: create a new link.")
            row = links.get_link(conn, gpt_id, link_id)
        log.info("share link %s rotated", link_id)
        return _link_view(row, _now()), token

    @staticmethod
    def share_url(token: str, base_url: str) -> str:
        """``BASE/s/<token>``, the address to send people."""
        return link_url(token, base_url)

    # -- client side: plumbing --------------------------------------------------------

    def _closed_links(self) -> set[str]:
        """Links revoked by this process: streams check it on every piece, for free."""
        closed = self.__dict__.get("_share_closed")
        if closed is None:
            closed = self.__dict__.setdefault("_share_closed", set())
        return closed

    def _visit(self, conn, link_id: str) -> links.Visit | None:
        from personal_gpt.services import _ID

        if not isinstance(link_id, str) or not _ID.match(link_id):
            return None
        return links.visit_by_id(conn, link_id)

    def _admit(self, link_id: str, visitor: Visitor, now: datetime | None = None) -> tuple[links.Visit, Decision]:
        """Read the link and decide. Unknown, revoked, expired and unpublished links raise
        the one NotFound sentence; a refusal for this visitor raises LinkRefused."""
        with self.store.read() as conn:
            visit = self._visit(conn, link_id)
        decision = decide(
            visit.facts if visit else None, visitor, now or _now(), max_session_age=self._max_session_age()
        )
        if not decision.allowed:
            log.info("share link %s: %s (%s)", link_id if visit else "?", decision.outcome, decision.reason)
        if decision.not_available:
            raise NotFound(NOT_AVAILABLE)
        return visit, decision

    def _visitor_key(self, visitor: Visitor) -> tuple[str, str, Principal]:
        if visitor.principal is not None:
            if visitor.principal.issuer == VISITOR_ISSUER:  # only ever made here, from the cookie id
                raise Forbidden("Sign in again to continue.")
            return visitor.principal.issuer, visitor.principal.subject, visitor.principal
        if not _VISITOR_ID.match(visitor.visitor_id or ""):
            raise Forbidden("Your browser did not keep this site's cookie: allow cookies and open the link again.")
        p = Principal(issuer=VISITOR_ISSUER, subject=visitor.visitor_id)
        return p.issuer, p.subject, p

    def _visitor_uid(self, visitor: Visitor, create: bool) -> int | None:
        """The visitor's user row (issuer + subject; anonymous browsers by their cookie id)."""
        issuer, subject, p = self._visitor_key(visitor)
        if issuer != VISITOR_ISSUER:
            return self._uid(p) if create else self._known_uid(issuer, subject)
        with self.store.tx() as conn:  # anonymous browsers are not cached: there can be very many
            if create:
                return repos.ensure_user(conn, issuer, subject, None, None)
            return links.find_user(conn, issuer, subject)

    def _known_uid(self, issuer: str, subject: str) -> int | None:
        with self.store.read() as conn:
            return links.find_user(conn, issuer, subject)

    @staticmethod
    def _allowed(decision: Decision) -> None:
        if not decision.allowed:
            raise LinkRefused(decision)

    def _published(self, conn, visit: links.Visit) -> GptSpec:
        v = repos.get_version(conn, visit.facts.gpt_id, int(visit.published_version))
        if v is None:  # a published version always exists; be safe all the same
            raise NotFound(NOT_AVAILABLE)
        return GptSpec.model_validate(v.spec)

    def _link_open_now(self, link_id: str) -> bool:
        with self.store.read() as conn:
            visit = self._visit(conn, link_id)
        if visit is None:
            return False
        f = visit.facts
        return f.revoked_at is None and f.gpt_published and (f.expires_at is None or f.expires_at > _now())

    def share_link_current(self, link_id: str, fingerprint: str) -> bool:
        """Whether a browser's link cookie still matches the link's current token (a
        rotated link shuts out browsers that opened the old URL)."""
        import hmac

        from personal_gpt.services import _ID
        from personal_gpt.store.schema import share_links

        if not isinstance(link_id, str) or not _ID.match(link_id) or not isinstance(fingerprint, str) \
                or len(fingerprint) != 16:
            return False
        with self.store.read() as conn:
            current = conn.execute(
                sa.select(share_links.c.token_hash).where(share_links.c.id == link_id)
            ).scalar()
        return current is not None and hmac.compare_digest(current[:16], fingerprint)

    # -- client side ------------------------------------------------------------------

    def open_share_token(self, token: str) -> str:
        """The link id behind a token from a URL, counting the open. Malformed, unknown,
        revoked, expired or unpublished: the same NotFound sentence every time."""
        if not looks_like_token(token):
            raise NotFound(NOT_AVAILABLE)
        with self.store.read() as conn:
            visit = links.visit_by_token_hash(conn, hash_token(token))
        decision = decide(visit.facts if visit else None, Visitor(), _now(), max_session_age=self._max_session_age())
        if decision.not_available:
            log.info("share link %s not opened: %s", visit.facts.id if visit else "?", decision.reason)
            raise NotFound(NOT_AVAILABLE)
        with self.store.tx() as conn:
            links.count_open(conn, visit.facts.gpt_id, visit.facts.id)
        return visit.facts.id

    def shared_access(self, link_id: str, visitor: Visitor, now: datetime | None = None) -> SharedView:
        """What the share page shows this visitor. A link that is not available raises
        NotFound (one sentence for all such links); otherwise the view holds the
        decision ("allow", "sign_in" or "denied") and, when allowed, the GPT's face."""
        visit, decision = self._admit(link_id, visitor, now)
        if not decision.allowed:
            return SharedView(decision)
        with self.store.read() as conn:
            spec = self._published(conn, visit)
        return SharedView(decision, spec.name, spec.description, spec.avatar, list(spec.starters))

    def start_shared_conversation(self, link_id: str, visitor: Visitor) -> str:
        """A new conversation through the link, owned by the visitor."""
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=True)
        with self.store.tx() as conn:
            return links.insert_shared_conversation(
                conn, visit.facts.gpt_id, uid, visit.facts.id, visit.published_version
            )

    def shared_conversations(self, link_id: str, visitor: Visitor) -> list[repos.ConversationRow]:
        """The visitor's own conversations through this link, newest first."""
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=False)
        if uid is None:
            return []
        with self.store.read() as conn:
            return links.list_shared_conversations(conn, visit.facts.gpt_id, uid, visit.facts.id)

    def _shared_conv(self, conn, visit: links.Visit, uid: int | None, conv_id: str) -> repos.ConversationRow:
        from personal_gpt.services import _check_id

        _check_id(conv_id, "conversation")
        conv = None
        if uid is not None:
            conv = links.get_shared_conversation(conn, visit.facts.gpt_id, uid, visit.facts.id, conv_id)
        if conv is None:
            raise NotFound("There is no conversation with that id.")
        return conv

    def shared_messages(self, link_id: str, visitor: Visitor, conv_id: str) -> list[SharedMessage]:
        """The turns of one of the visitor's own conversations through this link."""
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=False)
        with self.store.read() as conn:
            self._shared_conv(conn, visit, uid, conv_id)
            rows = self._live_messages(conv_id, repos.list_messages(conn, conv_id))  # unrecorded: from memory
            show = self._published(conn, visit).show_sources
        return [
            SharedMessage(m.role, m.content, m.created_at, (m.meta or {}).get("finish_reason") == "cancelled",
                          visitor_citations((m.meta or {}).get("citations") or []) if show else [], m.id)
            for m in rows
        ]

    def send_shared(self, link_id: str, visitor: Visitor, conv_id: str, message: str) -> chat.Reply:
        """One turn through the link with the GPT's published version, by the same chat
        path as ``send``. The link is decided again on every turn and counted against
        its message limit, after the GPT's visitor limits (``limits``: message size,
        conversation length, per-visitor and per-GPT rate; TooLarge / RateLimited, and
        then nothing is saved or counted); while the answer streams, a revoked, expired or
        unpublished link stops it at the next piece (NotFound; the partial answer is kept)."""
        message = chat.check_message(message)
        visit, decision = self._admit(link_id, visitor)
        self._allowed(decision)
        uid = self._visitor_uid(visitor, create=False)
        gpt_id = visit.facts.gpt_id
        with self.store.read() as conn:
            self._shared_conv(conn, visit, uid, conv_id)
            rows = repos.list_messages(conn, conv_id)
            history = self._history(conv_id, rows)  # unrecorded turns from memory
            spec = self._published(conn, visit)
            # the GPT's visitor limits (size, length, rate), before the link's quota and the model
            visitor_limits = limits.stored_limits(conn, gpt_id)
            message = limits.check_message(visitor_limits, message)
            limits.check_conversation(visitor_limits, len(rows))
            limits.check_rate(conn, visitor_limits, gpt_id, uid, _now())
        with self.store.tx() as conn:
            counted = links.take_message(conn, gpt_id, link_id)
        if not counted:  # revoked or the limit reached since we decided: decide again for the sentence
            visit, decision = self._admit(link_id, visitor)
            self._allowed(decision)
            raise LinkRefused(QUOTA_REACHED)
        try:
            reply = self._answer(
                conv_id, gpt_id, history, message, spec, visit.owner_id,
                guard=lambda pieces, r: self._guarded(link_id, visit.facts.expires_at, pieces, r),
            )
        except BaseException:
            with self.store.tx() as conn:
                links.return_message(conn, gpt_id, link_id)
            raise
        if not spec.show_sources:
            reply.citations = []  # passages and file names stay with the creator (SECURITY #25) unless shown
        return reply

    def _guarded(
        self, link_id: str, expires_at: datetime | None, pieces: Iterator[str], reply: chat.Reply
    ) -> Iterator[str]:
        """Pass ``pieces`` on while the link stays open: revocation in this process and
        expiry are checked before every piece, the database every ``share_recheck_s``."""
        closed = self._closed_links()
        checked = time.monotonic()
        try:
            while True:
                # checked before asking for the next piece, so nothing is produced (or saved) after a stop
                stop = link_id in closed or (expires_at is not None and expires_at <= _now())
                if not stop and time.monotonic() - checked >= self.share_recheck_s:
                    stop = not self._link_open_now(link_id)
                    checked = time.monotonic()
                if stop:
                    reply.cancel.set()
                    pieces.close()  # the chat path marks the answer cancelled
                    log.info("share link %s closed while answering: stopped", link_id)
                    raise NotFound(NOT_AVAILABLE)
                piece = next(pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            pieces.close()

