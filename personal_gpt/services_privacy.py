"""Services mixin: privacy settings per GPT (retention, do-not-record, redaction), the
retention clean-up (on demand and periodic) and the in-process memory of unrecorded
turns. What a turn stores is decided here (``_stored_*``); the chat path in
``services.py`` only calls these hooks. No Streamlit, no HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from dataclasses import replace

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput
from personal_gpt.redact import redact
from personal_gpt.store import privacy as pstore
from personal_gpt.store import repos
from personal_gpt.store.privacy import PrivacySettings

log = logging.getLogger(__name__)

MIN_RETENTION_DAYS = 1
MAX_RETENTION_DAYS = 3650
CLEANUP_INTERVAL_S = 3600.0
# What a visitor or the creator sees for a turn of an unrecorded conversation whose text is
# no longer in this process's memory (after a restart, or after two idle hours).
NOT_KEPT = "(Not kept: this conversation is not recorded.)"
# Meta kept for an unrecorded answer: timings and token counts, never text-bearing parts.
_TIMING_KEYS = ("model", "prompt_tokens", "completion_tokens", "first_token_s", "total_s", "finish_reason")

__all__ = ["PrivacyMethods", "PrivacySettings", "UnrecordedTexts", "NOT_KEPT"]


class UnrecordedTexts:
    """The text of unrecorded turns, only in this process's memory, so the live
    conversation keeps its history: conversation id -> {message id: text}. Bounded:
    at most ``max_turns`` per conversation (oldest dropped first), ``max_conversations``
    and ``max_chars`` in all (the least recently used conversation goes first), and a
    conversation idle for ``idle_s`` seconds is forgotten. A restart forgets everything."""

    def __init__(self, max_conversations: int = 2000, max_turns: int = 200, max_chars: int = 20_000_000,
                 idle_s: float = 2 * 3600.0, clock=time.monotonic):
        self.max_conversations, self.max_turns, self.max_chars, self.idle_s = (
            max_conversations, max_turns, max_chars, idle_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._convs: OrderedDict[str, tuple[float, OrderedDict[int, str]]] = OrderedDict()
        self._chars = 0

    def _expire(self, now: float) -> None:
        while self._convs:
            conv_id, (touched, turns) = next(iter(self._convs.items()))
            over = (len(self._convs) > self.max_conversations or self._chars > self.max_chars
                    or now - touched > self.idle_s)
            if not over:
                return
            self._convs.pop(conv_id)
            self._chars -= sum(len(t) for t in turns.values())

    def put(self, conv_id: str, message_id: int, text: str) -> None:
        now = self._clock()
        with self._lock:
            _, turns = self._convs.pop(conv_id, (now, OrderedDict()))
            old = turns.pop(message_id, None)
            self._chars -= len(old) if old is not None else 0
            turns[message_id] = text
            self._chars += len(text)
            while len(turns) > self.max_turns:
                _, dropped = turns.popitem(last=False)
                self._chars -= len(dropped)
            self._convs[conv_id] = (now, turns)  # most recently used last
            self._expire(now)

    def get(self, conv_id: str) -> dict[int, str]:
        now = self._clock()
        with self._lock:
            self._expire(now)
            found = self._convs.pop(conv_id, None)
            if found is None:
                return {}
            self._convs[conv_id] = (now, found[1])
            return dict(found[1])

    def drop(self, conv_ids) -> None:
        with self._lock:
            for conv_id in conv_ids:
                found = self._convs.pop(conv_id, None)
                if found is not None:
                    self._chars -= sum(len(t) for t in found[1].values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._convs)


def check_retention(retention_days) -> int | None:
    if retention_days is None:
        return None
    if isinstance(retention_days, bool):
        raise InvalidInput("Say how many days to keep conversations (1 to 3,650), or keep them forever.")
    try:
        days = int(retention_days)
    except (TypeError, ValueError):
        raise InvalidInput("Say how many days to keep conversations (1 to 3,650), or keep them forever.") from None
    if days != retention_days and not (isinstance(retention_days, str) and retention_days.strip() == str(days)):
        raise InvalidInput("Conversations are kept for a whole number of days (1 to 3,650).")
    if not MIN_RETENTION_DAYS <= days <= MAX_RETENTION_DAYS:
        raise InvalidInput(
            f"Conversations can be kept for {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS:,} days (about ten years), "
            f"or forever; {days:,} is outside that."
        )
    return days


class PrivacyMethods:
    # -- creator side -----------------------------------------------------------------

    def privacy_settings(self, p: Principal, gpt_id: str) -> PrivacySettings:
        """The GPT's privacy settings (defaults when never saved: keep forever, record, no redaction)."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return pstore.get_settings(conn, gpt_id)

    def save_privacy_settings(self, p: Principal, gpt_id: str, *, retention_days: int | None = None,
                              record: bool = True, redact: bool = False) -> PrivacySettings:
        """Save all three settings at once. ``retention_days`` None keeps conversations
        forever, else 1..3650 days since a conversation's last message. They apply from
        the next turn on; stored text is never rewritten (use the clean-up to delete)."""
        days = check_retention(retention_days)
        if not isinstance(record, bool) or not isinstance(redact, bool):
            raise InvalidInput("'Record conversations' and 'hide e-mail addresses and phone numbers' are on or off.")
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            pstore.save_settings(conn, gpt_id, retention_days=days, record=record, redact=redact)
        log.info("privacy settings of %s saved (retention %s, record %s, redact %s)", gpt_id, days, record, redact)
        return self.privacy_settings(p, gpt_id)

    def delete_old_conversations(self, p: Principal, gpt_id: str, days: int) -> int:
        """The Privacy tab's "delete conversations older than N days now", for one of
        ``p``'s GPTs: every source's and person's conversation whose last message is older.
        Returns how many were deleted."""
        days = check_retention(days)
        if days is None:
            raise InvalidInput("Say how many days back to keep (1 to 3,650).")
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            conv_ids = pstore.conversations_idle_since(conn, gpt_id, pstore.cutoff(days))
            deleted = pstore.delete_conversations(conn, gpt_id, conv_ids)
        self.unrecorded_texts.drop(conv_ids)
        if deleted:
            pstore.flush_deleted(self.store.engine)
        log.info("%d conversations of %s older than %d days deleted by its creator", deleted, gpt_id, days)
        return deleted

    # -- retention clean-up (every GPT) -----------------------------------------------------

    def cleanup_conversations(self, now: datetime | None = None) -> int:
        """Delete the conversations (messages, feedback) of every GPT whose retention has
        passed, counted from each conversation's last activity. Returns how many went."""
        now = now or datetime.now(timezone.utc)
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        with self.store.read() as conn:
            rules = pstore.retention_rules(conn)
        total = 0
        for gpt_id, days in rules:
            with self.store.tx() as conn:  # one short transaction per GPT
                conv_ids = pstore.conversations_idle_since(conn, gpt_id, pstore.cutoff(days, now))
                total += pstore.delete_conversations(conn, gpt_id, conv_ids)
            self.unrecorded_texts.drop(conv_ids)
        if total:
            pstore.flush_deleted(self.store.engine)
            log.info("retention clean-up: %d conversations deleted", total)
        return total

    def start_privacy_cleanup(self, interval_s: float = CLEANUP_INTERVAL_S) -> bool:
        """Run ``cleanup_conversations`` now and then every ``interval_s`` seconds in a
        daemon thread, until ``stop_privacy_cleanup`` (``close`` calls it). Idempotent:
        False when it already runs."""
        with self._privacy_lock:
            thread = self.__dict__.get("_cleanup_thread")
            if thread is not None and thread.is_alive():
                return False
            stop = threading.Event()
            self.__dict__["_cleanup_stop"] = stop
            thread = threading.Thread(target=self._cleanup_loop, args=(stop, float(interval_s)),
                                      name="personal-gpt-retention", daemon=True)
            self.__dict__["_cleanup_thread"] = thread
            thread.start()
            return True

    def stop_privacy_cleanup(self, timeout: float = 10.0) -> None:
        stop = self.__dict__.get("_cleanup_stop")
        thread = self.__dict__.get("_cleanup_thread")
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _cleanup_loop(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                self.cleanup_conversations()
            except Exception:  # noqa: BLE001 - a failed round must not end the clean-up for good
                log.exception("retention clean-up failed; trying again in %.0f s", interval_s)
            stop.wait(interval_s)

    @property
    def _privacy_lock(self) -> threading.Lock:
        found = self.__dict__.get("_privacy_lock_")
        return found if found is not None else self.__dict__.setdefault("_privacy_lock_", threading.Lock())

    # -- hooks for the chat path ----------------------------------------------------------

    @property
    def unrecorded_texts(self) -> UnrecordedTexts:
        """This process's memory of unrecorded turns (one per Services, made once even under races)."""
        found = self.__dict__.get("_unrecorded_texts")
        return found if found is not None else self.__dict__.setdefault("_unrecorded_texts", UnrecordedTexts())

    def _turn_privacy(self, gpt_id: str) -> PrivacySettings:
        """The settings a turn stores by: one small query."""
        with self.store.read() as conn:
            return pstore.get_settings(conn, gpt_id)

    @staticmethod
    def _stored_text(privacy: PrivacySettings | None, text: str) -> str:
        if privacy is None:
            return text
        if not privacy.record:
            return ""
        return redact(text) if privacy.redact else text

    @staticmethod
    def _stored_meta(privacy: PrivacySettings | None, meta: dict | None) -> dict:
        meta = dict(meta or {})
        if privacy is None or privacy.record:
            return meta
        kept = {k: meta[k] for k in _TIMING_KEYS if k in meta}
        kept["unrecorded"] = True
        return kept

    def _remember_unrecorded(self, privacy: PrivacySettings | None, conv_id: str, message_id: int, text: str) -> None:
        if privacy is not None and not privacy.record:
            self.unrecorded_texts.put(conv_id, message_id, text)

    def _live_messages(self, conv_id: str, rows: list[repos.MessageRow],
                       missing: str | None = NOT_KEPT) -> list[repos.MessageRow]:
        """``rows`` of the person's own conversation with the text of unrecorded turns from
        this process's memory; turns no longer there read ``missing`` (None: left out)."""
        if not any((m.meta or {}).get("unrecorded") for m in rows):
            return rows
        texts = self.unrecorded_texts.get(conv_id)
        out = []
        for m in rows:
            if (m.meta or {}).get("unrecorded"):
                text = texts.get(m.id)
                if text is None:
                    if missing is None:
                        continue
                    text = missing
                m = replace(m, content=text)
            out.append(m)
        return out

    def _history(self, conv_id: str, rows: list[repos.MessageRow]) -> list[dict]:
        """The conversation so far for the model: unrecorded turns from memory, and the
        ones no longer remembered left out (never sent as empty turns)."""
        return [{"role": m.role, "content": m.content} for m in self._live_messages(conv_id, rows, missing=None)]
