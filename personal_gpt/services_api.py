"""The API part of the services facade: per-GPT API keys for creators (create, list,
revoke), and the caller's side of a key (authenticate, list models, chat). Mixed
into ``Services``. Keys are shown once and stored as SHA-256; a caller reaches only
the one GPT its key was made for. No HTTP here: ``web/api.py`` speaks OpenAI's shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone

from personal_gpt import chat
from personal_gpt.auth import Principal
from personal_gpt.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from personal_gpt.gpts import GptSpec
from personal_gpt.store import apikeys
from personal_gpt.store import repos

log = logging.getLogger(__name__)

KEY_PREFIX = "pgk_"
_KEY_BYTES = 32  # 256 random bits -> exactly 43 URL-safe characters
_KEY = re.compile(r"^pgk_[A-Za-z0-9_-]{43}$")
API_ISSUER = "api"  # callers' user rows: issuer "api", subject = key id (+ ":" + the request's `user`)
MAX_KEY_NAME = 100
MAX_ACTIVE_KEYS = 50  # per GPT
_END_USER = re.compile(r"^[A-Za-z0-9._@:+=-]{1,64}$")
CHAT_ROLES = ("user", "assistant")
IGNORED_ROLES = ("system", "developer")  # accepted, never sent to the model: the creator's instructions govern
OWNED_BY = "personal-gpts"

NO_KEY = "Send your API key in the Authorization header, as 'Authorization: Bearer pgk_...'."
BAD_KEY = (
    "This API key is not valid. Check that it was copied whole; a key that was revoked stops working — "
    "ask the GPT's creator for a new one."
)
WRONG_GPT = (
    "This API key is for another GPT. Set 'model' to the id of the GPT the key was made for "
    "(GET /v1/models lists it)."
)
NOT_AVAILABLE = "This GPT is not available right now: its creator has not published it. Try again later."
NO_KEY_ID = "There is no API key with that id."


def new_key() -> str:
    """A fresh API key: ``pgk_`` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)


def hash_key(key: str) -> str:
    """What the database keeps instead of the key: SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_key(value: object) -> bool:
    """True only for the exact shape ``new_key`` makes; checked before any look-up."""
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def _bad(message: str, param: str | None = None) -> InvalidInput:
    """InvalidInput naming the request field it is about (the HTTP layer reports ``param``)."""
    exc = InvalidInput(message)
    exc.param = param
    return exc


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ApiKey(apikeys.KeyRow):
    """A key as its creator sees it: never the key itself, only its last characters
    (the stored row's fields; no hash)."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def masked(self) -> str:
        return f"{KEY_PREFIX}…{self.hint}"


@dataclass
class ApiModel:
    """One GPT as ``GET /v1/models`` lists it."""

    id: str
    name: str
    description: str
    created: int
    owned_by: str = OWNED_BY


@dataclass
class ApiTurn:
    """One chat call: the streaming reply (``reply.pieces``), and the conversation it was recorded in."""

    reply: chat.Reply
    conversation_id: str
    gpt_id: str
    created: int


def _view(row: apikeys.KeyRow) -> ApiKey:
    return ApiKey(**dataclasses.asdict(row))


def normalise_key_name(name: str | None) -> str:
    name = " ".join((name or "").split())
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise _bad("A key's name cannot contain control characters.", "name")
    if len(name) > MAX_KEY_NAME:
        raise _bad(f"Keep the key's name under {MAX_KEY_NAME} characters.", "name")
    return name


def _text(value: object, index: int) -> str:
    if not isinstance(value, str):
        raise _bad(f"messages[{index}].content must be text.", "messages")
    return value


class ApiMethods:
    # -- creator side -------------------------------------------------------------

    def create_api_key(self, p: Principal, gpt_id: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key for one of ``p``'s GPTs. Returns the key's record and the key itself —
        the only time it exists outside the caller's hands (the store keeps its SHA-256)."""
        name = normalise_key_name(name)
        uid = self._uid(p)
        key = new_key()
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            if apikeys.count_active_keys(conn, gpt_id) >= MAX_ACTIVE_KEYS:
                raise InvalidInput(
                    f"This GPT already has {MAX_ACTIVE_KEYS} active API keys: revoke some you no longer use first."
                )
            key_id = apikeys.insert_key(conn, gpt_id, name, hash_key(key), key[-4:])
            row = apikeys.get_key(conn, gpt_id, key_id)
        log.info("API key %s created for %s", key_id, gpt_id)
        return _view(row), key

    def list_api_keys(self, p: Principal, gpt_id: str) -> list[ApiKey]:
        """Every key of the GPT (revoked ones too), newest first, with uses and last use."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return [_view(r) for r in apikeys.list_keys(conn, gpt_id)]

    def revoke_api_key(self, p: Principal, key_id: str) -> ApiKey:
        """Stop a key for good (its next call gets 401). Revoking twice keeps the first time."""
        from personal_gpt.services import _check_id

        _check_id(key_id, "API key")
        uid = self._uid(p)
        with self.store.tx() as conn:
            gpt_id = apikeys.key_gpt_id(conn, uid, key_id)
            if gpt_id is None:
                raise NotFound(NO_KEY_ID)
            apikeys.revoke_key(conn, gpt_id, key_id)
            row = apikeys.get_key(conn, gpt_id, key_id)
        log.info("API key %s revoked", key_id)
        return _view(row)

    def api_conversations(self, p: Principal, gpt_id: str, limit: int = 50) -> list[apikeys.ApiConversationRow]:
        """The calls made to one of ``p``'s GPTs through its API keys, newest first."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return apikeys.list_api_conversations(conn, gpt_id, max(1, min(int(limit), 500)))

    def api_conversation_messages(self, p: Principal, gpt_id: str, conv_id: str) -> list[repos.MessageRow]:
        """The turns of one API call to one of ``p``'s GPTs."""
        from personal_gpt.services import _check_id

        _check_id(conv_id, "conversation")
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            if not apikeys.api_conversation_exists(conn, gpt_id, conv_id):
                raise NotFound("There is no conversation with that id.")
            return repos.list_messages(conn, conv_id)

    # -- caller side --------------------------------------------------------------

    def api_caller(self, key: str) -> apikeys.KeyCaller:
        """The live key behind ``key``: malformed keys are refused before any look-up;
        unknown and revoked keys get the same Unauthorized sentence. The look-up is by
        the key's SHA-256 (an indexed equality on a hash, so timing tells nothing of the key)."""
        if not key:
            raise Unauthorized(NO_KEY)
        if not looks_like_key(key):
            raise Unauthorized(BAD_KEY)
        with self.store.read() as conn:
            caller = apikeys.caller_by_hash(conn, hash_key(key))
        if caller is None or caller.key.revoked_at is not None:
            raise Unauthorized(BAD_KEY)
        return caller

    def api_models(self, key: str) -> list[ApiModel]:
        """The GPTs this key may call: its own GPT while it is published, else none."""
        caller = self.api_caller(key)
        if caller.published_version is None:
            return []
        with self.store.read() as conn:
            spec = self._api_spec(conn, caller)
        return [ApiModel(caller.key.gpt_id, spec.name, spec.description, int(caller.gpt_created.timestamp()))]

    def _api_spec(self, conn, caller: apikeys.KeyCaller) -> GptSpec:
        v = repos.get_version(conn, caller.key.gpt_id, int(caller.published_version))
        if v is None:
            raise NotFound(NOT_AVAILABLE)
        return GptSpec.model_validate(v.spec)

    def api_chat(
        self, key: str, model: str, messages: list[dict], *, user: str | None = None, max_tokens: int | None = None,
    ) -> ApiTurn:
        """One OpenAI-style chat call with ``key``: the GPT's published version answers the
        last user message, with the earlier user/assistant messages as the conversation so far.
        ``system``/``developer`` messages are accepted and ignored (the creator's instructions
        govern). The call is recorded as a conversation (source "api") of the caller — the key,
        or the key plus ``user`` — and counted against the GPT's limits.

        Rules a key holder sees: 401 bad key; 403 for any ``model`` other than the key's own
        GPT (whether or not such a GPT exists); 404 when the key's GPT is not published."""
        from personal_gpt.limits import Limits, check_conversation, check_message, check_rate

        caller = self.api_caller(key)
        gpt_id = caller.key.gpt_id
        if not isinstance(model, str) or not model.strip():
            raise _bad("Say which GPT to call: set 'model' to its id (GET /v1/models lists it).", "model")
        if model.strip() != gpt_id:
            raise Forbidden(WRONG_GPT)
        if caller.published_version is None:
            raise NotFound(NOT_AVAILABLE)
        history, message = self._api_turns(messages)
        if user is not None and (not isinstance(user, str) or not _END_USER.fullmatch(user)):
            raise _bad("'user' must be up to 64 letters, digits or . _ @ : + = - characters.", "user")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise _bad("'max_tokens' must be a whole number of at least 1.", "max_tokens")

        subject = caller.key.id + (f":{user}" if user else "")
        with self.store.read() as conn:
            spec = self._api_spec(conn, caller)
            limits = Limits.from_json(self._api_limits_json(conn, gpt_id))
            for turn in history:
                if turn["role"] == "user":
                    check_message(limits, turn["content"])
            message = check_message(limits, message)
            check_conversation(limits, len(history))
            uid = apikeys.find_user(conn, API_ISSUER, subject)
            check_rate(conn, limits, gpt_id, uid if uid is not None else -1, _now())
        if max_tokens is not None and max_tokens < spec.generation.max_new_tokens:
            spec = spec.model_copy(update={"generation": spec.generation.model_copy(update={"max_new_tokens": max_tokens})})

        with self.store.tx() as conn:
            if uid is None:
                uid = repos.ensure_user(conn, API_ISSUER, subject, None, None)
            conv_id = apikeys.insert_api_conversation(conn, gpt_id, uid, caller.key.id, caller.published_version)
        try:
            reply = self._answer(conv_id, gpt_id, history, message, spec, caller.owner_id)
        except BaseException:
            with self.store.tx() as conn:
                apikeys.delete_if_empty(conn, conv_id)
            raise
        if not spec.show_sources:
            reply.citations = []  # file names and passages stay with the creator unless shown (SECURITY #25)
        with self.store.tx() as conn:
            apikeys.count_use(conn, caller.key.id)
        return ApiTurn(reply, conv_id, gpt_id, int(_now().timestamp()))

    @staticmethod
    def _api_turns(messages: object) -> tuple[list[dict], str]:
        """(history, last user message) from OpenAI-style messages whose content is text."""
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list, e.g. [{\"role\": \"user\", \"content\": \"Hello\"}].",
                       "messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _bad(f"messages[{i}] must be an object with 'role' and 'content'.", "messages")
            role = m.get("role")
            if role in IGNORED_ROLES:
                _text(m.get("content"), i)
                continue
            if role not in CHAT_ROLES:
                shown = role if isinstance(role, str) else type(role).__name__
                raise _bad(
                    f"messages[{i}] has the role '{str(shown)[:40]}'; use 'user', 'assistant' or 'system'.", "messages"
                )
            turns.append({"role": role, "content": _text(m.get("content"), i)})
        if not turns or turns[-1]["role"] != "user":
            raise _bad("The last message must be the user's ('role': 'user').", "messages")
        return turns[:-1], turns[-1]["content"]

    def _api_limits_json(self, conn, gpt_id: str) -> dict:
        """The creator's limits for this GPT (the embed settings' ``limits``), {} when none."""
        from personal_gpt.store.embeds import limits_json

        return limits_json(conn, gpt_id)
