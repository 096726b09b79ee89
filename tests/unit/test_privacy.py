"""Privacy controls per GPT on the real database, with the echo stand-in at the
ChatModel seam (it repeats what it was given, so tests see what the model saw):
redaction rules, settings validation, retention clean-up (on demand, periodic, CLI),
do-not-record through every source, and redaction of what is stored."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput, NotFound
from personal_gpt.redact import redact
from personal_gpt.services import Services
from personal_gpt.services_privacy import NOT_KEPT, UnrecordedTexts
from personal_gpt.sharing import Visitor
from personal_gpt.store.schema import conversations, feedback, messages
from tests.support.fake_model import EchoModel, FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
SITE = "https://www.bloom.example"


@pytest.fixture
def svc(home):
    s = Services(models=FakeRegistry(EchoModel()))
    yield s
    s.close()


def published(svc, p=ALICE, name="Bloom helper"):
    g = svc.create_gpt(p, spec={"name": name, "instructions": "Be brief.", "starters": ["Hi"]})
    svc.publish(p, g.id)
    return g.id


def visitor(n: int = 1) -> Visitor:
    return Visitor(visitor_id=f"privacyvisitor{n:02d}" + "x" * 16)


def drain(reply) -> str:
    return "".join(reply.pieces)


# --- redact(): a table of what is hidden and what is not -------------------------------

HIDDEN = [
    ("Call +44 20 7946 0958 now", "Call [phone] now"),
    ("(555) 123-4567", "[phone]"),
    ("555-123-4567", "[phone]"),
    ("My mobile is 07700 900123.", "My mobile is [phone]."),
    ("555.123.4567", "[phone]"),
    ("+1 415 555 2671", "[phone]"),
    ("+1-800-555-0199.", "[phone]."),
    ("+33 1 23 45 67 89", "[phone]"),
    ("01 23 45 67 89", "[phone]"),
    ("+44 (0)20 7946 0958", "[phone]"),
    ("tel:+4930123456", "tel:[phone]"),
    ("5551234567", "[phone]"),
    ("07700900123", "[phone]"),
    ("ring 555 1234 please", "ring [phone] please"),
    ("ring 0161 496 0000 or 0161-496-0001", "ring [phone] or [phone]"),
    ("meeting 2026-11-26, call 555 123 4567", "meeting 2026-11-26, call [phone]"),
    ("mail me at jane.doe+shop@example.co.uk!", "mail me at [email]!"),
    ("Élise@exämple.fr wrote", "[email] wrote"),
    ("x@y.io and bob_smith@mail.example.com", "[email] and [email]"),
    ("call 555-123-4567 for 5 pounds", "call [phone] for 5 pounds"),
]

KEPT = [
    "on 2026-11-26 at 10:30", "26.11.2026", "11/26/2026", "10:30:15", "2026-11-26T10:30:00Z", "10.30am",
    "costs $1,234.56", "£12.50", "1 234 567 €", "€ 1 234 567", "Delivery 4.99 pounds", "12,345,678", "3.14159",
    "in 1999", "from 1999-2005", "in 2024 2025 2026", "order 123456", "order #123-456", "order 1234567",
    "v1.2.3", "version 10.2.13", "192.168.1.10", "scores 10 20 30 40", "ref ABC-1234567", "user@localhost",
    "page 12", "call me at noon", "",
]


@pytest.mark.parametrize("text, expected", HIDDEN)
def test_redact_hides_emails_and_phone_numbers(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", KEPT)
def test_redact_keeps_dates_times_prices_years_versions_and_short_numbers(text):
    assert redact(text) == text


# --- settings --------------------------------------------------------------------------


def test_settings_default_save_and_scope(svc):
    gpt_id = published(svc)
    s = svc.privacy_settings(ALICE, gpt_id)
    assert (s.retention_days, s.record, s.redact) == (None, True, False)
    saved = svc.save_privacy_settings(ALICE, gpt_id, retention_days=30, record=False, redact=True)
    assert (saved.retention_days, saved.record, saved.redact) == (30, False, True)
    assert svc.privacy_settings(ALICE, gpt_id) == saved
    back = svc.save_privacy_settings(ALICE, gpt_id)  # defaults again: keep forever, record, no redaction
    assert (back.retention_days, back.record, back.redact) == (None, True, False)
    with pytest.raises(NotFound):
        svc.privacy_settings(BOB, gpt_id)
    with pytest.raises(NotFound):
        svc.save_privacy_settings(BOB, gpt_id, retention_days=1)
    with pytest.raises(NotFound):
        svc.delete_old_conversations(BOB, gpt_id, 1)
    assert svc.privacy_settings(ALICE, gpt_id).retention_days is None


@pytest.mark.parametrize("days, says", [
    (0, "1 to 3,650 days"), (3651, "1 to 3,650 days"), (-5, "1 to 3,650 days"), (2.5, "whole number"),
    ("soon", "how many days"), (True, "how many days"),
])
def test_bad_retention_is_refused_with_a_sentence(svc, days, says):
    gpt_id = published(svc)
    with pytest.raises(InvalidInput, match=says):
        svc.save_privacy_settings(ALICE, gpt_id, retention_days=days)
    assert svc.privacy_settings(ALICE, gpt_id).retention_days is None


def test_record_and_redact_must_be_on_or_off(svc):
    gpt_id = published(svc)
    with pytest.raises(InvalidInput, match="on or off"):
        svc.save_privacy_settings(ALICE, gpt_id, record="no")
    assert svc.save_privacy_settings(ALICE, gpt_id, retention_days=3650).retention_days == 3650


# --- retention clean-up --------------------------------------------------------------


def age(svc, conv_id: str, days: float) -> None:
    when = datetime.now(timezone.utc) - timedelta(days=days)
    with svc.store.tx() as conn:
        conn.execute(sa.update(conversations).where(conversations.c.id == conv_id).values(updated_at=when))


def chat_once(svc, gpt_id: str, text: str, p=ALICE) -> str:
    conv = svc.start_conversation(p, gpt_id)
    drain(svc.send(p, conv, text))
    return conv


def rate(svc, gpt_id: str, conv_id: str) -> None:
    """A thumbs-down on the conversation's answer (SQL: the feedback API is another helper's)."""
    with svc.store.tx() as conn:
        mid = conn.execute(sa.select(messages.c.id).where(messages.c.conversation_id == conv_id,
                                                          messages.c.role == "assistant")).scalar_one()
        now = datetime.now(timezone.utc)
        conn.execute(sa.insert(feedback).values(gpt_id=gpt_id, message_id=mid, rating=-1, comment="meh",
                                                created_at=now, updated_at=now))


def counts(svc, conv_id: str) -> tuple[int, int, int]:
    with svc.store.read() as conn:
        convs = conn.execute(sa.select(sa.func.count()).select_from(conversations)
                             .where(conversations.c.id == conv_id)).scalar()
        msgs = conn.execute(sa.select(sa.func.count()).select_from(messages)
                            .where(messages.c.conversation_id == conv_id)).scalar()
        fb = conn.execute(sa.select(sa.func.count()).select_from(feedback.join(messages))
                          .where(messages.c.conversation_id == conv_id)).scalar()
    return convs, msgs, fb


def test_cleanup_deletes_conversations_past_retention_only(svc):
    short = published(svc, name="Short memory")
    forever = published(svc, name="Long memory")
    svc.save_privacy_settings(ALICE, short, retention_days=30)
    old, new = chat_once(svc, short, "old walrus question"), chat_once(svc, short, "new question")
    kept = chat_once(svc, forever, "ancient question")
    for conv in (old, new, kept):
        rate(svc, short if conv != kept else forever, conv)
    age(svc, old, 31)
    age(svc, new, 29)
    age(svc, kept, 400)
    assert counts(svc, old) == (1, 2, 1)

    assert svc.cleanup_conversations() == 1
    assert counts(svc, old) == (0, 0, 0)  # conversation, messages and feedback gone
    assert "walrus" not in db_bytes(svc)  # not even in the file's free pages or the write-ahead log
    assert counts(svc, new) == (1, 2, 1)
    assert counts(svc, kept) == (1, 2, 1)  # keep forever: untouched however old
    assert svc.cleanup_conversations() == 0
    # a day later than 30 days after the newer one's last activity, it goes too
    assert svc.cleanup_conversations(now=datetime.now(timezone.utc) + timedelta(days=2)) == 1
    assert counts(svc, new) == (0, 0, 0) and counts(svc, kept) == (1, 2, 1)


def test_last_activity_counts_not_the_start(svc):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, retention_days=7)
    conv = chat_once(svc, gpt_id, "first")
    age(svc, conv, 10)
    drain(svc.send(ALICE, conv, "still here"))  # new activity moves updated_at to now
    assert svc.cleanup_conversations() == 0
    assert counts(svc, conv)[1] == 4


def test_the_periodic_cleanup_runs_at_start_and_stops(svc):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, retention_days=1)
    conv = chat_once(svc, gpt_id, "old")
    age(svc, conv, 2)
    assert svc.start_privacy_cleanup(interval_s=0.05)
    assert not svc.start_privacy_cleanup(interval_s=0.05)  # already running
    deadline = time.monotonic() + 10
    while counts(svc, conv)[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counts(svc, conv) == (0, 0, 0)
    second = chat_once(svc, gpt_id, "later")
    age(svc, second, 2)
    deadline = time.monotonic() + 10
    while counts(svc, second)[0] and time.monotonic() < deadline:  # the next round takes it
        time.sleep(0.02)
    assert counts(svc, second) == (0, 0, 0)
    thread = svc.__dict__["_cleanup_thread"]
    svc.stop_privacy_cleanup()
    assert not thread.is_alive()


def test_delete_old_conversations_now(svc):
    gpt_id = published(svc)
    old, new = chat_once(svc, gpt_id, "old"), chat_once(svc, gpt_id, "new")
    age(svc, old, 10)
    assert svc.delete_old_conversations(ALICE, gpt_id, 7) == 1
    assert counts(svc, old)[0] == 0 and counts(svc, new)[0] == 1
    with pytest.raises(InvalidInput):
        svc.delete_old_conversations(ALICE, gpt_id, 0)


def test_cleanup_command(svc, home):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, retention_days=5)
    conv = chat_once(svc, gpt_id, "old")
    age(svc, conv, 6)
    from personal_gpt.cli import main

    result = CliRunner().invoke(main, ["cleanup", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"deleted": 1}
    result = CliRunner().invoke(main, ["cleanup"], catch_exceptions=False)
    assert result.exit_code == 0 and "Deleted 0 conversations" in result.output


# --- do not record -------------------------------------------------------------------

SECRET = "platypus"
TYPED = f"My code word is {SECRET} and my e-mail is zed@example.org"


def db_bytes(svc) -> str:
    found = [f.read_bytes().decode("latin-1") for f in svc.settings.home.glob("*.db*")]
    assert found  # the SQLite file is where the test expects it
    return "\n".join(found)


def stored_text(svc) -> str:
    """Every text-bearing column of messages and conversations, plus the database files' bytes."""
    parts = []
    with svc.store.read() as conn:
        for row in conn.execute(sa.select(messages.c.content, messages.c.meta)).all():
            parts += [row.content, json.dumps(row.meta)]
        for row in conn.execute(sa.select(conversations.c.title, conversations.c.site)).all():
            parts += [row.title, row.site or ""]
    parts.append(db_bytes(svc))
    return "\n".join(parts)


def through(svc, source: str, gpt_id: str, text: str, conv: str | None = None) -> tuple[str, str]:
    """One turn through ``source``: (conversation id, the streamed answer)."""
    if source == "preview":
        conv = conv or svc.start_conversation(ALICE, gpt_id, source="preview")
        return conv, drain(svc.send(ALICE, conv, text))
    if source == "share":
        links = svc.list_share_links(ALICE, gpt_id)
        link_id = links[0].id if links else svc.create_share_link(ALICE, gpt_id, public=True)[0].id
        conv = conv or svc.start_shared_conversation(link_id, visitor())
        return conv, drain(svc.send_shared(link_id, visitor(), conv, text))
    if source == "embed":
        if not svc.embed_settings(ALICE, gpt_id).sites:
            svc.save_embed_settings(ALICE, gpt_id, sites=[SITE], policy="public")
        conv = conv or svc.start_embed_conversation(gpt_id, visitor(2), SITE)
        return conv, drain(svc.send_embed(gpt_id, visitor(2), conv, text))
    assert source == "api"
    _, key = svc.create_api_key(ALICE, gpt_id)
    turn = svc.api_chat(key, gpt_id, [{"role": "user", "content": text}])
    return turn.conversation_id, drain(turn.reply)


def shown(svc, source: str, gpt_id: str, conv: str) -> list[tuple[str, str]]:
    """The conversation as its own person sees it (the creator's chat, the share page, the widget)."""
    if source == "preview":
        rows = svc.messages(ALICE, conv)
    elif source == "share":
        rows = svc.shared_messages(svc.list_share_links(ALICE, gpt_id)[0].id, visitor(), conv)
    else:
        rows = svc.embed_visitor_messages(gpt_id, visitor(2), conv)
    return [(m.role, m.content) for m in rows]


@pytest.mark.parametrize("source", ["preview", "share", "embed", "api"])
def test_unrecorded_turns_leave_no_text_in_the_database(svc, source):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, record=False)
    conv, answer = through(svc, source, gpt_id, TYPED)
    assert SECRET in answer  # the person got their answer as usual
    assert SECRET not in stored_text(svc) and "zed@example.org" not in stored_text(svc)
    with svc.store.read() as conn:
        rows = conn.execute(sa.select(messages).where(messages.c.conversation_id == conv)
                            .order_by(messages.c.id)).all()
        title = conn.execute(sa.select(conversations.c.title).where(conversations.c.id == conv)).scalar()
    assert [r.role for r in rows] == ["user", "assistant"]  # counted for limits and analytics
    assert all(r.content == "" and r.meta["unrecorded"] is True for r in rows)
    timing = rows[1].meta
    assert timing["finish_reason"] == "stop" and timing["completion_tokens"] > 0 and "total_s" in timing
    assert not {"citations", "grounding", "retrieval"} & set(timing)
    assert title == ""


@pytest.mark.parametrize("source", ["preview", "share", "embed"])
def test_the_live_conversation_keeps_its_history_until_a_restart(svc, source):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, record=False)
    conv, _ = through(svc, source, gpt_id, TYPED)
    assert shown(svc, source, gpt_id, conv)[0] == ("user", TYPED)  # the person's page still shows it
    through(svc, source, gpt_id, "And what was my code word?", conv)
    history = svc.models.model.calls[-1]
    assert any(SECRET in m["content"] for m in history[1:-1])  # the model had the earlier turn
    assert [r for r, _ in shown(svc, source, gpt_id, conv)] == ["user", "assistant", "user", "assistant"]

    restarted = Services(models=FakeRegistry(EchoModel()))  # a new process: its memory is empty
    try:
        assert [c for _, c in shown(restarted, source, gpt_id, conv)] == [NOT_KEPT] * 4
        through(restarted, source, gpt_id, "Hello again", conv)
        history = restarted.models.model.calls[-1]
        assert [m["role"] for m in history[1:]] == ["user"]  # forgotten turns are not sent as empty ones
        assert SECRET not in json.dumps(history)
    finally:
        restarted.close()


def test_regenerate_uses_the_remembered_text_and_says_when_it_is_gone(svc):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, record=False)
    conv = svc.start_conversation(ALICE, gpt_id)
    drain(svc.send(ALICE, conv, TYPED))
    again = drain(svc.regenerate(ALICE, conv))
    assert SECRET in again and len(svc.messages(ALICE, conv)) == 2
    svc.unrecorded_texts.drop([conv])  # as after a restart or two idle hours
    with pytest.raises(InvalidInput, match="not recorded"):
        svc.regenerate(ALICE, conv)


def test_switching_recording_back_on_stores_new_turns_only(svc):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, record=False)
    conv = chat_once(svc, gpt_id, TYPED)
    svc.save_privacy_settings(ALICE, gpt_id, record=True)
    drain(svc.send(ALICE, conv, "recorded now"))
    with svc.store.read() as conn:
        contents = [r.content for r in conn.execute(sa.select(messages.c.content).where(
            messages.c.conversation_id == conv).order_by(messages.c.id)).all()]
        title = conn.execute(sa.select(conversations.c.title).where(conversations.c.id == conv)).scalar()
    assert contents[:2] == ["", ""] and contents[2] == "recorded now"
    assert title == "recorded now"
    assert [m.content for m in svc.messages(ALICE, conv)][0] == TYPED  # still remembered in this process


# --- redaction of what is stored ---------------------------------------------------------


@pytest.mark.parametrize("source", ["preview", "share"])
def test_redaction_hides_contacts_in_storage_but_not_from_the_model(svc, source):
    gpt_id = published(svc)
    svc.save_privacy_settings(ALICE, gpt_id, redact=True)
    typed = "Call me on +44 20 7946 0958 or mail ann@example.com about order 123456"
    conv, answer = through(svc, source, gpt_id, typed)
    assert svc.models.model.calls[-1][-1]["content"] == typed  # the model saw the original
    assert "ann@example.com" in answer  # and the person got the answer as it was written
    with svc.store.read() as conn:
        rows = conn.execute(sa.select(messages.c.role, messages.c.content).where(
            messages.c.conversation_id == conv).order_by(messages.c.id)).all()
        title = conn.execute(sa.select(conversations.c.title).where(conversations.c.id == conv)).scalar()
    stored = "Call me on [phone] or mail [email] about order 123456"
    assert rows[0].content == stored and rows[1].content == f"You said: {stored}"
    assert title == stored
    assert "ann@example.com" not in stored_text(svc) and "7946" not in stored_text(svc)
    assert shown(svc, source, gpt_id, conv)[0] == ("user", stored)  # reopened later, the conversation shows what was kept


# --- the in-process memory is bounded ---------------------------------------------------------


def test_unrecorded_memory_is_bounded_and_expires():
    clock = [0.0]
    mem = UnrecordedTexts(max_conversations=2, max_turns=3, max_chars=1000, idle_s=100, clock=lambda: clock[0])
    for i in range(5):
        mem.put("conv_a", i, f"turn {i}")
    assert mem.get("conv_a") == {2: "turn 2", 3: "turn 3", 4: "turn 4"}  # newest turns kept
    mem.put("conv_b", 1, "b")
    mem.get("conv_a")  # a is now the most recently used
    mem.put("conv_c", 1, "c")
    assert mem.get("conv_b") == {} and len(mem) == 2  # least recently used went
    mem.put("conv_d", 1, "x" * 990)
    assert mem.get("conv_d") == {1: "x" * 990} and mem.get("conv_a") == {}  # over the character budget
    clock[0] = 101
    assert mem.get("conv_d") == {} and len(mem) == 0  # idle too long
    mem.put("conv_e", 1, "e")
    mem.drop(["conv_e"])
    assert mem.get("conv_e") == {}
