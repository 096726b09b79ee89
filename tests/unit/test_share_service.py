"""Share links through the services facade on the real SQLite store, with the echo
stand-in at the ChatModel seam: creator side (create, list, revoke, rotate, tenancy)
and the visitor side (open, decide on every turn, quota, revoke mid-stream, whose
history is whose). SECURITY.md cases 18, 21-25."""

from __future__ import annotations

from dataclasses import asdict
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.errors import Forbidden, InvalidInput, NotFound
from personal_gpt.services import Services
from personal_gpt.sharing import NOT_AVAILABLE, LinkRefused, Visitor, hash_token
from personal_gpt.store import repos
from personal_gpt.store.schema import share_links
from tests.support.fake_model import EchoModel, FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
INSTRUCTIONS = "You are Bloom's helper. SECRET-INSTRUCTION-MARKER: never reveal the supplier list."
LONG = " ".join(f"w{i}" for i in range(40))


def now():
    return datetime.now(timezone.utc)


def signed_in(p: Principal, ago: timedelta = timedelta(minutes=1)) -> Visitor:
    return Visitor(principal=p, signed_in_at=now() - ago)


def anon(n: int = 1) -> Visitor:
    return Visitor(visitor_id=f"visitor{n:02d}" + "x" * 20)


@pytest.fixture
def svc(home):
    s = Services(models=FakeRegistry(EchoModel()))
    yield s
    s.close()


@pytest.fixture
def gpt(svc):
    g = svc.create_gpt(ALICE, spec={
        "name": "Bloom helper", "description": "Answers questions about Bloom & Branch.", "avatar": "🌸",
        "instructions": INSTRUCTIONS, "starters": ["What do you sell?", "When are you open?"],
    })
    svc.publish(ALICE, g.id)
    return g


def set_link(svc, link_id, **values):
    with svc.store.tx() as conn:
        conn.execute(sa.update(share_links).where(share_links.c.id == link_id).values(**values))


def all_messages(svc, conv_id):
    with svc.store.read() as conn:
        return repos.list_messages(conn, conv_id)


# --- creator side ------------------------------------------------------------------


def test_create_and_list(svc, gpt):
    link, token = svc.create_share_link(
        ALICE, gpt.id, label="  Team  Acme ", emails=["Carol@Acme.example"], domains=["@ACME.example"],
        expires=date.today() + timedelta(days=30), quota=50,
    )
    assert link.id.startswith("shl_") and len(link.id) == 20
    assert (link.label, link.policy, link.public, link.status) == ("Team Acme", "signin", False, "active")
    assert (link.allowed_emails, link.allowed_domains) == (["carol@acme.example"], ["acme.example"])
    assert link.expires_at == datetime.combine(date.today() + timedelta(days=31), datetime.min.time(), timezone.utc)
    assert (link.message_quota, link.messages_used, link.opens, link.conversations, link.last_used_at) == (50, 0, 0, 0, None)
    public, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    assert public.policy == "public" and public.expires_at is None and public.message_quota is None
    listed = svc.list_share_links(ALICE, gpt.id)
    assert [x.id for x in listed] == [public.id, link.id]
    assert svc.share_url(token, "https://gpts.example/") == f"https://gpts.example/s/{token}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(public=True, emails=["a@example.com"]), "A public link is open to anyone"),
        (dict(public=True, domains=["example.com"]), "A public link is open to anyone"),
        (dict(emails=["nope"]), "is not an e-mail address"),
        (dict(domains=["*.example.com"]), "wildcards are not supported"),
        (dict(domains=["https://example.com"]), "not a web address"),
        (dict(quota=0), "message limit must be a whole number"),
        (dict(expires=date(2000, 1, 1)), "expiry date is in the past"),
        (dict(label="x" * 101), "label is too long"),
    ],
)
def test_bad_links_are_refused_and_nothing_is_made(svc, gpt, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        svc.create_share_link(ALICE, gpt.id, **kwargs)
    assert svc.list_share_links(ALICE, gpt.id) == []


def test_the_database_keeps_only_the_hash(svc, gpt, home):
    tokens = [svc.create_share_link(ALICE, gpt.id, public=True)[1] for _ in range(5)]
    tokens.append(svc.rotate_share_link(ALICE, svc.list_share_links(ALICE, gpt.id)[0].id)[1])
    svc.close()  # checkpoint the WAL into the main file too
    files = sorted(home.glob("personal-gpt.db*"))
    data = b"".join(f.read_bytes() for f in files)
    assert files and len(data) > 10_000
    for t in tokens:
        assert t.encode() not in data and t[4:].encode() not in data
    # the grep does see what is stored: the hash of the newest token
    assert hash_token(tokens[-1]).encode() in data


def test_revoke_and_rotate(svc, gpt):
    link, old = svc.create_share_link(ALICE, gpt.id, label="Friends", domains=["example.org"], quota=7,
                                      expires=date.today() + timedelta(days=3))
    svc.open_share_token(old)
    rotated, new = svc.rotate_share_link(ALICE, link.id)
    assert new != old
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.open_share_token(old)
    assert svc.open_share_token(new) == link.id
    same = ("id", "gpt_id", "label", "policy", "allowed_emails", "allowed_domains", "expires_at", "message_quota")
    assert {k: getattr(rotated, k) for k in same} == {k: getattr(link, k) for k in same}
    (after,) = svc.list_share_links(ALICE, gpt.id)
    assert after.opens == 2 and after.status == "active"

    revoked = svc.revoke_share_link(ALICE, link.id)
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.open_share_token(new)
    assert svc.revoke_share_link(ALICE, link.id).revoked_at == revoked.revoked_at  # again: no change
    with pytest.raises(InvalidInput, match="was revoked"):
        svc.rotate_share_link(ALICE, link.id)
    assert svc.list_share_links(ALICE, gpt.id)[0].status == "revoked"


def test_status_expired(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    set_link(svc, link.id, expires_at=now() - timedelta(minutes=1))
    assert svc.list_share_links(ALICE, gpt.id)[0].status == "expired"


def test_creator_b_cannot_touch_creator_a_links(svc, gpt):
    link, token = svc.create_share_link(ALICE, gpt.id, public=True)
    bob_gpt = svc.create_gpt(BOB, name="Bob's")
    for call in (
        lambda: svc.create_share_link(BOB, gpt.id, public=True),
        lambda: svc.list_share_links(BOB, gpt.id),
        lambda: svc.revoke_share_link(BOB, link.id),
        lambda: svc.rotate_share_link(BOB, link.id),
    ):
        with pytest.raises(NotFound):
            call()
    assert svc.list_share_links(BOB, bob_gpt.id) == []
    (still,) = svc.list_share_links(ALICE, gpt.id)
    assert still.status == "active" and svc.open_share_token(token) == link.id


@pytest.mark.parametrize("bad", ["../x", "shl_1' OR '1'='1", "x" * 10_000, "", "shl_ZZZZZZZZZZZZZZZZ", None])
def test_malformed_link_ids(svc, gpt, bad):
    with pytest.raises(NotFound, match="There is no share link with that id."):
        svc.revoke_share_link(ALICE, bad)
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.shared_access(bad, anon())
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.start_shared_conversation(bad, anon())


# --- opening a link ----------------------------------------------------------------


def test_every_dead_token_gets_the_same_answer(svc, gpt):
    other = svc.create_gpt(ALICE, name="Other")
    svc.publish(ALICE, other.id)
    live, live_token = svc.create_share_link(ALICE, gpt.id, public=True)
    revoked, revoked_token = svc.create_share_link(ALICE, gpt.id, public=True)
    svc.revoke_share_link(ALICE, revoked.id)
    expired, expired_token = svc.create_share_link(ALICE, gpt.id, public=True)
    set_link(svc, expired.id, expires_at=now() - timedelta(seconds=1))
    unpublished = svc.create_gpt(ALICE, name="Draft only")
    _, unpublished_token = svc.create_share_link(ALICE, unpublished.id, public=True)
    _, deleted_token = svc.create_share_link(ALICE, other.id, public=True)
    svc.delete_gpt(ALICE, other.id)
    dead = {
        "no token": "", "random": "pgs_" + "A" * 43, "malformed": "pgs_short", "tampered": live_token[:-1] + "!",
        "revoked": revoked_token, "expired": expired_token, "unpublished": unpublished_token,
        "gpt deleted": deleted_token,
    }
    answers = {}
    for name, token in dead.items():
        with pytest.raises(NotFound) as err:
            svc.open_share_token(token)
        answers[name] = (type(err.value), str(err.value))
    assert set(answers.values()) == {(NotFound, NOT_AVAILABLE)}, answers
    assert svc.open_share_token(live_token) == live.id
    opens = {x.id: x.opens for x in svc.list_share_links(ALICE, gpt.id)}
    assert opens == {live.id: 1, revoked.id: 0, expired.id: 0}


# --- the share page ----------------------------------------------------------------


def test_the_page_shows_only_the_public_face_of_the_published_version(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    draft = svc.get_gpt(ALICE, gpt.id)
    svc.save_draft(ALICE, gpt.id, draft.spec.model_copy(update={"name": "Renamed draft", "instructions": "DRAFT"}),
                   draft.revision)
    view = svc.shared_access(link.id, anon())
    assert view.decision.allowed
    assert (view.name, view.description, view.avatar, view.starters) == (
        "Bloom helper", "Answers questions about Bloom & Branch.", "🌸", ["What do you sell?", "When are you open?"],
    )
    assert set(asdict(view)) == {"decision", "name", "description", "avatar", "starters"}
    text = repr(view)
    for secret in ("SECRET-INSTRUCTION-MARKER", "DRAFT", "Renamed draft", gpt.id, "echo"):
        assert secret not in text


def test_audiences_through_the_service(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, emails=["carol@example.com"])
    carol = Principal(issuer="https://idp.example", subject="carol", email="carol@example.com", email_verified=True)
    lookalike = Principal(issuer="https://idp.example", subject="eve", email="carol@evilexample.com", email_verified=True)
    unverified = Principal(issuer="https://idp.example", subject="eve2", email="carol@example.com", email_verified=False)

    for visitor, outcome, reason in [
        (anon(), "sign_in", "not_signed_in"),
        (signed_in(carol, ago=timedelta(hours=13)), "sign_in", "session_too_old"),
        (signed_in(lookalike), "denied", "not_on_list"),
        (signed_in(unverified), "denied", "unverified_email"),
    ]:
        view = svc.shared_access(link.id, visitor)
        assert (view.decision.outcome, view.decision.reason, view.name) == (outcome, reason, "")
        with pytest.raises(LinkRefused) as err:
            svc.start_shared_conversation(link.id, visitor)
        assert isinstance(err.value, Forbidden) and err.value.decision.reason == reason
    view = svc.shared_access(link.id, signed_in(carol))
    assert view.decision.allowed and view.name == "Bloom helper"
    conv = svc.start_shared_conversation(link.id, signed_in(carol))
    assert "".join(svc.send_shared(link.id, signed_in(carol), conv, "hello").pieces) == "You said: hello"
    svc.share_max_session_age = timedelta(seconds=30)
    assert svc.shared_access(link.id, signed_in(carol, ago=timedelta(minutes=1))).decision.reason == "session_too_old"


def test_anonymous_visitor_needs_the_cookie(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    assert svc.shared_access(link.id, Visitor()).decision.allowed
    with pytest.raises(Forbidden, match="allow cookies"):
        svc.start_shared_conversation(link.id, Visitor())
    with pytest.raises(Forbidden, match="allow cookies"):
        svc.start_shared_conversation(link.id, Visitor(visitor_id="short"))


# --- chatting through a link -----------------------------------------------------------


def test_chat_uses_the_published_version_and_the_visitors_own_row(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    draft = svc.get_gpt(ALICE, gpt.id)
    svc.save_draft(ALICE, gpt.id, draft.spec.model_copy(update={"instructions": "UNPUBLISHED DRAFT"}), draft.revision)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    assert "".join(svc.send_shared(link.id, v, conv, "first").pieces) == "You said: first"
    list(svc.send_shared(link.id, v, conv, "second").pieces)
    prompt = svc.models.model.calls[-1]
    assert prompt[0] == {"role": "system", "content": INSTRUCTIONS}
    assert [m["content"] for m in prompt[1:]] == ["first", "You said: first", "second"]
    msgs = svc.shared_messages(link.id, v, conv)
    assert [(m.role, m.content, m.stopped) for m in msgs] == [
        ("user", "first", False), ("assistant", "You said: first", False),
        ("user", "second", False), ("assistant", "You said: second", False),
    ]
    assert [c.id for c in svc.shared_conversations(link.id, v)] == [conv]
    with svc.store.read() as conn:
        row = conn.execute(sa.text(
            "SELECT c.source, c.share_link_id, c.version_number, u.issuer, u.subject FROM conversations c "
            "JOIN users u ON u.id = c.user_id WHERE c.id = :c"), {"c": conv}).one()
    assert tuple(row) == ("share", link.id, 1, "visitor", v.visitor_id)
    (stats,) = svc.list_share_links(ALICE, gpt.id)
    assert (stats.conversations, stats.messages_used) == (1, 2) and stats.last_used_at is not None
    assert svc.list_conversations(ALICE, gpt.id) == []  # the creator's own history is theirs alone


def test_visitors_never_reach_each_others_history(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    other_link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    v1, v2 = anon(1), anon(2)
    conv = svc.start_shared_conversation(link.id, v1)
    list(svc.send_shared(link.id, v1, conv, "my private question").pieces)
    own = svc.start_conversation(ALICE, gpt.id)
    list(svc.send(ALICE, own, "creator's chat").pieces)

    assert svc.shared_conversations(link.id, v2) == []
    assert svc.shared_conversations(other_link.id, v1) == []
    carol = signed_in(Principal(issuer="https://other-idp.example", subject=v1.visitor_id))
    for visitor, link_id, conv_id in [
        (v2, link.id, conv),  # another browser
        (v1, other_link.id, conv),  # the same browser through another link
        (carol, link.id, conv),  # a signed-in person whose subject equals the cookie id
        (v1, link.id, own),  # the creator's own conversation
        (signed_in(ALICE), link.id, own),  # even the creator, through the link
    ]:
        with pytest.raises(NotFound, match="There is no conversation with that id."):
            svc.shared_messages(link_id, visitor, conv_id)
        with pytest.raises(NotFound, match="There is no conversation with that id."):
            svc.send_shared(link_id, visitor, conv_id, "let me in")
    assert [m.content for m in all_messages(svc, conv)] == ["my private question", "You said: my private question"]
    assert len(all_messages(svc, own)) == 2


def test_quota_counts_every_turn(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True, quota=2)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    list(svc.send_shared(link.id, v, conv, "one").pieces)
    list(svc.send_shared(link.id, v, conv, "two").pieces)
    with pytest.raises(LinkRefused, match="reached its message limit") as err:
        svc.send_shared(link.id, v, conv, "three")
    assert err.value.decision.reason == "quota"
    assert [m.content for m in all_messages(svc, conv)][-1] == "You said: two"
    assert svc.list_share_links(ALICE, gpt.id)[0].messages_used == 2
    assert svc.shared_access(link.id, v).decision.reason == "quota"


def test_a_turn_that_cannot_start_is_not_counted(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True, quota=3)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    svc.models.model.context_window = 20  # the prompt cannot fit: refused before anything is saved
    with pytest.raises(InvalidInput, match="shorten the instructions or the message"):
        svc.send_shared(link.id, v, conv, "hello")
    with pytest.raises(InvalidInput, match="Type a message first"):
        svc.send_shared(link.id, v, conv, "   ")
    assert svc.list_share_links(ALICE, gpt.id)[0].messages_used == 0
    assert all_messages(svc, conv) == []


def test_revoked_mid_conversation_refuses_the_next_turn(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    list(svc.send_shared(link.id, v, conv, "hello").pieces)
    svc.revoke_share_link(ALICE, link.id)
    for call in (
        lambda: svc.send_shared(link.id, v, conv, "again"),
        lambda: svc.shared_messages(link.id, v, conv),
        lambda: svc.shared_conversations(link.id, v),
        lambda: svc.shared_access(link.id, v),
        lambda: svc.start_shared_conversation(link.id, v),
    ):
        with pytest.raises(NotFound, match=NOT_AVAILABLE):
            call()
    assert len(all_messages(svc, conv)) == 2


def test_unpublishing_closes_links_and_publishing_reopens_them(svc, gpt):
    link, token = svc.create_share_link(ALICE, gpt.id, public=True)
    svc.unpublish(ALICE, gpt.id)
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.shared_access(link.id, anon())
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.open_share_token(token)
    svc.publish(ALICE, gpt.id)
    assert svc.shared_access(link.id, anon()).decision.allowed


def _streaming(svc, link_id, v):
    conv = svc.start_shared_conversation(link_id, v)
    reply = svc.send_shared(link_id, v, conv, LONG)
    first = next(reply.pieces)
    return conv, reply, first


def _assert_cut(svc, conv, reply, received):
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        for piece in reply.pieces:
            received.append(piece)
    msgs = all_messages(svc, conv)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content == "".join(received) and len(msgs[1].content) < len("You said: " + LONG)
    assert msgs[1].meta["finish_reason"] == "cancelled"


def test_revoking_cuts_a_streaming_answer_at_the_next_piece(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    conv, reply, first = _streaming(svc, link.id, anon())
    svc.revoke_share_link(ALICE, link.id)
    received = [first]
    _assert_cut(svc, conv, reply, received)
    assert received == [first]  # not one more piece after the revocation
    assert svc.models.model.calls  # the model did start


def test_a_revocation_from_another_process_is_seen_while_streaming(svc, gpt, home):
    svc.share_recheck_s = 0.0  # re-read the link before every piece
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    conv, reply, first = _streaming(svc, link.id, anon())
    received = [first, next(reply.pieces)]
    other = Services(models=FakeRegistry())  # e.g. the CLI: same database, another process's services
    try:
        other.revoke_share_link(ALICE, link.id)
    finally:
        other.close()
    _assert_cut(svc, conv, reply, received)
    assert len(received) == 2


def test_unpublishing_or_expiry_while_streaming_is_seen_within_the_recheck_time(svc, gpt):
    svc.models.model.delay = 0.02
    svc.share_recheck_s = 0.1
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    conv, reply, first = _streaming(svc, link.id, anon())
    set_link(svc, link.id, expires_at=now() - timedelta(seconds=1))  # written behind the service's back
    _assert_cut(svc, conv, reply, [first])

    svc.share_recheck_s = 0.0
    link2, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    conv2, reply2, first2 = _streaming(svc, link2.id, anon(2))
    svc.unpublish(ALICE, gpt.id)
    _assert_cut(svc, conv2, reply2, [first2])


def test_a_visitor_stopping_keeps_the_partial_answer(svc, gpt):
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    v = anon()
    conv, reply, first = _streaming(svc, link.id, v)
    reply.pieces.close()
    msgs = svc.shared_messages(link.id, v, conv)
    assert [(m.role, m.stopped) for m in msgs] == [("user", False), ("assistant", True)]
    assert msgs[1].content == first


class _Passages:
    """Stand-in at the retriever seam (the real embedder is tested in test_knowledge.py):
    one passage from a file whose name must never reach a visitor."""

    def has_knowledge(self, gpt_id):
        return True

    def relevant(self, gpt_id, query):
        from personal_gpt.knowledge.retrieval import Passage

        return [Passage(1, 1, "kf_0000000000000001", "supplier-list-CONFIDENTIAL.pdf", 3, None,
                        "Roses come from Grower X.", 1.0, 0.9)]

    def forget(self, gpt_id):
        pass


def test_visitors_get_no_citations_or_file_names(svc, gpt):
    svc.__dict__["retriever"] = _Passages()
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    reply = svc.send_shared(link.id, v, conv, "where do roses come from?")
    assert "".join(reply.pieces) == "You said: where do roses come from?"
    assert reply.citations == []
    assert "supplier-list-CONFIDENTIAL" not in repr(svc.shared_messages(link.id, v, conv))
    assert "citations" not in all_messages(svc, conv)[-1].meta
    # the knowledge still informed the answer (inside its delimiters, after the instructions)
    system = svc.models.model.calls[-1][0]["content"]
    assert system.startswith(INSTRUCTIONS) and "Roses come from Grower X." in system


def test_visitors_see_sources_only_when_the_creator_shows_them(svc, gpt):
    """Opt-in per GPT: then a visitor sees number, file, page and the evidence sentence,
    never the passage, ids or scores; switching it off hides past sources too."""
    svc.__dict__["retriever"] = _Passages()
    spec = svc.get_gpt(ALICE, gpt.id).spec.model_dump()
    g = svc.save_draft(ALICE, gpt.id, {**spec, "show_sources": True}, svc.get_gpt(ALICE, gpt.id).revision)
    svc.publish(ALICE, g.id)
    link, _ = svc.create_share_link(ALICE, gpt.id, public=True)
    v = anon()
    conv = svc.start_shared_conversation(link.id, v)
    reply = svc.send_shared(link.id, v, conv, "where do roses come from?")
    "".join(reply.pieces)
    [answer] = [m for m in svc.shared_messages(link.id, v, conv) if m.role == "assistant"]
    assert answer.citations == [{"n": 1, "file": "supplier-list-CONFIDENTIAL.pdf", "page": 3,
                                 "text": "Roses come from Grower X."}]
    g = svc.get_gpt(ALICE, gpt.id)
    svc.save_draft(ALICE, gpt.id, {**g.spec.model_dump(), "show_sources": False}, g.revision)
    svc.publish(ALICE, gpt.id)
    assert all(m.citations == [] for m in svc.shared_messages(link.id, v, conv))


def test_the_whole_flow_on_postgresql(home, postgres_url):
    """Counters, JSON lists, time zones and the conversation count on PostgreSQL too."""
    import uuid

    from personal_gpt.config import Settings

    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    settings = Settings(home=home, database_url=url)
    s = Services(settings, models=FakeRegistry(EchoModel()))
    try:
        g = s.create_gpt(ALICE, name="Pg helper")
        s.publish(ALICE, g.id)
        link, token = s.create_share_link(ALICE, g.id, domains=["Example.com"], quota=2,
                                          expires=date.today() + timedelta(days=1))
        assert s.open_share_token(token) == link.id
        carol = signed_in(Principal(issuer="https://idp.example", subject="carol", email="carol@example.com",
                                    email_verified=True))
        conv = s.start_shared_conversation(link.id, carol)
        list(s.send_shared(link.id, carol, conv, "one").pieces)
        reply = s.send_shared(link.id, carol, conv, LONG)
        first = next(reply.pieces)
        other = Services(settings, models=FakeRegistry())
        try:
            _, new_token = other.rotate_share_link(ALICE, link.id)
            other.revoke_share_link(ALICE, link.id)
        finally:
            other.close()
        s.share_recheck_s = 0.0
        with pytest.raises(NotFound, match=NOT_AVAILABLE):
            list(reply.pieces)
        with pytest.raises(NotFound, match=NOT_AVAILABLE):
            s.open_share_token(new_token)
        (stats,) = s.list_share_links(ALICE, g.id)
        assert (stats.status, stats.opens, stats.conversations, stats.messages_used) == ("revoked", 1, 1, 2)
        assert stats.allowed_domains == ["example.com"] and stats.expires_at.tzinfo is not None
        assert [m.content for m in all_messages(s, conv)][:3] == ["one", "You said: one", LONG]
        assert all_messages(s, conv)[-1].content == first
    finally:
        s.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
