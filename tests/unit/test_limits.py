"""Visitor limits (personal_gpt/limits.py): the creator's values, message and
conversation size, and the rate windows counted on the real store (SQLite and
PostgreSQL) from conversations and messages made by the services and the store's
own functions, with timestamps the test sets; then a share-link chat refused with
RateLimited / TooLarge before the model is asked (the echo stand-in at the
ChatModel seam counts the calls) and with nothing saved or counted."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from personal_gpt import limits as L
from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.errors import InvalidInput, RateLimited, TooLarge
from personal_gpt.limits import Limits, check_conversation, check_limits_input, check_message, check_rate
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.store import repos
from personal_gpt.store import sharing as links
from personal_gpt.store.schema import embed_settings, messages, share_links
from tests.support.fake_model import EchoModel, FakeRegistry
from tests.support.pg import fresh_database

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
NOW = datetime(2026, 3, 14, 12, 0, 0, tzinfo=timezone.utc)


# --- the creator's values ------------------------------------------------------------


def test_defaults_and_json_round_trip():
    d = Limits()
    assert (d.per_visitor_minute, d.per_visitor_day, d.per_gpt_day) == (10, 200, 2000)
    assert (d.max_message_chars, d.max_conversation_messages) == (4000, 100)
    custom = Limits(per_visitor_minute=3, per_visitor_day=30, per_gpt_day=300, max_message_chars=500,
                    max_conversation_messages=20)
    assert Limits.from_json(custom.to_json()) == custom
    assert custom.to_json() == {"per_visitor_minute": 3, "per_visitor_day": 30, "per_gpt_day": 300,
                                "max_message_chars": 500, "max_conversation_messages": 20}


@pytest.mark.parametrize("stored, expected", [
    (None, Limits()),
    ({}, Limits()),
    ("not a dict", Limits()),
    ({"per_visitor_minute": 5}, Limits(per_visitor_minute=5)),
    ({"per_visitor_minute": "5", "per_gpt_day": 50.0}, Limits(per_visitor_minute=5, per_gpt_day=50)),
    # each bad value falls back to its own default; the good ones stay
    ({"per_visitor_minute": -1, "per_visitor_day": 7}, Limits(per_visitor_day=7)),
    ({"per_visitor_minute": True, "max_message_chars": 10**9}, Limits()),
    ({"per_visitor_minute": "lots", "max_conversation_messages": 1.5, "extra": 3}, Limits()),
    ({"max_message_chars": 0, "max_conversation_messages": 1}, Limits()),
])
def test_from_json_is_tolerant(stored, expected):
    assert Limits.from_json(stored) == expected


def test_creator_input_accepts_numbers_and_digit_strings():
    got = check_limits_input({"per_visitor_minute": "4", "per_visitor_day": 40, "per_gpt_day": 400.0,
                              "max_message_chars": " 1000 ", "max_conversation_messages": 30})
    assert got == Limits(4, 40, 400, 1000, 30)
    assert check_limits_input({}) == Limits()
    assert check_limits_input({"per_gpt_day": 1}) == Limits(per_gpt_day=1)


@pytest.mark.parametrize("data, says", [
    ({"per_minute": 3}, "Unknown limit: per_minute"),
    ({"per_visitor_minute": "three"}, "Messages per visitor per minute must be a whole number."),
    ({"per_visitor_minute": True}, "must be a whole number"),
    ({"per_visitor_minute": 2.5}, "must be a whole number"),
    ({"per_visitor_minute": None}, "must be a whole number"),
    ({"per_visitor_minute": 0}, "Messages per visitor per minute must be between 1 and 1,000."),
    ({"max_message_chars": 9000}, "Longest message (characters) must be between 20 and 8,000."),
    ({"max_conversation_messages": 1}, "Messages in one conversation must be between 2 and 10,000."),
    ({"per_visitor_minute": 20, "per_visitor_day": 5}, "cannot be fewer than messages per visitor per minute"),
    (["per_visitor_minute", 3], "must be a set of numbers"),
])
def test_creator_input_refused_with_a_sentence(data, says):
    with pytest.raises(InvalidInput) as err:
        check_limits_input(data)
    assert says in str(err.value)
    assert "Traceback" not in str(err.value)


# --- size ------------------------------------------------------------------------------


def test_message_size():
    small = Limits(max_message_chars=20)
    assert check_message(small, "  hello there \n") == "hello there"
    assert check_message(small, "x" * 20) == "x" * 20
    assert check_message(small, "   " + "x" * 20 + "   ") == "x" * 20  # counted after stripping
    with pytest.raises(TooLarge) as err:
        check_message(small, "x" * 21)
    assert err.value.status == 413 and isinstance(err.value, InvalidInput)
    assert str(err.value) == "That message is too long (21 characters); keep it under 20."
    for empty in ("", "   \n\t"):
        with pytest.raises(InvalidInput) as err:
            check_message(small, empty)
        assert not isinstance(err.value, TooLarge) and err.value.status == 400
    with pytest.raises(InvalidInput):
        check_message(small, None)  # type: ignore[arg-type]


def test_conversation_length():
    lim = Limits(max_conversation_messages=10)
    check_conversation(lim, 0)
    check_conversation(lim, 8)  # room for one more question and its answer
    for full in (9, 10, 50):
        with pytest.raises(TooLarge) as err:
            check_conversation(lim, full)
        assert str(err.value) == L.CONVERSATION_FULL


# --- rate, on the real store ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def svc(request, home):
    base = Settings.from_env()
    if request.param == "sqlite":
        s = Services(base, models=FakeRegistry(EchoModel()))
        yield s
        s.close()
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        s = Services(Settings(home=base.home, database_url=url, templates_dir=base.templates_dir,
                              model_cache=base.model_cache), models=FakeRegistry(EchoModel()))
        try:
            yield s
        finally:
            s.close()


def new_gpt(svc, name="Bloom helper"):
    g = svc.create_gpt(ALICE, spec={"name": name, "instructions": "Answer about Bloom & Branch."})
    svc.publish(ALICE, g.id)
    return g.id


def visitor_uid(svc, n: int) -> int:
    with svc.store.tx() as conn:
        return repos.ensure_user(conn, "visitor", f"visitor{n:02d}" + "x" * 20, None, None)


def conversation(svc, gpt_id: str, uid: int, source: str) -> str:
    with svc.store.tx() as conn:
        return repos.insert_conversation(conn, gpt_id, uid, source, 1)


def say(svc, conv_id: str, ago: timedelta, role: str = "user") -> None:
    """A message saved by the store, then dated ``ago`` before NOW."""
    with svc.store.tx() as conn:
        mid = repos.add_message(conn, conv_id, role, f"{role} message {ago}")
        conn.execute(sa.update(messages).where(messages.c.id == mid).values(created_at=NOW - ago))


def refused(svc, lim: Limits, gpt_id: str, uid: int) -> RateLimited:
    with svc.store.read() as conn:
        with pytest.raises(RateLimited) as err:
            check_rate(conn, lim, gpt_id, uid, NOW)
    assert err.value.status == 429
    return err.value


def allowed(svc, lim: Limits, gpt_id: str, uid: int, now: datetime = NOW) -> None:
    with svc.store.read() as conn:
        check_rate(conn, lim, gpt_id, uid, now)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def test_per_minute_window_and_retry_after(svc):
    gpt_id, other_gpt = new_gpt(svc), new_gpt(svc, "Other")
    me, someone = visitor_uid(svc, 1), visitor_uid(svc, 2)
    lim = Limits(per_visitor_minute=3, per_visitor_day=100, per_gpt_day=1000)
    conv = conversation(svc, gpt_id, me, "embed")
    say(svc, conv, s(61))  # outside the minute
    say(svc, conv, s(50))
    say(svc, conv, s(30))
    say(svc, conv, s(29), role="assistant")  # answers are not counted
    say(svc, conversation(svc, other_gpt, me, "embed"), s(5))  # another GPT
    say(svc, conversation(svc, gpt_id, someone, "embed"), s(5))  # another visitor
    allowed(svc, lim, gpt_id, me)  # two in the window
    say(svc, conv, s(10))
    err = refused(svc, lim, gpt_id, me)
    assert str(err) == "You're sending messages quickly — please wait a minute and try again."
    assert err.retry_after == 10  # the message 50 s ago leaves the window in 10 s
    allowed(svc, lim, gpt_id, someone)
    allowed(svc, lim, other_gpt, me)
    allowed(svc, lim, gpt_id, me, now=NOW + s(10.5))  # the oldest has left: one place again


def test_overshoot_waits_for_enough_messages_to_leave(svc):
    """Two sends at once can both pass the check: the wait then lasts until the count is
    under the limit again, not merely until the oldest leaves."""
    gpt_id, me = new_gpt(svc), visitor_uid(svc, 1)
    conv = conversation(svc, gpt_id, me, "share")
    for ago in (50, 40, 20):
        say(svc, conv, s(ago))
    err = refused(svc, Limits(per_visitor_minute=2), gpt_id, me)
    assert err.retry_after == 20  # at +10 two remain (40, 20 s ago): wait for the one 40 s ago


def test_per_visitor_day(svc):
    gpt_id, me = new_gpt(svc), visitor_uid(svc, 1)
    lim = Limits(per_visitor_minute=10, per_visitor_day=4, per_gpt_day=1000)
    first, second = conversation(svc, gpt_id, me, "api"), conversation(svc, gpt_id, me, "api")
    say(svc, first, timedelta(hours=25))  # yesterday: not counted
    say(svc, first, timedelta(hours=23))
    say(svc, first, timedelta(hours=20))
    say(svc, second, timedelta(hours=2))  # every conversation of the visitor counts
    allowed(svc, lim, gpt_id, me)
    say(svc, second, timedelta(minutes=5))
    err = refused(svc, lim, gpt_id, me)
    assert str(err) == "You've reached today's message limit for this chat — please come back tomorrow."
    assert err.retry_after == 3600  # the one 23 h ago leaves the 24 h window in an hour


def test_per_gpt_day_counts_every_visitor_source_but_not_the_creator(svc):
    gpt_id = new_gpt(svc)
    owner = svc._uid(ALICE)
    lim = Limits(per_visitor_minute=10, per_visitor_day=100, per_gpt_day=3)
    for source in ("chat", "preview", "cli"):  # the creator's own chats are not visitor traffic
        say(svc, conversation(svc, gpt_id, owner, source), timedelta(hours=1))
    say(svc, conversation(svc, gpt_id, visitor_uid(svc, 1), "embed"), timedelta(hours=30))  # too old
    say(svc, conversation(svc, gpt_id, visitor_uid(svc, 2), "embed"), timedelta(hours=22))
    say(svc, conversation(svc, gpt_id, visitor_uid(svc, 3), "api"), timedelta(hours=3))
    newcomer = visitor_uid(svc, 4)
    allowed(svc, lim, gpt_id, newcomer)
    say(svc, conversation(svc, gpt_id, visitor_uid(svc, 5), "share"), timedelta(minutes=1))
    err = refused(svc, lim, gpt_id, newcomer)  # someone who never wrote is refused too
    assert str(err) == "This chat has reached today's message limit — please come back tomorrow."
    assert err.retry_after == 2 * 3600
    allowed(svc, Limits(per_gpt_day=4), gpt_id, newcomer)
    allowed(svc, lim, new_gpt(svc, "Other"), newcomer)  # per GPT


def test_the_daily_sentence_wins_and_the_longest_wait_counts(svc):
    gpt_id, me = new_gpt(svc), visitor_uid(svc, 1)
    conv = conversation(svc, gpt_id, me, "embed")
    say(svc, conv, timedelta(hours=10))
    say(svc, conv, s(30))
    err = refused(svc, Limits(per_visitor_minute=1, per_visitor_day=2), gpt_id, me)
    assert str(err) == L.VISITOR_DAY_FULL
    assert err.retry_after == 14 * 3600


def test_stored_limits(svc):
    gpt_id = new_gpt(svc)
    with svc.store.read() as conn:
        assert L.stored_limits(conn, gpt_id) == Limits()  # no embed settings yet
    saved = Limits(per_visitor_minute=2, max_message_chars=50)
    with svc.store.tx() as conn:  # the embed settings' own writer belongs to another module; a row as it would write it
        conn.execute(sa.insert(embed_settings).values(
            gpt_id=gpt_id, allowed_sites=[], allowed_emails=[], allowed_domains=[], theme={},
            limits=saved.to_json(), updated_at=NOW,
        ))
    with svc.store.read() as conn:
        assert L.stored_limits(conn, gpt_id) == saved
        assert L.stored_limits(conn, new_gpt(svc, "Other")) == Limits()


# --- share-link chats --------------------------------------------------------------------


@pytest.fixture
def share(home):
    model = EchoModel()
    svc = Services(models=FakeRegistry(model))
    gpt_id = new_gpt(svc)
    link, _ = svc.create_share_link(ALICE, gpt_id, public=True)
    yield svc, model, gpt_id, link.id
    svc.close()


def set_limits(svc, gpt_id: str, lim: Limits) -> None:
    with svc.store.tx() as conn:
        conn.execute(sa.insert(embed_settings).values(
            gpt_id=gpt_id, allowed_sites=[], allowed_emails=[], allowed_domains=[], theme={},
            limits=lim.to_json(), updated_at=datetime.now(timezone.utc),
        ))


def turn(svc, link_id, visitor, conv_id, message) -> str:
    reply = svc.send_shared(link_id, visitor, conv_id, message)
    return "".join(reply.pieces)


def used(svc, link_id) -> int:
    with svc.store.read() as conn:
        return conn.execute(sa.select(share_links.c.messages_used).where(share_links.c.id == link_id)).scalar()


def test_share_link_chat_is_rate_limited_before_the_model(share):
    svc, model, gpt_id, link_id = share
    set_limits(svc, gpt_id, Limits(per_visitor_minute=2))
    visitor = Visitor(visitor_id="visitor01" + "x" * 20)
    conv = svc.start_shared_conversation(link_id, visitor)
    assert turn(svc, link_id, visitor, conv, "first") == "You said: first"
    assert turn(svc, link_id, visitor, conv, "second") == "You said: second"
    with pytest.raises(RateLimited) as err:
        svc.send_shared(link_id, visitor, conv, "third")
    assert str(err.value) == L.TOO_FAST and 1 <= err.value.retry_after <= 60
    assert len(model.calls) == 2  # the refused message never reached the model
    assert [m.content for m in svc.shared_messages(link_id, visitor, conv)] == [
        "first", "You said: first", "second", "You said: second"]  # and nothing was saved
    assert used(svc, link_id) == 2  # nor counted against the link's quota
    # another visitor of the same link has their own minute
    other = Visitor(visitor_id="visitor02" + "x" * 20)
    assert turn(svc, link_id, other, svc.start_shared_conversation(link_id, other), "hi") == "You said: hi"


def test_share_link_chat_message_and_conversation_size(share):
    svc, model, gpt_id, link_id = share
    set_limits(svc, gpt_id, Limits(max_message_chars=30, max_conversation_messages=4))
    visitor = Visitor(visitor_id="visitor03" + "x" * 20)
    conv = svc.start_shared_conversation(link_id, visitor)
    with pytest.raises(TooLarge):
        svc.send_shared(link_id, visitor, conv, "x" * 31)
    assert model.calls == [] and used(svc, link_id) == 0
    turn(svc, link_id, visitor, conv, "one")
    turn(svc, link_id, visitor, conv, "two")
    with pytest.raises(TooLarge) as err:
        svc.send_shared(link_id, visitor, conv, "three")
    assert str(err.value) == L.CONVERSATION_FULL
    assert len(model.calls) == 2 and used(svc, link_id) == 2
    assert len(svc.shared_messages(link_id, visitor, conv)) == 4
    fresh = svc.start_shared_conversation(link_id, visitor)  # a new chat has room again
    assert turn(svc, link_id, visitor, fresh, "three") == "You said: three"


def test_share_link_without_stored_limits_uses_the_defaults(share):
    svc, model, gpt_id, link_id = share
    visitor = Visitor(visitor_id="visitor04" + "x" * 20)
    conv = svc.start_shared_conversation(link_id, visitor)
    with svc.store.tx() as conn:  # ten messages just now, through the store (the default is 10 a minute)
        for i in range(10):
            repos.add_message(conn, conv, "user", f"m{i}")
    with pytest.raises(RateLimited):
        svc.send_shared(link_id, visitor, conv, "eleventh")
    assert model.calls == []
    with svc.store.read() as conn:
        assert links.get_link(conn, gpt_id, link_id).messages_used == 0


# --- the in-memory limiter for HTTP layers ------------------------------------------------


def test_window_limiter_take():
    from personal_gpt.web.ratelimit import WindowLimiter

    clock = [100.0]
    limiter = WindowLimiter(limit=2, window=60, clock=lambda: clock[0], max_clients=2)
    assert limiter.take("a") is None
    clock[0] = 110.0
    assert limiter.take("a") is None
    clock[0] = 120.0
    assert limiter.take("a") == 40  # the event at 100 leaves at 160
    assert limiter.take("a") == 40  # a refused try does not lengthen the wait
    assert limiter.take("b") is None
    clock[0] = 160.0
    assert limiter.retry_after("a") is None and limiter.take("a") is None
    assert limiter.take("a") == 10  # now 110 and 160 are in the window
    limiter.hit("c")  # a third client: the least recently seen ("b") is forgotten
    limiter.hit("c")
    assert limiter.retry_after("c") == 60 and "b" not in limiter._events
    with pytest.raises(ValueError):
        WindowLimiter(limit=0)
