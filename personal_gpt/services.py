"""The one facade that pages, HTTP routes and the CLI call.

Every method takes the acting ``Principal`` and only ever reaches that
person's rows. Methods return plain data (dataclasses, GptSpec) and raise our
own errors with a sentence a creator understands. No Streamlit, no HTTP here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from pydantic import ValidationError

from personal_gpt import chat
from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.errors import Conflict, InvalidInput, NotFound
from personal_gpt.gpts import GptSpec
from personal_gpt.services_accounts import AccountMethods
from personal_gpt.services_analytics import AnalyticsMethods
from personal_gpt.services_api import ApiMethods
from personal_gpt.services_bundle import BundleMethods
from personal_gpt.services_conversations import ConversationMethods
from personal_gpt.services_embed import EmbedMethods
from personal_gpt.services_finetune import FinetuneMethods
from personal_gpt.services_knowledge import I_DONT_KNOW, KnowledgeMethods
from personal_gpt.services_privacy import PrivacyMethods
from personal_gpt.services_sharing import SharingMethods
from personal_gpt.store import open_store, repos

log = logging.getLogger(__name__)

_ID = re.compile(r"^[a-z]{2,5}_[0-9a-f]{8,32}$")
BUNDLED_CONTEXT_WINDOW = 8192


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise NotFound(f"There is no {what} with that id.")
    return value


def spec_errors(exc: ValidationError) -> str:
    """Turn pydantic's report into one or two plain sentences."""
    parts = []
    for err in exc.errors():
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err.get("loc", ()) if not isinstance(x, int))
        if err.get("type") in ("less_than_equal", "greater_than_equal", "greater_than", "less_than"):
            msg = f"{loc.replace('generation.', '').replace('_', ' ')}: {msg.lower()}"
        elif err.get("type") == "extra_forbidden":
            msg = f"Unknown setting '{loc}'."
        parts.append(msg if msg.endswith(".") else msg + ".")
    return " ".join(dict.fromkeys(parts))


def make_spec(data: dict) -> GptSpec:
    try:
        return GptSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(spec_errors(exc)) from None


@dataclass
class GptSummary:
    id: str
    name: str
    description: str
    avatar: str
    revision: int
    latest_version: int | None
    published_version: int | None
    updated_at: object

    @property
    def is_published(self) -> bool:
        return self.published_version is not None

    @property
    def has_unpublished_changes(self) -> bool:
        return self.published_version != self.latest_version


@dataclass
class Gpt:
    id: str
    spec: GptSpec
    revision: int
    latest_version: int | None
    published_version: int | None
    created_at: object
    updated_at: object

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class TokenCount:
    tokens: int
    context_window: int
    exact: bool


@dataclass
class Provider:
    id: str
    name: str
    base_url: str
    model: str
    has_api_key: bool
    context_window: int

    @property
    def ref(self) -> str:
        return f"openai:{self.id}"


class Services(
    KnowledgeMethods, FinetuneMethods, SharingMethods, AccountMethods, ApiMethods, EmbedMethods,
    ConversationMethods, AnalyticsMethods, BundleMethods, PrivacyMethods,
):
    def __init__(self, settings: Settings | None = None, models=None):
        self.settings = settings or Settings.from_env()
        self.settings.ensure_home()
        if models is not None:  # tests hand in a registry with a stand-in ChatModel
            self.__dict__["models"] = models
        self._users: dict[tuple[str, str], int] = {}
        self._users_lock = threading.Lock()
        self._tokenizer = None

    # -- plumbing -------------------------------------------------------------

    @cached_property
    def store(self):
        return open_store(self.settings)

    @cached_property
    def models(self):
        from personal_gpt.models.registry import ModelRegistry

        return ModelRegistry(self.settings)

    @cached_property
    def secrets(self):
        from personal_gpt.secretbox import SecretBox

        return SecretBox(self.settings.secret_key_file)

    def close(self) -> None:
        self.stop_privacy_cleanup()
        if "jobs" in self.__dict__:
            self.jobs.stop()
        if "models" in self.__dict__:
            self.models.close()
        if "store" in self.__dict__:
            self.store.close()

    def _uid(self, p: Principal) -> int:
        with self._users_lock:
            if p.key in self._users:
                return self._users[p.key]
        with self.store.tx() as conn:
            uid = repos.ensure_user(conn, p.issuer, p.subject, p.email if p.email_verified else None, p.name)
        with self._users_lock:
            self._users[p.key] = uid
        return uid

    def _row(self, conn, uid: int, gpt_id: str) -> repos.GptRow:
        row = repos.get_gpt(conn, uid, _check_id(gpt_id, "GPT"))
        if row is None:
            raise NotFound("There is no GPT with that id.")
        return row

    @staticmethod
    def _gpt(row: repos.GptRow) -> Gpt:
        return Gpt(
            row.id, GptSpec.model_validate(row.draft), row.revision, row.latest_version, row.published_version,
            row.created_at, row.updated_at,
        )

    # -- templates ------------------------------------------------------------

    @cached_property
    def catalog(self):
        from personal_gpt.templates import load_templates

        cat = load_templates(self.settings.templates_dir)
        for problem in cat.problems:
            log.warning("template %s skipped: %s", problem.file, problem.message)
        return cat

    def templates(self):
        return self.catalog.templates

    def template_problems(self):
        return self.catalog.problems

    # -- GPTs -----------------------------------------------------------------

    def list_gpts(self, p: Principal) -> list[GptSummary]:
        uid = self._uid(p)
        with self.store.read() as conn:
            rows = repos.list_gpts(conn, uid)
        out = []
        for r in rows:
            out.append(
                GptSummary(
                    r.id, r.name, r.draft.get("description", ""), r.draft.get("avatar", "🤖"), r.revision,
                    r.latest_version, r.published_version, r.updated_at,
                )
            )
        return out

    def get_gpt(self, p: Principal, gpt_id: str) -> Gpt:
        uid = self._uid(p)
        with self.store.read() as conn:
            return self._gpt(self._row(conn, uid, gpt_id))

    def _check_name_free(self, conn, uid: int, name: str, except_id: str | None = None) -> None:
        for r in repos.list_gpts(conn, uid):
            if r.id != except_id and r.name.casefold() == name.casefold():
                raise InvalidInput(f"You already have a GPT called '{name}'; pick another name.")

    def _check_fits(self, p: Principal, spec: GptSpec) -> None:
        count = self.count_instruction_tokens(p, spec)
        if count.tokens + spec.generation.max_new_tokens >= count.context_window:
            raise InvalidInput(
                f"The instructions take {'' if count.exact else 'about '}{count.tokens:,} tokens, and with a "
                f"{spec.generation.max_new_tokens:,}-token answer that is more than this model's "
                f"{count.context_window:,}-token context window: shorten them."
            )

    def create_gpt(
        self, p: Principal, *, template_id: str | None = None, name: str | None = None, blanks: dict | None = None,
        spec: GptSpec | dict | None = None,
    ) -> Gpt:
        """Create from a template (filling its blanks), from a spec, or blank."""
        if template_id:
            from personal_gpt.templates import render

            spec = render(self.catalog.get(template_id), blanks or {}, name=name or None)
            note = f"Created from the '{template_id}' template"
        elif spec is not None:
            spec = spec if isinstance(spec, GptSpec) else make_spec(spec)
            note = "Created"
        else:
            spec = make_spec({"name": name or "", "instructions": chat.DEFAULT_INSTRUCTIONS})
            note = "Created"
        self._check_fits(p, spec)
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._check_name_free(conn, uid, spec.name)
            gpt_id = repos.insert_gpt(conn, uid, spec.model_dump(mode="json"), note)
        return self.get_gpt(p, gpt_id)

    def save_draft(self, p: Principal, gpt_id: str, spec: GptSpec | dict, expected_revision: int, note: str = "Saved") -> Gpt:
        """Save edits as a new version. A stale ``expected_revision`` (someone saved
        in between, e.g. another tab) raises Conflict instead of overwriting."""
        spec = spec if isinstance(spec, GptSpec) else make_spec(spec)
        self._check_fits(p, spec)
        uid = self._uid(p)
        with self.store.tx() as conn:
            current = self._row(conn, uid, gpt_id)
            self._check_name_free(conn, uid, spec.name, except_id=gpt_id)
            if current.draft == spec.model_dump(mode="json") and current.revision == expected_revision:
                return self._gpt(current)  # nothing changed: no new version
            number = repos.update_draft(conn, uid, gpt_id, spec.model_dump(mode="json"), expected_revision, note)
            if number is None:
                raise Conflict("This GPT was changed somewhere else since you opened it; reload to see the latest version.")
        return self.get_gpt(p, gpt_id)

    def publish(self, p: Principal, gpt_id: str, version: int | None = None) -> Gpt:
        """Make a version (default: the latest) the one clients chat with."""
        uid = self._uid(p)
        with self.store.tx() as conn:
            row = self._row(conn, uid, gpt_id)
            number = version if version is not None else row.latest_version
            if number is None or repos.get_version(conn, gpt_id, int(number)) is None:
                raise NotFound(f"This GPT has no version {number}.")
            repos.set_published(conn, uid, gpt_id, int(number))
        return self.get_gpt(p, gpt_id)

    def unpublish(self, p: Principal, gpt_id: str) -> Gpt:
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            repos.set_published(conn, uid, gpt_id, None)
        return self.get_gpt(p, gpt_id)

    def versions(self, p: Principal, gpt_id: str) -> list[repos.VersionRow]:
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return repos.list_versions(conn, gpt_id)

    def version_spec(self, p: Principal, gpt_id: str, number: int) -> GptSpec:
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            v = repos.get_version(conn, gpt_id, int(number))
        if v is None:
            raise NotFound(f"This GPT has no version {number}.")
        return GptSpec.model_validate(v.spec)

    def published_spec(self, p: Principal, gpt_id: str) -> tuple[GptSpec, int]:
        gpt = self.get_gpt(p, gpt_id)
        if gpt.published_version is None:
            raise InvalidInput(f"'{gpt.name}' is not published yet: publish it in the builder first.")
        return self.version_spec(p, gpt_id, gpt.published_version), gpt.published_version

    def restore_version(self, p: Principal, gpt_id: str, number: int) -> Gpt:
        """Copy an old version into the draft as a new version (history is kept)."""
        spec = self.version_spec(p, gpt_id, number)
        current = self.get_gpt(p, gpt_id)
        return self.save_draft(p, gpt_id, spec, current.revision, note=f"Restored version {number}")

    def duplicate(self, p: Principal, gpt_id: str) -> Gpt:
        gpt = self.get_gpt(p, gpt_id)
        names = {g.name.casefold() for g in self.list_gpts(p)}
        base = f"{gpt.name} (copy)"[:80]
        name, n = base, 2
        while name.casefold() in names:
            name = f"{gpt.name} (copy {n})"[:80]
            n += 1
        spec = gpt.spec.model_copy(update={"name": name})
        return self.create_gpt(p, spec=spec)

    def delete_gpt(self, p: Principal, gpt_id: str) -> None:
        """Delete the GPT and everything it owns: every table's rows (``repos.delete_gpt``),
        its folder (knowledge originals, fine-tune data, adapters), its search index and
        loaded adapters in memory, unrecorded turns remembered for its conversations. A
        running fine-tune sees its job gone at its next step and stops."""
        uid = self._uid(p)
        with self.store.tx() as conn:
            gone = repos.delete_gpt(conn, uid, _check_id(gpt_id, "GPT"))
            if gone is None:
                raise NotFound("There is no GPT with that id.")
        self._closed_links().update(gone.share_link_ids)  # a reply streaming through a link stops
        from personal_gpt.store.privacy import flush_deleted

        flush_deleted(self.store.engine)  # SQLite: deleted pages leave the write-ahead log now
        self.blobs.delete_gpt(gpt_id)
        if "retriever" in self.__dict__:
            self.retriever.forget(gpt_id)
        if "models" in self.__dict__ and callable(getattr(self.models, "forget_adapter", None)):
            for adapter_id in gone.adapter_ids:
                self.models.forget_adapter(adapter_id)
        self.unrecorded_texts.drop(gone.conversation_ids)
        log.info("GPT %s deleted with %d conversations, %d anonymous visitors", gpt_id,
                 len(gone.conversation_ids), gone.visitors_removed)

    # -- models ---------------------------------------------------------------

    def model_ref(self, spec: GptSpec) -> str:
        return spec.model or self.settings.default_model

    def _provider_config(self, uid: int, provider_id: str) -> dict:
        with self.store.read() as conn:
            row = repos.get_provider(conn, uid, provider_id)
        if row is None:
            raise NotFound("That model provider no longer exists; pick another model in the builder.")
        return {
            "base_url": row.base_url, "api_key": self.secrets.open(row.api_key_encrypted), "model": row.model,
            "name": row.name, "context_window": row.context_window,
        }

    def model_for(self, p: Principal, spec: GptSpec):
        return self._model_for_uid(self._uid(p), spec)

    def _model_for_uid(self, uid: int, spec: GptSpec, gpt_id: str | None = None):
        """The model of ``spec``; ``openai:`` providers are looked up among ``uid``'s (the GPT's owner's).
        With ``gpt_id``, a local model carries that GPT's active adapter (if trained on this model)."""
        adapter = self._chat_adapter(gpt_id, self.model_ref(spec)) if gpt_id else None
        return self.models.get(self.model_ref(spec), provider_lookup=lambda pid: self._provider_config(uid, pid),
                               **({"adapter": adapter} if adapter is not None else {}))

    def warm_models(self, limit: int = 4) -> list[str]:
        """Compute the instructions of the ``limit`` published GPTs chatted with most recently, once,
        on their local models (remote providers are left alone), so the first person to ask after a
        start gets an answer that starts from the kept prompt prefix (~0.1 s here instead of ~1.1 s
        for 635 tokens). Nothing is recorded. Returns the GPT ids warmed; failures are only logged."""
        with self.store.read() as conn:
            rows = repos.recently_chatted_published(conn, limit)
            versions = {r.id: repos.get_version(conn, r.id, int(r.published_version)) for r in rows}
        warmed = []
        for row in rows:
            version = versions.get(row.id)
            if version is None:
                continue
            try:
                spec = GptSpec.model_validate(version.spec)
                if self.model_ref(spec).startswith("openai:"):
                    continue
                model = self._model_for_uid(row.owner_id, spec, row.id)
                settings = spec.generation.model_copy(update={"max_new_tokens": 1})
                for _ in model.stream(chat.build_messages(spec, [], "Hello"), settings):
                    pass
                warmed.append(row.id)
            except Exception:  # noqa: BLE001 - warming is an optimisation: the first chat will say what is wrong
                log.warning("could not warm the model of GPT %s", row.id, exc_info=True)
        return warmed

    def context_window(self, p: Principal, spec: GptSpec) -> int:
        ref = self.model_ref(spec)
        if ref.startswith("openai:"):
            uid = self._uid(p)
            with self.store.read() as conn:
                row = repos.get_provider(conn, uid, ref.split(":", 1)[1])
            return row.context_window if row else BUNDLED_CONTEXT_WINDOW
        if ref.startswith("hf:"):
            try:
                cfg = json.loads((Path(ref[3:]) / "config.json").read_text())
                return int(cfg.get("max_position_embeddings") or BUNDLED_CONTEXT_WINDOW)
            except (OSError, ValueError):
                return BUNDLED_CONTEXT_WINDOW
        return BUNDLED_CONTEXT_WINDOW

    def _light_tokenizer(self):
        """The bundled model's tokenizer via the small `tokenizers` library (no torch),
        once the model cache exists; None before that."""
        if self._tokenizer is None:
            path = self.settings.model_cache_dir / "smollm2-135m-instruct" / "tokenizer.json"
            if path.exists():
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def count_instruction_tokens(self, p: Principal, spec: GptSpec) -> TokenCount:
        window = self.context_window(p, spec)
        text = spec.instructions or chat.DEFAULT_INSTRUCTIONS
        ref = self.model_ref(spec)
        tok = self._light_tokenizer() if ref.startswith("bundled:") else None
        if tok is not None:
            # + the chat template's wrapping of the system message
            return TokenCount(len(tok.encode(text).ids) + 5, window, True)
        return TokenCount(math.ceil(len(text) / 3.5) + 5, window, False)

    # -- providers (OpenAI-compatible endpoints) ------------------------------

    def list_providers(self, p: Principal) -> list[Provider]:
        uid = self._uid(p)
        with self.store.read() as conn:
            rows = repos.list_providers(conn, uid)
        return [Provider(r.id, r.name, r.base_url, r.model, bool(r.api_key_encrypted), r.context_window) for r in rows]

    def add_provider(
        self, p: Principal, *, name: str, base_url: str, model: str, api_key: str = "", context_window: int = 8192
    ) -> Provider:
        name, base_url, model = (name or "").strip(), (base_url or "").strip().rstrip("/"), (model or "").strip()
        if not name:
            raise InvalidInput("Give the provider a name, e.g. 'My Ollama'.")
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidInput("The base URL must start with http:// or https://, e.g. http://localhost:11434/v1.")
        if not model:
            raise InvalidInput("Say which model to use on that server, e.g. 'llama3.2'.")
        if not 256 <= int(context_window) <= 2_000_000:
            raise InvalidInput("The context window must be between 256 and 2,000,000 tokens.")
        uid = self._uid(p)
        with self.store.tx() as conn:
            if any(r.name.casefold() == name.casefold() for r in repos.list_providers(conn, uid)):
                raise InvalidInput(f"You already have a provider called '{name}'.")
            pid = repos.insert_provider(conn, uid, name, base_url, model, self.secrets.seal(api_key.strip()), int(context_window))
        return next(x for x in self.list_providers(p) if x.id == pid)

    def delete_provider(self, p: Principal, provider_id: str) -> None:
        uid = self._uid(p)
        with self.store.tx() as conn:
            if not repos.delete_provider(conn, uid, _check_id(provider_id, "provider")):
                raise NotFound("There is no provider with that id.")

    def test_provider(self, p: Principal, provider_id: str) -> list[str]:
        """A real round trip to the endpoint; returns the model ids it lists."""
        cfg = self._provider_config(self._uid(p), _check_id(provider_id, "provider"))
        from personal_gpt.models.openai_compat import OpenAICompatModel

        model = OpenAICompatModel(cfg["base_url"], cfg["api_key"], cfg["model"], name=cfg["name"], timeout=10)
        try:
            return model.test_connection()
        finally:
            model.close()

    def model_choices(self, p: Principal) -> list[tuple[str, str]]:
        """(reference, label) pairs for the builder's model picker."""
        out = [("", "SmolLM2-135M-Instruct (bundled, runs on this computer)")]
        out += [(prov.ref, f"{prov.name} — {prov.model}") for prov in self.list_providers(p)]
        return out

    # -- conversations --------------------------------------------------------

    def start_conversation(self, p: Principal, gpt_id: str, source: str = "chat") -> str:
        uid = self._uid(p)
        with self.store.tx() as conn:
            row = self._row(conn, uid, gpt_id)
            version = row.published_version if source != "preview" else row.latest_version
            return repos.insert_conversation(conn, gpt_id, uid, source, version)

    def _conv(self, conn, uid: int, conv_id: str) -> repos.ConversationRow:
        conv = repos.get_conversation(conn, uid, _check_id(conv_id, "conversation"))
        if conv is None:
            raise NotFound("There is no conversation with that id.")
        return conv

    def list_conversations(self, p: Principal, gpt_id: str, source: str | None = None) -> list[repos.ConversationRow]:
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return repos.list_conversations(conn, uid, gpt_id, source)

    def messages(self, p: Principal, conv_id: str) -> list[repos.MessageRow]:
        uid = self._uid(p)
        with self.store.read() as conn:
            self._conv(conn, uid, conv_id)
            rows = repos.list_messages(conn, conv_id)
        return self._live_messages(conv_id, rows)

    def send(self, p: Principal, conv_id: str, message: str, spec: GptSpec | None = None) -> chat.Reply:
        """Save the person's message and return a Reply whose ``pieces`` stream the
        answer; the answer is saved when the stream ends or is stopped.

        ``spec`` overrides the GPT's published version (the builder's live
        preview chats with the unsaved draft)."""
        message = chat.check_message(message)
        uid = self._uid(p)
        with self.store.read() as conn:
            conv = self._conv(conn, uid, conv_id)
            history = self._history(conv_id, repos.list_messages(conn, conv_id))
        if spec is None:
            spec, _ = self.published_spec(p, conv.gpt_id)
        return self._answer(conv_id, conv.gpt_id, history, message, spec, uid)

    def _answer(
        self, conv_id: str, gpt_id: str, history: list[dict], message: str, spec: GptSpec, owner_uid: int,
        guard=None,
    ) -> chat.Reply:
        """The chat path shared by ``send`` and the share page's ``send_shared``: knowledge,
        model (providers of ``owner_uid``), stream; the person's message is saved once the
        first piece exists, the answer when the stream ends. ``guard(pieces, reply)`` may
        wrap the stream (a share link stops it when the link is revoked)."""
        from personal_gpt.gpts import refusal_message
        from personal_gpt.knowledge import grounding
        from personal_gpt.knowledge.retrieval import citations, grounded_context_block, trim

        privacy = self._turn_privacy(gpt_id)  # what this turn stores: text, nothing, or redacted
        passages, evidence = [], []
        has_knowledge = self.retriever.has_knowledge(gpt_id)
        if has_knowledge:
            passages = self.retriever.relevant(gpt_id, message)
        if passages:
            evidence = grounding.find_evidence(message, passages, self.embedder.encode)
            passages, evidence = trim(passages, evidence)
        retrieval = None
        if has_knowledge:  # analytics: questions the knowledge could not answer
            retrieval = {"passages": len(passages),
                         "best_evidence": round(max((e.score for e in evidence), default=0.0), 4)}
        refusal = refusal_message(spec, I_DONT_KNOW)
        before = grounding.judge_question(message, passages, evidence, spec.strictness) if spec.knowledge_only else None
        if before is not None and before.action == "refuse":
            reply = chat.Reply(model_name="knowledge only", grounding={"action": "refuse", "reason": before.reason,
                                                                       **before.scores}, retrieval=retrieval)
            pieces = chat.fixed_answer(refusal, reply)
        else:
            model = self._model_for_uid(owner_uid, spec, gpt_id)
            reply = chat.Reply(model_name=model.name, citations=citations(passages, evidence), retrieval=retrieval)
            context = grounded_context_block(passages, evidence) if passages else ""
            if spec.knowledge_only:  # a short answer is all that is kept: do not wait for a long one
                gen = spec.generation.model_copy(update={"max_new_tokens": min(spec.generation.max_new_tokens,
                                                                               grounding.MAX_ANSWER_TOKENS)})
                spec = spec.model_copy(update={"generation": gen})
            pieces = chat.respond(model, spec, history, message, reply, context)
            if not spec.knowledge_only and passages:
                pieces = chat.then(pieces, reply, lambda text: grounding.refine_citations(text, message,
                                                                                         reply.citations))
            if spec.knowledge_only:
                pieces = chat.checked(pieces, reply, lambda text: self._grounded(message, text, passages, evidence,
                                                                                   spec, refusal, reply))
        if guard is not None:
            pieces = guard(pieces, reply)
        first = next(pieces, None)  # validation and model errors surface here, before anything is saved
        with self.store.tx() as conn:
            asked_id = repos.add_message(conn, conv_id, "user", self._stored_text(privacy, message),
                                         self._stored_meta(privacy, None))
        self._remember_unrecorded(privacy, conv_id, asked_id, message)
        reply.pieces = self._save_when_done(conv_id, reply, first, pieces, privacy)
        return reply

    @staticmethod
    def _grounded(message: str, text: str, passages, evidence, spec: GptSpec, refusal: str, reply: chat.Reply) -> str:
        """A knowledge-only answer checked against its evidence: kept, replaced by a
        quotation of the evidence sentence, or replaced by the GPT's refusal."""
        from personal_gpt.knowledge import grounding

        text = grounding.tidy_answer(text, passages)
        judged = grounding.judge_answer(message, text, passages, evidence, spec.strictness)
        reply.grounding = {"action": judged.action, "reason": judged.reason, **judged.scores}
        if judged.action == "answer":
            grounding.refine_citations(text, message, reply.citations)
            return text
        if judged.action == "quote" and evidence:
            best = evidence[0]
            reply.citations = [c for c in reply.citations if c.get("n") == best.n] or reply.citations
            return f"The files say: “{best.sentence}” [{best.n}]"
        reply.citations = []
        return refusal

    def regenerate(self, p: Principal, conv_id: str, spec: GptSpec | None = None) -> chat.Reply:
        """Answer the last message again: the old answer is replaced."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._conv(conn, uid, conv_id)
            msgs = self._live_messages(conv_id, repos.list_messages(conn, conv_id), missing="")
        last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
        if last_user is None:
            raise InvalidInput("There is no message to answer again yet.")
        if (last_user.meta or {}).get("unrecorded") and not last_user.content:
            raise InvalidInput("This conversation is not recorded, so its last message is no longer here to "
                               "answer again: type it again.")
        with self.store.tx() as conn:
            repos.delete_messages_from(conn, conv_id, last_user.id)
        return self.send(p, conv_id, last_user.content, spec=spec)

    def _save_when_done(self, conv_id: str, reply: chat.Reply, first: str | None, rest: Iterator[str],
                        privacy=None) -> Iterator[str]:
        """Stream the answer; save it when the stream ends or is stopped, as ``privacy``
        (the GPT's PrivacySettings; None: as is) says: the text, nothing, or redacted."""
        try:
            if first is not None:
                yield first
            yield from rest
        finally:
            rest.close()  # a stop closes us first: let the chat path mark the answer cancelled
            if reply.text or reply.usage.finish_reason:
                with self.store.tx() as conn:
                    reply.message_id = repos.add_message(conn, conv_id, "assistant",
                                                         self._stored_text(privacy, reply.text),
                                                         self._stored_meta(privacy, reply.meta))
                self._remember_unrecorded(privacy, conv_id, reply.message_id, reply.text)
