"""Analytics figures checked against conversations this test makes through the real
Services (echo stand-in at the ChatModel seam, real SQLite): the builder preview, two
share links (anonymous and signed-in visitors), the widget, the API, an evaluation run,
a second GPT, and another creator. Days are spread with SQL updates of created_at;
knowledge figures (meta.retrieval / grounding) and first-token times are written into
the answers' meta the way the chat path records them. Feedback goes through H1's
rate_answer / rate_shared_answer."""

from __future__ import annotations

import csv
import contextlib
import dataclasses
import io
import statistics
from datetime import datetime, time, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa

from personal_gpt import analytics as a
from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.csv_safe import to_csv_bytes
from personal_gpt.errors import InvalidInput, NotFound
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.store.schema import conversations, messages
from tests.support.fake_model import EchoModel, FakeRegistry
from tests.support.pg import fresh_database

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
SITE = "https://www.bloom.example"
TODAY = datetime.now(timezone.utc).date()
SINCE, UNTIL = TODAY - timedelta(days=6), TODAY  # a 7-day window


def anon(n: int) -> Visitor:
    return Visitor(visitor_id=f"visitor{n:02d}" + "x" * 20)


def signed_in(p: Principal) -> Visitor:
    return Visitor(principal=p, signed_in_at=datetime.now(timezone.utc) - timedelta(minutes=1))


class World:
    """What the test made: a ledger of conversations to compute expected figures from."""

    def __init__(self, svc):
        self.svc = svc
        self.convs: list[dict] = []  # id, gpt, day, person, source, where, answers: [(question, answer id)]

    def made(self, conv_id, gpt, days_ago, person, source, where, questions, send):
        answers = []
        for q in questions:
            list(send(conv_id, q))
            with self.svc.store.read() as conn:
                ids = conn.execute(sa.select(messages.c.id).where(messages.c.conversation_id == conv_id)
                                   .order_by(messages.c.id.desc()).limit(1)).scalars().all()
            answers.append((q, ids[0]))
        day = TODAY - timedelta(days=days_ago)
        base = datetime.combine(day, time(10, 0), tzinfo=timezone.utc)
        with self.svc.store.tx() as conn:
            ids = conn.execute(sa.select(messages.c.id).where(messages.c.conversation_id == conv_id)
                               .order_by(messages.c.id)).scalars().all()
            for i, mid in enumerate(ids):
                conn.execute(sa.update(messages).where(messages.c.id == mid)
                             .values(created_at=base + timedelta(seconds=i)))
            conn.execute(sa.update(conversations).where(conversations.c.id == conv_id)
                         .values(created_at=base, updated_at=base))
        entry = {"id": conv_id, "gpt": gpt, "day": day, "person": person, "source": source, "where": where,
                 "answers": answers, "messages": 2 * len(questions)}
        self.convs.append(entry)
        return entry

    def set_meta(self, message_id, **values):
        with self.svc.store.tx() as conn:
            meta = dict(conn.execute(sa.select(messages.c.meta).where(messages.c.id == message_id)).scalar_one())
            meta.update(values)
            conn.execute(sa.update(messages).where(messages.c.id == message_id).values(meta=meta))

    def in_window(self, gpt=None, since=SINCE, until=UNTIL, test=False):
        return [c for c in self.convs if since <= c["day"] <= until and (gpt is None or c["gpt"] == gpt)
                and (test or c["source"] != "test")]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, model_cache):
    """Built once per database for the module (every test only reads)."""
    home = tmp_path_factory.mktemp("analytics-home")
    no_auth = home / "no-sign-in-secrets.toml"
    no_auth.write_text("# sign-in not configured\n", encoding="utf-8")
    mp = pytest.MonkeyPatch()  # what the autouse `home` fixture does, once for the module
    mp.setenv("PERSONAL_GPT_HOME", str(home / "home"))
    mp.setenv("PERSONAL_GPT_MODEL_CACHE", str(model_cache))
    mp.delenv("PERSONAL_GPT_DATABASE_URL", raising=False)
    mp.setenv("PERSONAL_GPT_SECRETS", str(no_auth))
    settings = Settings.from_env()
    databases = contextlib.ExitStack()
    if request.param == "postgresql":
        url = databases.enter_context(fresh_database(request.getfixturevalue("postgres_url")))
        settings = dataclasses.replace(settings, database_url=url)
    svc = Services(settings, models=FakeRegistry(EchoModel()))
    w = World(svc)
    try:
        bloom = svc.create_gpt(ALICE, spec={"name": "Bloom helper", "instructions": "Help Bloom's clients."})
        svc.publish(ALICE, bloom.id)
        garden = svc.create_gpt(ALICE, spec={"name": "Garden helper", "instructions": "Help gardeners."})
        svc.publish(ALICE, garden.id)
        bobs = svc.create_gpt(BOB, spec={"name": "Bob's bot", "instructions": "Help Bob."})
        svc.publish(BOB, bobs.id)
        news, _ = svc.create_share_link(ALICE, bloom.id, label="Newsletter", public=True)
        insta, _ = svc.create_share_link(ALICE, bloom.id, label="Instagram")  # sign-in link
        svc.save_embed_settings(ALICE, bloom.id, sites=SITE, policy="public")
        key_view, key = svc.create_api_key(ALICE, bloom.id, name="Shop backend")
        w.ids = {"bloom": bloom.id, "garden": garden.id, "bobs": bobs.id, "news": news.id, "insta": insta.id}

        def own(p):
            return lambda conv, q: svc.send(p, conv, q).pieces

        def shared(link, v):
            return lambda conv, q: svc.send_shared(link, v, conv, q).pieces

        # 2 days ago: Alice tries the builder preview; visitor 1 asks twice through the newsletter link
        w.prev = w.made(svc.start_conversation(ALICE, bloom.id, "preview"), "bloom", 2, "You", "preview",
                        "Builder preview", ["Do you deliver on Sundays?"], own(ALICE))
        w.news1 = w.made(svc.start_shared_conversation(news.id, anon(1)), "bloom", 2, "v1", "share", "Newsletter",
                         ["=SUM(A1:A9) how much are roses?", "And tulips?"], shared(news.id, anon(1)))
        # yesterday: visitor 2 (not recorded), Bob signed in on the Instagram link, Alice on her other GPT
        w.news2 = w.made(svc.start_shared_conversation(news.id, anon(2)), "bloom", 1, "v2", "share", "Newsletter",
                         ["Call me on 555-0100 about a wedding"], shared(news.id, anon(2)))
        w.insta = w.made(svc.start_shared_conversation(insta.id, signed_in(BOB)), "bloom", 1, "bob", "share",
                         "Instagram", ["Do you sell Tulip bouquets?"], shared(insta.id, signed_in(BOB)))
        w.garden = w.made(svc.start_conversation(ALICE, garden.id, "chat"), "garden", 1, "You", "chat", "Chat page",
                          ["When do I plant bulbs?"], own(ALICE))
        # today: visitor 1 again, now through the widget; the API; an evaluation run; Bob's own GPT
        w.site = w.made(svc.start_embed_conversation(bloom.id, anon(1), SITE), "bloom", 0, "v1", "embed", SITE,
                        ["Opening hours?"], lambda conv, q: svc.send_embed(bloom.id, anon(1), conv, q).pieces)
        api_turn = {}

        def api_send(_conv, q):
            turn = svc.api_chat(key, bloom.id, [{"role": "user", "content": q}])
            api_turn["conv"] = turn.conversation_id
            return turn.reply.pieces

        # the API makes its own conversation: send first, then record it
        list(api_send(None, "-2+3 is my order number"))
        w.api = w.made(api_turn["conv"], "bloom", 0, "api", "api", "Shop backend", [], None)
        with svc.store.read() as conn:
            api_ids = conn.execute(sa.select(messages.c.id).where(messages.c.conversation_id == api_turn["conv"])
                                   .order_by(messages.c.id)).scalars().all()
        w.api["answers"] = [("-2+3 is my order number", api_ids[-1])]
        w.api["messages"] = 2
        w.test = w.made(svc.start_conversation(ALICE, bloom.id, "test"), "bloom", 0, "You", "test", "Evaluation run",
                        ["Evaluation question"], own(ALICE))
        w.bob = w.made(svc.start_conversation(BOB, bobs.id, "chat"), "bobs", 0, "You(bob)", "chat", "Chat page",
                       ["Bob's private question"], own(BOB))
        # 20 days ago (outside the 7-day window, inside a 30-day one): visitor 2 on the newsletter link
        w.old = w.made(svc.start_shared_conversation(news.id, anon(2)), "bloom", 20, "v2", "share", "Newsletter",
                       ["An old question"], shared(news.id, anon(2)))

        # feedback through the real rating paths (H1)
        (q1, a1), (q2, a2) = w.news1["answers"]
        svc.rate_shared_answer(news.id, anon(1), w.news1["id"], a1, -1, '=HYPERLINK("http://x","y") wrong price')
        svc.rate_shared_answer(news.id, anon(1), w.news1["id"], a2, 1)
        svc.rate_shared_answer(insta.id, signed_in(BOB), w.insta["id"], w.insta["answers"][0][1], -1, "Too vague")
        svc.rate_answer(ALICE, w.prev["id"], w.prev["answers"][0][1], 1)
        w.negative = {(q1, a1, '=HYPERLINK("http://x","y") wrong price', w.news1["id"]),
                      (w.insta["answers"][0][0], w.insta["answers"][0][1], "Too vague", w.insta["id"])}

        # what the chat path records for a GPT with knowledge (meta.retrieval, meta.grounding)
        w.set_meta(w.prev["answers"][0][1], retrieval={"passages": 0, "best_evidence": 0.0})
        w.set_meta(a1, retrieval={"passages": 4, "best_evidence": 0.05})
        w.set_meta(a2, retrieval={"passages": 4, "best_evidence": 0.55})
        w.set_meta(w.insta["answers"][0][1], retrieval={"passages": 3, "best_evidence": 0.9},
                   grounding={"action": "refuse", "reason": "the files never mention Tulip"})
        w.set_meta(w.site["answers"][0][1], retrieval={"passages": 2, "best_evidence": a.LOW_EVIDENCE})  # at, not under
        w.unanswered = {w.prev["answers"][0][1], a1, w.insta["answers"][0][1]}

        # first-token seconds, distinct per answer
        w.ttft = {}
        for i, c in enumerate(w.convs):
            for j, (_q, mid) in enumerate(c["answers"]):
                value = round(0.25 + 0.5 * i + 0.125 * j, 3)
                w.set_meta(mid, first_token_s=value)
                w.ttft[mid] = value

        # "do not record" (H4's mode): the turns are stored without text
        with svc.store.tx() as conn:
            for mid in conn.execute(sa.select(messages.c.id)
                                    .where(messages.c.conversation_id == w.news2["id"])).scalars().all():
                meta = dict(conn.execute(sa.select(messages.c.meta).where(messages.c.id == mid)).scalar_one())
                meta.update(unrecorded=True)
                meta.pop("citations", None)
                conn.execute(sa.update(messages).where(messages.c.id == mid).values(content="", meta=meta))
        yield w
    finally:
        svc.close()
        mp.undo()
        databases.close()


@pytest.fixture
def svc(world):
    return world.svc


def expected_per_day(convs, since=SINCE, until=UNTIL):
    out = {}
    day = since
    while day <= until:
        todays = [c for c in convs if c["day"] == day]
        out[day] = (len(todays), sum(c["messages"] for c in todays), len({c["person"] for c in todays}))
        day += timedelta(days=1)
    return out


def test_one_gpt_per_day_counts_fill_missing_days(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    got = {row.day.date(): (row.conversations, row.messages, row.people) for row in report.per_day.itertuples()}
    assert got == expected_per_day(world.in_window("bloom"))
    assert len(got) == 7 and got[SINCE] == (0, 0, 0)


def test_totals_and_unique_people(svc, world):
    convs = world.in_window("bloom")
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    t = report.totals
    assert t["conversations"] == len(convs) == 6
    assert t["messages"] == sum(c["messages"] for c in convs) == 14
    # visitor 1 used a link and the widget: one person; "You", v1, v2, Bob, the API caller
    assert t["people"] == len({c["person"] for c in convs}) == 5
    assert (t["thumbs_up"], t["thumbs_down"]) == (2, 2)
    people = set(report.messages["person"])
    assert "bob@example.com" in people and "You" in people and "API caller" in people
    assert not any("visitor01" in p for p in people)  # anonymous ids are never shown, only a short hash


def test_busiest_links_sites_and_keys(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    convs = world.in_window("bloom")

    def expected(source):
        rows = {}
        for c in convs:
            if c["source"] == source:
                r = rows.setdefault(c["where"], [0, 0, set()])
                r[0] += 1
                r[1] += c["messages"]
                r[2].add(c["person"])
        return {k: (v[0], v[1], len(v[2])) for k, v in rows.items()}

    links = {r.where: (r.conversations, r.messages, r.people) for r in report.links.itertuples()}
    assert links == expected("share") == {"Newsletter": (2, 6, 2), "Instagram": (1, 2, 1)}
    assert report.links.iloc[0]["where"] == "Newsletter"  # busiest first
    assert {r.where: (r.conversations, r.messages, r.people) for r in report.sites.itertuples()} == expected("embed")
    assert list(report.api_keys["where"]) == ["Shop backend"]


def test_negative_feedback_rows(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    rows = {(r.question, r.message_id, r.comment, r.conversation_id) for r in report.negative_feedback.itertuples()}
    assert rows == world.negative
    for r in report.negative_feedback.itertuples():
        assert r.answer == f"You said: {r.question}"  # the echo model's answer to that question
        assert r.when is not None


def test_unanswered_questions_from_retrieval_and_grounding(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    assert set(report.unanswered["message_id"]) == world.unanswered
    why = dict(zip(report.unanswered["message_id"], report.unanswered["why"]))
    assert why[world.prev["answers"][0][1]] == "No passage found"
    assert why[world.news1["answers"][0][1]].startswith("Weak match")
    assert why[world.insta["answers"][0][1]] == "Refused: the files never mention Tulip"
    assert report.totals["unanswered"] == len(world.unanswered)


def test_low_evidence_threshold_is_the_strict_grounding_floor():
    from personal_gpt.knowledge.grounding import THRESHOLDS

    assert a.LOW_EVIDENCE == THRESHOLDS["strict"].relevance == max(t.relevance for t in THRESHOLDS.values())


def test_time_to_first_token_per_day(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    by_day = {}
    for c in world.in_window("bloom"):
        for _q, mid in c["answers"]:
            by_day.setdefault(c["day"], []).append(world.ttft[mid])
    got = {r.day.date(): (r.answers, r.median_s, r.p90_s) for r in report.first_token.itertuples()}
    assert set(got) == set(by_day)
    for day, values in by_day.items():
        n, median, p90 = got[day]
        assert n == len(values)
        assert median == pytest.approx(statistics.median(values))
        assert p90 == pytest.approx(float(np.percentile(values, 90)))
    everything = [v for vs in by_day.values() for v in vs]
    assert report.totals["median_first_token_s"] == pytest.approx(statistics.median(everything))


def test_unrecorded_turns_count_but_show_no_text(svc, world):
    report = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    mine = report.messages[report.messages["conversation_id"] == world.news2["id"]]
    assert len(mine) == 2 and set(mine["text"]) == {a.NOT_RECORDED}
    table = svc.conversations_table(ALICE, world.ids["bloom"], SINCE, UNTIL)
    data = to_csv_bytes(table).decode("utf-8-sig")
    assert "555-0100" not in data and a.NOT_RECORDED in data


def test_evaluation_runs_are_left_out_unless_asked(svc, world):
    plain = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL)
    with_test = svc.analytics(ALICE, world.ids["bloom"], SINCE, UNTIL, include_test=True)
    assert world.test["id"] not in set(plain.messages["conversation_id"])
    assert with_test.totals["conversations"] == plain.totals["conversations"] + 1
    assert with_test.totals["messages"] == plain.totals["messages"] + world.test["messages"]


def test_window_bounds(svc, world):
    wide = svc.analytics(ALICE, world.ids["bloom"], TODAY - timedelta(days=29), TODAY)
    assert len(wide.per_day) == 30
    assert wide.totals["conversations"] == len(world.in_window("bloom", since=TODAY - timedelta(days=29)))
    assert world.old["id"] in set(wide.messages["conversation_id"])
    default = svc.analytics(ALICE, world.ids["bloom"])  # the last 30 days up to today
    assert (default.since, default.until) == (TODAY - timedelta(days=29), TODAY)
    with pytest.raises(InvalidInput):
        svc.analytics(ALICE, world.ids["bloom"], TODAY, TODAY - timedelta(days=1))


def test_all_gpts_with_a_breakdown(svc, world):
    report = svc.analytics(ALICE, None, SINCE, UNTIL)
    convs = [c for c in world.in_window() if c["gpt"] in ("bloom", "garden")]
    assert report.totals["conversations"] == len(convs) == 7
    assert report.totals["messages"] == sum(c["messages"] for c in convs)
    assert report.totals["people"] == len({c["person"] for c in convs}) == 5  # Alice counted once over both GPTs
    by_gpt = {r.gpt: (r.conversations, r.messages) for r in report.per_gpt.itertuples()}
    assert by_gpt == {
        "Bloom helper": (len(world.in_window("bloom")), sum(c["messages"] for c in world.in_window("bloom"))),
        "Garden helper": (1, 2),
    }
    got = {r.day.date(): (r.conversations, r.messages, r.people) for r in report.per_day.itertuples()}
    assert got == expected_per_day(convs)


def test_owner_scoping(svc, world):
    # Bob chatted on Alice's Instagram link as a visitor: that conversation is Alice's to analyse, not Bob's
    bob = svc.analytics(BOB, None, SINCE, UNTIL)
    assert set(bob.messages["conversation_id"]) == {world.bob["id"]}
    assert (bob.totals["conversations"], bob.totals["messages"], bob.totals["people"]) == (1, 2, 1)
    assert list(bob.per_gpt["gpt"]) == ["Bob's bot"]
    table = svc.conversations_table(BOB, None, SINCE, UNTIL)
    assert set(table["conversation_id"]) == {world.bob["id"]}
    for gpt in ("bloom", "garden"):
        with pytest.raises(NotFound):
            svc.analytics(BOB, world.ids[gpt])
        with pytest.raises(NotFound):
            svc.conversations_table(BOB, world.ids[gpt])
    alice = svc.analytics(ALICE, None, SINCE, UNTIL)
    assert world.bob["id"] not in set(alice.messages["conversation_id"])


def test_conversations_csv_one_row_per_message(svc, world):
    table = svc.conversations_table(ALICE, world.ids["bloom"], SINCE, UNTIL)
    convs = world.in_window("bloom")
    assert len(table) == sum(c["messages"] for c in convs)
    assert list(table.columns) == ["conversation_id", "gpt", "source", "where", "person", "role", "text", "when",
                                   "rating"]
    rows = list(csv.DictReader(io.StringIO(to_csv_bytes(table).decode("utf-8-sig"), newline="")))
    assert len(rows) == len(table)
    q1 = world.news1["answers"][0][0]
    asked = [r for r in rows if r["conversation_id"] == world.news1["id"] and r["role"] == "user"]
    assert asked[0]["text"] == "'" + q1  # formula neutralised
    assert [r["where"] for r in asked] == ["Newsletter", "Newsletter"]
    ratings = {r["text"]: r["rating"] for r in rows if r["conversation_id"] == world.news1["id"]
               and r["role"] == "assistant"}
    assert ratings == {"You said: " + q1: "-1", "You said: And tulips?": "1"}
    api_rows = [r for r in rows if r["conversation_id"] == world.api["id"]]
    assert api_rows[0]["text"] == "'-2+3 is my order number" and api_rows[0]["where"] == "Shop backend"
    for r in rows:
        for cell in r.values():
            assert not cell or cell[0] not in "=+-@\t\r" or cell.lstrip("-").isdigit()


def test_pure_functions_on_no_data():
    convs, msgs = a.conversations_frame([]), a.messages_frame([])
    daily = a.per_day(convs, msgs, SINCE, UNTIL)
    assert len(daily) == 7 and daily[["conversations", "messages", "people"]].to_numpy().sum() == 0
    t = a.totals(convs, msgs)
    assert t["conversations"] == t["messages"] == t["people"] == 0 and t["median_first_token_s"] is None
    assert a.first_token_per_day(msgs).empty and a.negative_feedback(msgs).empty and a.unanswered(msgs).empty
    assert a.busiest(convs, msgs, "share").empty and a.conversations_export(msgs).empty
    assert list(a.per_gpt(convs, msgs, [("gpt_1", "Quiet")])["conversations"]) == [0]
