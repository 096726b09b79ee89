"""The creator's conversations (every source, filters, owner scoping), feedback on answers
(creator, share-link visitor, widget visitor) and "fix this answer" — through the services,
on the real database, with the echo stand-in at the ChatModel seam; the knowledge fix runs
the real ingestion and the real embedder, so the next retrieval really finds the answer."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput, NotFound
from personal_gpt.services import Services
from personal_gpt.services_conversations import ANONYMOUS, YOU
from personal_gpt.sharing import NOT_AVAILABLE, Visitor
from personal_gpt.store import repos
from personal_gpt.store.schema import conversations, corrections, feedback
from tests.support.fake_model import FakeRegistry
from tests.support.pg import fresh_database

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
CAROL = Principal(issuer="https://idp.example", subject="carol", email="Carol@Example.com", email_verified=True)
SITE = "https://www.bloom.example"


@pytest.fixture
def svc(home):
    s = Services(models=FakeRegistry())
    yield s
    s.close()


def anon(n: int = 1) -> Visitor:
    return Visitor(visitor_id=f"anonymous-browser-{n:04d}")


def signed(p: Principal) -> Visitor:
    return Visitor(principal=p, signed_in_at=datetime.now(timezone.utc))


def answered(reply) -> None:
    list(reply.pieces)


@pytest.fixture
def world(svc):
    """Alice's published GPT with one conversation from every kind of place."""
    gpt = svc.create_gpt(ALICE, spec={"name": "Bloom helper", "instructions": "Help with flowers."})
    svc.publish(ALICE, gpt.id)
    ids = {"gpt": gpt.id}
    ids["preview"] = svc.start_conversation(ALICE, gpt.id, source="preview")
    answered(svc.send(ALICE, ids["preview"], "Preview: is the Sunrise bouquet 100% roses?", spec=gpt.spec))
    ids["chat"] = svc.start_conversation(ALICE, gpt.id)
    answered(svc.send(ALICE, ids["chat"], "Chat: opening hours"))
    answered(svc.send(ALICE, ids["chat"], "Chat: and on Sundays?"))
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True, label="Newsletter")
    ids["link"] = link.id
    ids["share_anon"] = svc.start_shared_conversation(link.id, anon(1))
    answered(svc.send_shared(link.id, anon(1), ids["share_anon"], "Anon: delivery_fee to Leeds?"))
    ids["share_carol"] = svc.start_shared_conversation(link.id, signed(CAROL))
    answered(svc.send_shared(link.id, signed(CAROL), ids["share_carol"], "Carol: do you sell TULIPS?"))
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    ids["embed"] = svc.start_embed_conversation(gpt.id, anon(2), SITE)
    answered(svc.send_embed(gpt.id, anon(2), ids["embed"], "Widget: wedding flowers"))
    key, secret = svc.create_api_key(ALICE, gpt.id, name="Shop backend")
    ids["key"] = key.id
    turn = svc.api_chat(secret, gpt.id, [{"role": "user", "content": "API: price of the Meadow bouquet"}])
    answered(turn.reply)
    ids["api"] = turn.conversation_id
    return ids


def listed(svc, gpt_id, **filters) -> set[str]:
    return {c.id for c in svc.creator_conversations(ALICE, gpt_id, **filters)}


def test_every_source_is_listed_with_where_it_came_from(svc, world):
    rows = {c.id: c for c in svc.creator_conversations(ALICE, world["gpt"])}
    assert set(rows) == {world[k] for k in ("preview", "chat", "share_anon", "share_carol", "embed", "api")}
    assert rows[world["chat"]].messages == 4 and rows[world["preview"]].messages == 2
    assert rows[world["chat"]].person == "You" and rows[world["chat"]].source == "chat"
    assert rows[world["share_anon"]].link_label == "Newsletter" and rows[world["share_anon"]].person == ANONYMOUS
    assert rows[world["share_carol"]].person == "carol@example.com"
    assert rows[world["embed"]].site == SITE and rows[world["embed"]].source == "embed"
    assert rows[world["api"]].key_name == "Shop backend" and rows[world["api"]].api_key_id == world["key"]
    choices = svc.conversation_filters(ALICE, world["gpt"])
    assert choices.links == [(world["link"], "Newsletter")] and choices.sites == [SITE]
    assert choices.keys == [(world["key"], "Shop backend")] and choices.people == ["carol@example.com"]


def test_filters(svc, world):
    g = world["gpt"]
    assert listed(svc, g, source="share") == {world["share_anon"], world["share_carol"]}
    assert listed(svc, g, link_id=world["link"]) == {world["share_anon"], world["share_carol"]}
    assert listed(svc, g, site=SITE) == {world["embed"]}
    assert listed(svc, g, key_id=world["key"]) == {world["api"]}
    assert listed(svc, g, person="CAROL@example.com") == {world["share_carol"]}
    assert listed(svc, g, person=ANONYMOUS) == {world["share_anon"], world["embed"]}
    assert listed(svc, g, person=YOU) == {world["preview"], world["chat"]}
    assert listed(svc, g, source="share", person=ANONYMOUS) == {world["share_anon"]}
    with pytest.raises(InvalidInput, match="Unknown source"):
        svc.creator_conversations(ALICE, g, source="email")
    with pytest.raises(NotFound):
        svc.creator_conversations(ALICE, g, link_id="../etc")


def test_text_search_is_case_insensitive_and_takes_wildcards_literally(svc, world):
    g = world["gpt"]
    assert listed(svc, g, text="tulips") == {world["share_carol"]}  # typed "TULIPS"
    assert listed(svc, g, text="SUNDAYS") == {world["chat"]}
    assert listed(svc, g, text="you said: chat") == {world["chat"]}  # answers are searched too
    assert listed(svc, g, text="100%") == {world["preview"]}
    assert listed(svc, g, text="%") == {world["preview"]}  # only the message with a real "%"
    assert listed(svc, g, text="delivery_fee") == {world["share_anon"]}
    assert listed(svc, g, text="y_fee") == {world["share_anon"]}
    assert listed(svc, g, text="_") == {world["share_anon"]}  # not "any one character"
    assert listed(svc, g, text="nothing like this") == set()


def test_date_range(svc, world):
    g = world["gpt"]
    old = datetime.now(timezone.utc) - timedelta(days=10)
    with svc.store.tx() as conn:
        conn.execute(sa.update(conversations).where(conversations.c.id == world["api"]).values(created_at=old))
    today = date.today()
    ten_days_ago = old.astimezone().date()
    assert world["api"] not in listed(svc, g, since=today - timedelta(days=1))
    assert listed(svc, g, until=today - timedelta(days=5)) == {world["api"]}
    assert listed(svc, g, since=ten_days_ago, until=ten_days_ago) == {world["api"]}  # "until" takes in its day
    assert len(listed(svc, g, since=today, until=today)) == 5
    with pytest.raises(InvalidInput, match="start date is after the end date"):
        svc.creator_conversations(ALICE, g, since=today, until=today - timedelta(days=1))


def test_reading_one_with_citations_feedback_and_unrecorded_turns(svc, world):
    detail = svc.creator_conversation(ALICE, world["share_carol"])
    assert [t.role for t in detail.turns] == ["user", "assistant"]
    assert detail.turns[0].content == "Carol: do you sell TULIPS?" and detail.turns[1].rating is None
    answer = detail.turns[1].id
    svc.rate_shared_answer(world["link"], signed(CAROL), world["share_carol"], answer, -1, "  Wrong shop.  ")
    again = svc.creator_conversation(ALICE, world["share_carol"]).turns[1]
    assert (again.rating, again.comment) == (-1, "Wrong shop.")
    row = next(c for c in svc.creator_conversations(ALICE, world["gpt"]) if c.id == world["share_carol"])
    assert (row.thumbs_up, row.thumbs_down) == (0, 1)
    # a turn kept without its text (privacy: do not record) shows as not recorded
    with svc.store.tx() as conn:
        repos.add_message(conn, world["embed"], "user", "", {"unrecorded": True})
        repos.add_message(conn, world["embed"], "assistant", "", {"unrecorded": True, "citations": [{"n": 1}]})
    turns = svc.creator_conversation(ALICE, world["embed"]).turns
    assert [t.recorded for t in turns] == [True, True, False, False]
    assert turns[-1].content == "" and turns[-1].citations == []
    with pytest.raises(InvalidInput, match="not recorded"):
        svc.fix_answer(ALICE, turns[-1].id, "The right answer.", "finetune")


def test_bob_reaches_none_of_alices_conversations_even_his_own_visit(svc, world):
    """Bob chats on Alice's link (so he is that conversation's user): as a creator he still
    cannot list, read, rate or fix it, and his own GPT's list stays his."""
    mine = svc.create_gpt(BOB, spec={"name": "Bob's", "instructions": "x"})
    visit = svc.start_shared_conversation(world["link"], signed(BOB))
    answered(svc.send_shared(world["link"], signed(BOB), visit, "Bob visiting"))
    answer = svc.shared_messages(world["link"], signed(BOB), visit)[-1].id
    assert svc.creator_conversations(BOB, mine.id) == []
    for call in (
        lambda: svc.creator_conversations(BOB, world["gpt"]),
        lambda: svc.creator_conversation(BOB, visit),
        lambda: svc.rate_answer(BOB, visit, answer, 1),  # only through the link
        lambda: svc.answer_feedback(BOB, visit),
        lambda: svc.fix_answer(BOB, answer, "stolen", "finetune"),
        lambda: svc.list_corrections(BOB, world["gpt"]),
    ):
        with pytest.raises(NotFound):
            call()
    assert svc.rate_shared_answer(world["link"], signed(BOB), visit, answer, 1).rating == 1  # his own, via the link
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(corrections)).scalar_one() == 0


def test_creator_rates_own_chat_and_rating_again_replaces(svc, world):
    answer = svc.messages(ALICE, world["chat"])[-1].id
    svc.rate_answer(ALICE, world["chat"], answer, 1)
    svc.rate_answer(ALICE, world["chat"], answer, -1, "Too vague")
    assert {k: (v.rating, v.comment) for k, v in svc.answer_feedback(ALICE, world["chat"]).items()} == {
        answer: (-1, "Too vague")}
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one() == 1


@pytest.mark.parametrize("rating, comment, message, error", [
    (0, "", "answer", InvalidInput), (2, "", "answer", InvalidInput), (True, "", "answer", InvalidInput),
    ("1", "", "answer", InvalidInput), (1, "x" * 1001, "answer", InvalidInput), (1, 5, "answer", InvalidInput),
    (1, "", "question", NotFound), (1, "", "elsewhere", NotFound), (1, "", -3, NotFound), (1, "", "7", NotFound),
])
def test_bad_ratings_are_refused_and_write_nothing(svc, world, rating, comment, message, error):
    msgs = svc.messages(ALICE, world["chat"])
    ids = {"answer": msgs[-1].id, "question": msgs[-2].id,
           "elsewhere": svc.messages(ALICE, world["preview"])[-1].id}
    with pytest.raises(error) as caught:
        svc.rate_answer(ALICE, world["chat"], ids.get(message, message), rating, comment)
    assert str(caught.value) and "Traceback" not in str(caught.value)
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one() == 0


def test_visitors_rate_only_their_own_conversation_and_only_while_the_link_is_open(svc, world):
    link, conv = world["link"], world["share_anon"]
    answer = svc.shared_messages(link, anon(1), conv)[-1].id
    with pytest.raises(NotFound):  # another browser
        svc.rate_shared_answer(link, anon(9), conv, answer, 1)
    with pytest.raises(NotFound):  # the widget conversation is not on this link
        svc.rate_shared_answer(link, anon(2), world["embed"], svc.embed_visitor_messages(
            world["gpt"], anon(2), world["embed"])[-1].id, 1)
    assert svc.rate_shared_answer(link, anon(1), conv, answer, 1, "thanks").comment == "thanks"
    assert svc.shared_answer_feedback(link, anon(1), conv)[answer].rating == 1
    svc.revoke_share_link(ALICE, link)
    with pytest.raises(NotFound, match=NOT_AVAILABLE) as sending:
        svc.send_shared(link, anon(1), conv, "still there?")
    with pytest.raises(NotFound, match=NOT_AVAILABLE) as rating:
        svc.rate_shared_answer(link, anon(1), conv, answer, -1)
    assert str(rating.value) == str(sending.value)
    # the widget: the visitor's own conversation only
    embed_answer = svc.embed_visitor_messages(world["gpt"], anon(2), world["embed"])[-1].id
    with pytest.raises(NotFound):
        svc.rate_embed_answer(world["gpt"], anon(3), world["embed"], embed_answer, 1)
    assert svc.rate_embed_answer(world["gpt"], anon(2), world["embed"], embed_answer, -1).rating == -1
    assert svc.embed_answer_feedback(world["gpt"], anon(2), world["embed"])[embed_answer].rating == -1
    svc.save_embed_settings(ALICE, world["gpt"], sites=[])  # the widget turned off
    with pytest.raises(NotFound):
        svc.rate_embed_answer(world["gpt"], anon(2), world["embed"], embed_answer, 1)
    ratings = {t.id: t.rating for t in svc.creator_conversation(ALICE, conv).turns}
    assert ratings[answer] == 1  # the refused rating changed nothing


PRICES = b"""# Bloom & Branch price list

## Delivery
Delivery in Leeds costs 4.99 pounds and is free for orders over 50 pounds.

## Bouquets
The Sunrise bouquet costs 35 pounds. The Meadow bouquet costs 42 pounds.
"""


def test_fix_into_knowledge_is_found_by_the_next_retrieval(svc):
    gpt = svc.create_gpt(ALICE, spec={"name": "Shop", "instructions": "Answer from the files."})
    svc.add_knowledge(ALICE, gpt.id, [("prices.md", PRICES)], run_jobs=False)
    svc.jobs.run_until_idle()
    svc.publish(ALICE, gpt.id)
    conv = svc.start_conversation(ALICE, gpt.id)
    question = "Can I pay for my bouquet with a gift voucher?"
    answered(svc.send(ALICE, conv, question))
    wrong = svc.messages(ALICE, conv)[-1]
    assert all("Corrected answer" not in c["file"] for c in wrong.meta.get("citations", []))

    right = "Yes: Bloom & Branch gift vouchers are accepted for every bouquet, in the shop and online."
    fix = svc.fix_answer(ALICE, wrong.id, right, "knowledge", run_jobs=False)
    assert fix.target == "knowledge" and fix.question == question and fix.knowledge_file_id
    assert fix.knowledge_file_name.startswith("Corrected answer – Can I pay for my bouquet") \
        and fix.knowledge_file_name.endswith(".md")
    svc.jobs.run_until_idle()
    files = {f.id: f for f in svc.list_knowledge(ALICE, gpt.id)}
    assert files[fix.knowledge_file_id].status == "ready"
    hits = svc.search_knowledge(ALICE, gpt.id, "Do you take gift vouchers?", k=3)
    assert hits[0].file == fix.knowledge_file_name and "gift vouchers are accepted" in hits[0].text

    again = svc.start_conversation(ALICE, gpt.id)
    answered(svc.send(ALICE, again, "Do you accept gift vouchers for bouquets?"))
    cited = svc.messages(ALICE, again)[-1].meta["citations"]
    assert cited[0]["file"] == fix.knowledge_file_name
    assert "<knowledge>" in svc.models.model.calls[-1][0]["content"] \
        and "gift vouchers are accepted" in svc.models.model.calls[-1][0]["content"]
    assert [c.id for c in svc.list_corrections(ALICE, gpt.id, target="knowledge")] == [fix.id]

    svc.delete_correction(ALICE, fix.id)  # takes its knowledge file with it
    assert svc.list_corrections(ALICE, gpt.id) == []
    assert fix.knowledge_file_id not in {f.id for f in svc.list_knowledge(ALICE, gpt.id)}
    assert all(h.file != fix.knowledge_file_name for h in svc.search_knowledge(ALICE, gpt.id, "gift vouchers", k=5))


def test_fix_into_finetune_data_and_bad_fixes(svc, world):
    answer = svc.messages(ALICE, world["chat"])[-1].id
    with pytest.raises(InvalidInput, match="Choose where"):
        svc.fix_answer(ALICE, answer, "Open 9 to 5.", "email")
    with pytest.raises(InvalidInput, match="Write the right answer"):
        svc.fix_answer(ALICE, answer, "   ", "finetune")
    with pytest.raises(InvalidInput, match="under 8,000"):
        svc.fix_answer(ALICE, answer, "x" * 8001, "finetune")
    with pytest.raises(NotFound):  # a question is not an answer
        svc.fix_answer(ALICE, svc.messages(ALICE, world["chat"])[-2].id, "Open 9 to 5.", "finetune")
    assert svc.list_corrections(ALICE, world["gpt"]) == []

    # any conversation of Alice's GPT can be fixed, a visitor's included
    visitor_answer = svc.creator_conversation(ALICE, world["share_carol"]).turns[-1].id
    fix = svc.fix_answer(ALICE, visitor_answer, "Yes, tulips from March to May.", "finetune")
    assert (fix.question, fix.answer, fix.knowledge_file_id) == ("Carol: do you sell TULIPS?",
                                                                 "Yes, tulips from March to May.", None)
    assert [c.id for c in svc.list_corrections(ALICE, world["gpt"], target="finetune")] == [fix.id]
    assert svc.list_corrections(ALICE, world["gpt"], target="knowledge") == []
    assert svc.list_knowledge(ALICE, world["gpt"]) == []
    with pytest.raises(NotFound):
        svc.delete_correction(BOB, fix.id)
    svc.delete_correction(ALICE, fix.id)
    assert svc.list_corrections(ALICE, world["gpt"]) == []
    with pytest.raises(NotFound):
        svc.delete_correction(ALICE, fix.id)


def test_queries_feedback_and_corrections_on_postgresql(home, postgres_url):
    """The same SQL on PostgreSQL: the owner join, ILIKE with escaped wildcards, dates
    with time zones, the feedback upsert and corrections."""
    from personal_gpt.config import Settings

    with fresh_database(postgres_url) as url:
        _queries_on(Settings(home=home, database_url=url))


def _queries_on(settings) -> None:
    s = Services(settings, models=FakeRegistry())
    try:
        gpt = s.create_gpt(ALICE, spec={"name": "Pg helper", "instructions": "Help."})
        s.publish(ALICE, gpt.id)
        mine = s.start_conversation(ALICE, gpt.id)
        answered(s.send(ALICE, mine, "Is it 100% cotton?"))
        link, _ = s.create_share_link(ALICE, gpt.id, public=True, label="Flyer")
        theirs = s.start_shared_conversation(link.id, signed(CAROL))
        answered(s.send_shared(link.id, signed(CAROL), theirs, "What is the delivery_fee?"))
        g = gpt.id
        assert {c.id for c in s.creator_conversations(ALICE, g, text="%")} == {mine}
        assert {c.id for c in s.creator_conversations(ALICE, g, text="Y_FEE")} == {theirs}
        assert {c.id for c in s.creator_conversations(ALICE, g, person="carol@example.com")} == {theirs}
        assert {c.id for c in s.creator_conversations(ALICE, g, link_id=link.id, since=date.today(),
                                                      until=date.today())} == {theirs}
        assert s.creator_conversations(ALICE, g, until=date.today() - timedelta(days=1)) == []
        answer = s.shared_messages(link.id, signed(CAROL), theirs)[-1].id
        s.rate_shared_answer(link.id, signed(CAROL), theirs, answer, 1)
        s.rate_shared_answer(link.id, signed(CAROL), theirs, answer, -1, "changed my mind")
        row = next(c for c in s.creator_conversations(ALICE, g) if c.id == theirs)
        assert (row.thumbs_up, row.thumbs_down, row.link_label) == (0, 1, "Flyer")
        fix = s.fix_answer(ALICE, answer, "Delivery is 4.99 pounds.", "finetune")
        assert [c.id for c in s.list_corrections(ALICE, g, target="finetune")] == [fix.id]
        with pytest.raises(NotFound):
            s.creator_conversation(BOB, theirs)
        s.delete_correction(ALICE, fix.id)
        assert s.list_corrections(ALICE, g) == []
    finally:
        s.close()
