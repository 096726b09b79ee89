"""The embed part of the services facade: a GPT's widget settings (allowed sites,
who may chat, theme, limits) and its visitors' conversations for the creator; the
visitor's side of the widget (public face, start, list, read, send) for the routes.
Mixed into ``Services``. Sites and theme are checked in ``embed_sites.py``, the
access decision is ``sharing.decide``, limits are ``limits.py``; no HTTP here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from personal_gpt import chat
from personal_gpt.auth import Principal
from personal_gpt.embed_sites import (
    default_theme,
    frame_ancestors,
    normalise_sites,
    normalise_theme,
    origin_or_none,
    stored_theme,
)
from personal_gpt.errors import InvalidInput, NotFound
from personal_gpt.gpts import GptSpec
from personal_gpt.knowledge.retrieval import visitor_citations
from personal_gpt.sharing import (
    POLICIES,
    Decision,
    LinkFacts,
    LinkRefused,
    Visitor,
    decide,
    normalise_domains,
    normalise_emails,
)
from personal_gpt.store import embeds, repos

log = logging.getLogger(__name__)

NOT_AVAILABLE = "This chat is not available here."
NO_CONVERSATION = "There is no conversation with that id."


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class EmbedSettings:
    """A GPT's widget settings as its creator edits them."""

    gpt_id: str
    sites: list[str]
    policy: str  # "public" | "signin"
    allowed_emails: list[str]
    allowed_domains: list[str]
    theme: dict
    limits: object  # personal_gpt.limits.Limits
    updated_at: datetime | None = None

    @property
    def enabled(self) -> bool:
        """An empty site list means the embed is off."""
        return bool(self.sites)


@dataclass
class EmbedPage:
    """What the widget routes need about a GPT whose embed is on and which is published:
    its public face (name, description, avatar, starters, theme, policy), and the sites
    (for ``frame-ancestors`` and Origin checks; never sent to visitors)."""

    gpt_id: str
    name: str
    description: str
    avatar: str
    starters: list[str]
    theme: dict
    policy: str
    sites: tuple[str, ...]

    @property
    def frame_ancestors(self) -> str:
        return frame_ancestors(self.sites)

    def public(self) -> dict:
        """The JSON the widget may show anyone."""
        return {
            "gpt": self.gpt_id, "name": self.name, "description": self.description, "avatar": self.avatar,
            "starters": list(self.starters), "theme": dict(self.theme), "policy": self.policy,
        }


@dataclass
class EmbedMessage:
    role: str
    content: str
    citations: list[dict] = field(default_factory=list)
    stopped: bool = False
    id: int | None = None  # the message id (feedback on answers)


def _limits(data: dict | None):
    from personal_gpt.limits import Limits

    return Limits.from_json(data)


class EmbedMethods:
    # -- creator side ---------------------------------------------------------------

    def _embed_view(self, gpt_id: str, row: embeds.EmbedRow | None) -> EmbedSettings:
        if row is None:
            return EmbedSettings(gpt_id, [], "public", [], [], default_theme(), _limits(None))
        return EmbedSettings(
            gpt_id, list(row.allowed_sites), row.policy if row.policy in POLICIES else "signin",
            list(row.allowed_emails), list(row.allowed_domains), stored_theme(row.theme), _limits(row.limits),
            row.updated_at,
        )

    def embed_settings(self, p: Principal, gpt_id: str) -> EmbedSettings:
        """The widget settings of one of ``p``'s GPTs (the defaults, embed off, when never saved)."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return self._embed_view(gpt_id, embeds.get_settings(conn, gpt_id))

    def save_embed_settings(
        self, p: Principal, gpt_id: str, *, sites: str | Iterable[str] | None = None, policy: str | None = None,
        emails: str | Iterable[str] | None = None, domains: str | Iterable[str] | None = None,
        theme: dict | None = None, limits: dict | object | None = None,
    ) -> EmbedSettings:
        """Change the widget settings; an argument left as None keeps its current value.
        ``sites``: the web sites allowed to show the widget (what the creator types: one
        per line or a list; each becomes an exact origin; empty turns the embed off).
        ``policy``: "public" (anyone on those sites) or "signin" (visitors sign in in a
        popup; non-empty ``emails``/``domains`` narrow who may, as on share links).
        ``theme``: colour, title, greeting, avatar, position, open_on_load. ``limits``:
        a dict of the creator's values (``limits.check_limits_input``) or a ``Limits``."""
        from personal_gpt.limits import Limits, check_limits_input

        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            current = self._embed_view(gpt_id, embeds.get_settings(conn, gpt_id))
        new_sites = list(normalise_sites(sites)) if sites is not None else current.sites
        new_policy = current.policy if policy is None else policy
        if new_policy not in POLICIES:
            raise InvalidInput("Choose who may chat: anyone on your sites (public) or people who sign in.")
        new_emails = list(normalise_emails(emails)) if emails is not None else current.allowed_emails
        new_domains = list(normalise_domains(domains)) if domains is not None else current.allowed_domains
        if new_policy == "public" and (new_emails or new_domains):
            if emails is None and domains is None:  # switching to public: the lists no longer apply
                new_emails, new_domains = [], []
            else:
                raise InvalidInput(
                    "A public widget is open to anyone on your sites: remove the e-mail and domain lists, "
                    "or ask visitors to sign in."
                )
        new_theme = normalise_theme(theme) if theme is not None else current.theme
        if limits is None:
            new_limits = current.limits
        elif isinstance(limits, Limits):
            new_limits = check_limits_input(limits.to_json())
        else:
            new_limits = check_limits_input(limits)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            embeds.save_settings(
                conn, gpt_id, allowed_sites=new_sites, policy=new_policy, allowed_emails=new_emails,
                allowed_domains=new_domains, theme=new_theme, limits=new_limits.to_json(),
            )
        log.info("embed settings of %s saved (%d sites)", gpt_id, len(new_sites))
        return self.embed_settings(p, gpt_id)

    def check_embed_site(self, p: Principal, gpt_id: str, url_or_origin: str) -> tuple[bool, str]:
        """The Share tab's "test from this domain": would a page at this address be allowed
        to show the widget? ``(allowed, one sentence saying why)``."""
        from personal_gpt.embed_sites import normalise_site

        settings = self.embed_settings(p, gpt_id)
        gpt = self.get_gpt(p, gpt_id)
        try:
            origin = normalise_site(url_or_origin)
        except InvalidInput as exc:
            return False, str(exc)
        if not settings.sites:
            return False, f"The embed is off (no sites are listed), so {origin} cannot show the widget."
        if origin not in settings.sites:
            hint = ""
            host = origin.split("://", 1)[1]
            twin = host[4:] if host.startswith("www.") else "www." + host
            if any(s.split("://", 1)[1] == twin for s in settings.sites):
                hint = f" Note that {twin} is listed: www and the bare domain are different sites; list both."
            return False, f"{origin} is not on the list, so browsers will refuse to show the widget there.{hint}"
        if gpt.published_version is None:
            return False, f"{origin} is on the list, but the GPT is not published yet, so the widget says it is not available."
        return True, f"{origin} is on the list: the widget will load there."

    def embed_conversations(self, p: Principal, gpt_id: str) -> list[embeds.EmbedConversation]:
        """Visitors' widget conversations of one of ``p``'s GPTs, newest first, with their site."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return embeds.list_embed_conversations(conn, gpt_id)

    def embed_conversation_messages(self, p: Principal, gpt_id: str, conv_id: str) -> list[repos.MessageRow]:
        """The turns of one widget conversation of one of ``p``'s GPTs."""
        from personal_gpt.services import _check_id

        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            if not embeds.embed_conversation_exists(conn, gpt_id, _check_id(conv_id, "conversation")):
                raise NotFound(NO_CONVERSATION)
            return repos.list_messages(conn, conv_id)

    # -- visitor side: plumbing ------------------------------------------------------

    def _embed_visit(self, gpt_id: str) -> embeds.EmbedVisit | None:
        from personal_gpt.services import _ID

        if not isinstance(gpt_id, str) or not _ID.match(gpt_id):
            return None
        with self.store.read() as conn:
            return embeds.visit(conn, gpt_id)

    @staticmethod
    def _embed_facts(visit: embeds.EmbedVisit | None) -> LinkFacts | None:
        """The widget as a "link" for ``sharing.decide``: unknown GPT and embed off are no
        link at all; unpublished is decided like an unpublished link (all "not available")."""
        if visit is None or visit.settings is None or not visit.settings.allowed_sites:
            return None
        s = visit.settings
        return LinkFacts(
            id=f"embed:{visit.gpt_id}", gpt_id=visit.gpt_id, policy=s.policy,
            allowed_emails=tuple(s.allowed_emails), allowed_domains=tuple(s.allowed_domains),
            gpt_published=visit.published_version is not None,
        )

    def _embed_admit(self, gpt_id: str, visitor: Visitor) -> tuple[embeds.EmbedVisit, Decision]:
        visit = self._embed_visit(gpt_id)
        decision = decide(self._embed_facts(visit), visitor, _now(), max_session_age=self._max_session_age())
        if decision.not_available:
            raise NotFound(NOT_AVAILABLE)
        return visit, decision

    def _embed_spec(self, conn, visit: embeds.EmbedVisit) -> GptSpec:
        v = repos.get_version(conn, visit.gpt_id, int(visit.published_version))
        if v is None:
            raise NotFound(NOT_AVAILABLE)
        return GptSpec.model_validate(v.spec)

    @staticmethod
    def _site_ok(visit: embeds.EmbedVisit, site: object, own_origin: str | None) -> str:
        origin = origin_or_none(site)
        sites = visit.settings.allowed_sites if visit.settings else []
        if origin is None or not (origin in sites or (own_origin is not None and origin == origin_or_none(own_origin))):
            from personal_gpt.errors import Forbidden

            raise Forbidden("This site is not allowed to show this chat.")
        return origin

    # -- visitor side ----------------------------------------------------------------

    def embed_page(self, gpt_id: str) -> EmbedPage:
        """The widget's view of a GPT: NotFound (one sentence) when the GPT is unknown,
        unpublished or its embed is off."""
        visit = self._embed_visit(gpt_id)
        facts = self._embed_facts(visit)
        if facts is None or not facts.gpt_published:
            raise NotFound(NOT_AVAILABLE)
        with self.store.read() as conn:
            spec = self._embed_spec(conn, visit)
        s = visit.settings
        theme = stored_theme(s.theme)
        return EmbedPage(
            visit.gpt_id, spec.name, spec.description, spec.avatar, list(spec.starters), theme,
            s.policy if s.policy in POLICIES else "signin", tuple(s.allowed_sites),
        )

    def embed_access(self, gpt_id: str, visitor: Visitor) -> Decision:
        """The access decision for a widget visitor (allow / sign_in / denied); NotFound
        when the widget is not available."""
        return self._embed_admit(gpt_id, visitor)[1]

    def start_embed_conversation(self, gpt_id: str, visitor: Visitor, site: str, own_origin: str | None = None) -> str:
        """A new widget conversation owned by the visitor, labelled with ``site`` (the
        embedding page's origin: one of the allowed sites, or ``own_origin`` for the
        Share tab's preview)."""
        visit, decision = self._embed_admit(gpt_id, visitor)
        if not decision.allowed:
            raise LinkRefused(decision)
        origin = self._site_ok(visit, site, own_origin)
        uid = self._visitor_uid(visitor, create=True)
        with self.store.tx() as conn:
            return embeds.insert_conversation_for(conn, gpt_id, uid, origin, visit.published_version)

    def embed_visitor_conversations(self, gpt_id: str, visitor: Visitor) -> list[repos.ConversationRow]:
        """The visitor's own widget conversations with this GPT, newest first."""
        _visit, decision = self._embed_admit(gpt_id, visitor)
        if not decision.allowed:
            raise LinkRefused(decision)
        uid = self._visitor_uid(visitor, create=False)
        if uid is None:
            return []
        with self.store.read() as conn:
            return embeds.list_visitor_conversations(conn, gpt_id, uid)

    def _visitor_conv(self, conn, gpt_id: str, uid: int | None, conv_id: str) -> tuple[repos.ConversationRow, str]:
        from personal_gpt.services import _check_id

        _check_id(conv_id, "conversation")
        found = embeds.get_visitor_conversation(conn, gpt_id, uid, conv_id) if uid is not None else None
        if found is None:
            raise NotFound(NO_CONVERSATION)
        return found

    def embed_visitor_messages(self, gpt_id: str, visitor: Visitor, conv_id: str) -> list[EmbedMessage]:
        """The turns of one of the visitor's own widget conversations."""
        _visit, decision = self._embed_admit(gpt_id, visitor)
        if not decision.allowed:
            raise LinkRefused(decision)
        uid = self._visitor_uid(visitor, create=False)
        with self.store.read() as conn:
            self._visitor_conv(conn, gpt_id, uid, conv_id)
            rows = self._live_messages(conv_id, repos.list_messages(conn, conv_id))  # unrecorded: from memory
            show = self._embed_spec(conn, self._embed_visit(gpt_id)).show_sources
        return [
            EmbedMessage(m.role, m.content, visitor_citations((m.meta or {}).get("citations") or []) if show else [],
                         (m.meta or {}).get("finish_reason") == "cancelled", m.id)
            for m in rows
        ]

    def send_embed(
        self, gpt_id: str, visitor: Visitor, conv_id: str, message: str, own_origin: str | None = None
    ) -> chat.Reply:
        """One widget turn with the GPT's published version, by the same chat path as
        ``send``: access decided again, the message and conversation sizes and the rate
        limits checked (TooLarge, RateLimited), the conversation's site still allowed."""
        from personal_gpt.limits import check_conversation, check_message, check_rate

        visit, decision = self._embed_admit(gpt_id, visitor)
        if not decision.allowed:
            raise LinkRefused(decision)
        limits = _limits(visit.settings.limits)
        message = check_message(limits, message)
        uid = self._visitor_uid(visitor, create=False)
        with self.store.read() as conn:
            _conv, site = self._visitor_conv(conn, gpt_id, uid, conv_id)
            self._site_ok(visit, site, own_origin)
            rows = repos.list_messages(conn, conv_id)
            history = self._history(conv_id, rows)
            check_conversation(limits, len(rows))
            check_rate(conn, limits, gpt_id, uid, _now())
            spec = self._embed_spec(conn, visit)
        reply = self._answer(conv_id, gpt_id, history, message, spec, visit.owner_id)
        if not spec.show_sources:
            reply.citations = []  # file names and passages stay with the creator unless shown
        return reply
