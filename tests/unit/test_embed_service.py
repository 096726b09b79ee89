"""The embed widget through the services facade on the real SQLite store, with the echo
stand-in at the ChatModel seam: what a creator types for sites and theme, empty list =
off, the sign-in policy decided by ``sharing.decide``, limits, whose conversations are
whose, and creators reaching only their own GPTs' widget settings and conversations."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from personal_gpt.auth import Principal
from personal_gpt.embed_sites import (
    frame_ancestors,
    normalise_site,
    normalise_sites,
    normalise_theme,
    origin_or_none,
    site_allowed,
)
from personal_gpt.errors import Forbidden, InvalidInput, NotFound, RateLimited, TooLarge
from personal_gpt.services import Services
from personal_gpt.sharing import LinkRefused, Visitor
from personal_gpt.store import embeds
from tests.support.fake_model import EchoModel, FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)
CAROL = Principal(issuer="https://idp.example", subject="carol", email="carol@client.example", email_verified=True)
SITE = "https://www.bloom.example"


def anon(n: int = 1) -> Visitor:
    return Visitor(visitor_id=f"embedvisitor{n:02d}" + "x" * 20)


def signed_in(p: Principal, ago: timedelta = timedelta(minutes=1)) -> Visitor:
    return Visitor(principal=p, signed_in_at=datetime.now(timezone.utc) - ago)


@pytest.fixture
def svc(home):
    s = Services(models=FakeRegistry(EchoModel()))
    yield s
    s.close()


@pytest.fixture
def gpt(svc):
    g = svc.create_gpt(ALICE, spec={
        "name": "Bloom helper", "description": "Answers questions about Bloom.", "avatar": "🌸",
        "instructions": "SECRET-INSTRUCTIONS", "starters": ["What do you sell?"],
    })
    svc.publish(ALICE, g.id)
    return g


# --- sites: pure ------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, origin", [
    ("www.example.com", "https://www.example.com"),
    ("https://example.com/page?x=1#top", "https://example.com"),
    ("HTTPS://Example.COM:443/", "https://example.com"),
    ("https://shop.example.com:8443", "https://shop.example.com:8443"),
    ("http://localhost:8000", "http://localhost:8000"),
    ("http://127.0.0.1:5500/index.html", "http://127.0.0.1:5500"),
    ("bücher.example", "https://xn--bcher-kva.example"),
    ("example.com.", "https://example.com"),
    ("localhost", "https://localhost"),  # no scheme typed means https, even for localhost
])
def test_what_a_creator_types_becomes_an_exact_origin(typed, origin):
    assert normalise_site(typed) == origin


@pytest.mark.parametrize("typed, sentence", [
    ("http://example.com", "only runs on https"),
    ("*.example.com", "wildcards are not supported"),
    ("https://*.example.com", "wildcards are not supported"),
    ("not a site", "not a web site address"),
    ("ftp://example.com", "not a web site address"),
    ("https://user:pw@example.com", "not a web site address"),
    ("https://10.0.0.1", "not a web site address"),
    ("javascript:alert(1)", "not a web site address"),
])
def test_bad_sites_get_one_sentence(typed, sentence):
    with pytest.raises(InvalidInput, match=sentence):
        normalise_site(typed)


def test_site_lists_dedupe_and_keep_order_and_www_is_another_site():
    sites = normalise_sites("https://www.example.com\nexample.com, www.example.com/about\n")
    assert sites == ("https://www.example.com", "https://example.com")
    assert normalise_sites("") == () and normalise_sites(None) == ()
    with pytest.raises(InvalidInput, match="at most 50"):
        normalise_sites([f"s{i}.example.com" for i in range(51)])


def test_browser_origins_match_exactly():
    sites = ("https://www.example.com", "http://127.0.0.1:5500")
    assert site_allowed(sites, "https://www.example.com")
    assert site_allowed(sites, "http://127.0.0.1:5500")
    assert not site_allowed(sites, "https://example.com")  # bare domain is another origin
    assert not site_allowed(sites, "http://www.example.com")  # scheme matters
    assert not site_allowed(sites, "https://www.example.com:444")  # port matters
    assert not site_allowed(sites, "https://evil.www.example.com")
    assert not site_allowed(sites, "https://www.example.com.evil.test")
    assert not site_allowed(sites, "null") and not site_allowed(sites, None) and not site_allowed(sites, "")
    assert not site_allowed(sites, "https://www.example.com/path")  # Origin never has a path
    assert origin_or_none("https://www.example.com") == "https://www.example.com"


def test_frame_ancestors_is_none_for_an_empty_list():
    assert frame_ancestors([]) == "'none'"
    assert frame_ancestors(["https://a.example", "http://localhost:3000"]) == "https://a.example http://localhost:3000 'self'"
    assert frame_ancestors(["https://a.example; script-src *"]) == "'none'"  # only well-formed origins go in a header


def test_theme_is_checked():
    theme = normalise_theme({"colour": "#ABC", "title": "  Bloom   chat ", "greeting": "Hi!\nAsk me.",
                             "avatar": "🌸", "position": "bottom-left", "open_on_load": True})
    assert theme == {"colour": "#aabbcc", "title": "Bloom chat", "greeting": "Hi!\nAsk me.", "avatar": "🌸",
                     "position": "bottom-left", "open_on_load": True}
    assert normalise_theme({})["colour"] == "#2563eb"
    for bad, sentence in [({"colour": "red;x"}, "not a colour"), ({"colour": "#12345"}, "not a colour"),
                          ({"position": "top"}, "bottom-right or bottom-left"), ({"title": "x" * 61}, "too long"),
                          ({"open_on_load": "yes"}, "on or off"), ({"avatar": "<img>"}, "emoji"),
                          ({"script": "x"}, "Unknown theme setting")]:
        with pytest.raises(InvalidInput, match=sentence):
            normalise_theme(bad)


# --- settings ---------------------------------------------------------------------------------


def test_new_gpts_have_the_embed_off_and_saving_validates(svc, gpt):
    settings = svc.embed_settings(ALICE, gpt.id)
    assert settings.sites == [] and not settings.enabled and settings.policy == "public"
    with svc.store.read() as conn:
        assert embeds.limits_json(conn, gpt.id) == {}
    saved = svc.save_embed_settings(
        ALICE, gpt.id, sites="www.bloom.example\nhttps://bloom.example/shop", theme={"colour": "#ff0000"},
        limits={"per_visitor_minute": 3, "max_message_chars": 100},
    )
    assert saved.sites == [SITE, "https://bloom.example"] and saved.enabled
    assert saved.theme["colour"] == "#ff0000"
    assert saved.limits.per_visitor_minute == 3 and saved.limits.max_message_chars == 100
    with svc.store.read() as conn:
        assert embeds.limits_json(conn, gpt.id)["per_visitor_minute"] == 3
    # None keeps a field; a bad field changes nothing
    with pytest.raises(InvalidInput):
        svc.save_embed_settings(ALICE, gpt.id, sites="http://bloom.example")
    with pytest.raises(InvalidInput):
        svc.save_embed_settings(ALICE, gpt.id, limits={"per_visitor_minute": 0})
    with pytest.raises(InvalidInput, match="public widget"):
        svc.save_embed_settings(ALICE, gpt.id, policy="public", emails=["x@client.example"])
    with pytest.raises(InvalidInput):
        svc.save_embed_settings(ALICE, gpt.id, policy="everyone")
    assert svc.embed_settings(ALICE, gpt.id).sites == [SITE, "https://bloom.example"]
    off = svc.save_embed_settings(ALICE, gpt.id, sites="")
    assert off.sites == [] and not off.enabled and off.limits.per_visitor_minute == 3


def test_check_embed_site_explains(svc, gpt):
    ok, sentence = svc.check_embed_site(ALICE, gpt.id, SITE)
    assert not ok and "embed is off" in sentence
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    assert svc.check_embed_site(ALICE, gpt.id, "https://www.bloom.example/contact")[0]
    ok, sentence = svc.check_embed_site(ALICE, gpt.id, "bloom.example")
    assert not ok and "www and the bare domain are different sites" in sentence
    ok, sentence = svc.check_embed_site(ALICE, gpt.id, "http://www.bloom.example")
    assert not ok and "https" in sentence
    svc.unpublish(ALICE, gpt.id)
    ok, sentence = svc.check_embed_site(ALICE, gpt.id, SITE)
    assert not ok and "not published" in sentence


def test_creators_reach_only_their_own_widgets(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    list(svc.send_embed(gpt.id, anon(), conv, "hello").pieces)
    for call in (
        lambda: svc.embed_settings(BOB, gpt.id),
        lambda: svc.save_embed_settings(BOB, gpt.id, sites=["https://evil.example"]),
        lambda: svc.check_embed_site(BOB, gpt.id, SITE),
        lambda: svc.embed_conversations(BOB, gpt.id),
        lambda: svc.embed_conversation_messages(BOB, gpt.id, conv),
    ):
        with pytest.raises(NotFound):
            call()
    assert svc.embed_settings(ALICE, gpt.id).sites == [SITE]
    # Alice reads it through her own GPT only, not through another GPT of hers
    other = svc.create_gpt(ALICE, name="Other")
    with pytest.raises(NotFound):
        svc.embed_conversation_messages(ALICE, other.id, conv)
    assert [m.role for m in svc.embed_conversation_messages(ALICE, gpt.id, conv)] == ["user", "assistant"]


# --- visitors ---------------------------------------------------------------------------------


def test_embed_off_unknown_and_unpublished_look_the_same(svc, gpt):
    sentences = set()
    for gpt_id in (gpt.id, "gpt_000000000000", "not-an-id"):
        with pytest.raises(NotFound) as caught:
            svc.embed_page(gpt_id)
        sentences.add(str(caught.value))
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    page = svc.embed_page(gpt.id)
    assert page.frame_ancestors == f"{SITE} 'self'"
    assert page.public() == {"gpt": gpt.id, "name": "Bloom helper", "description": "Answers questions about Bloom.",
                             "avatar": "🌸", "starters": ["What do you sell?"], "theme": page.theme, "policy": "public"}
    assert "SECRET-INSTRUCTIONS" not in str(page.public())
    svc.unpublish(ALICE, gpt.id)
    with pytest.raises(NotFound) as caught:
        svc.embed_page(gpt.id)
    sentences.add(str(caught.value))
    with pytest.raises(NotFound):
        svc.start_embed_conversation(gpt.id, anon(), SITE)
    assert len(sentences) == 1


def test_a_visitor_chats_and_the_creator_sees_the_site(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE, "http://localhost:3000"])
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    reply = svc.send_embed(gpt.id, anon(), conv, "  What do you sell?  ")
    assert "".join(reply.pieces) == "You said: What do you sell?"
    listed = svc.embed_conversations(ALICE, gpt.id)
    assert [(c.id, c.site, c.messages, c.visitor) for c in listed] == [(conv, SITE, 2, "anonymous")]
    assert [c.id for c in svc.embed_visitor_conversations(gpt.id, anon())] == [conv]
    msgs = svc.embed_visitor_messages(gpt.id, anon(), conv)
    assert [(m.role, m.content) for m in msgs] == [("user", "What do you sell?"), ("assistant", "You said: What do you sell?")]
    # the creator's own list of chats (source "chat") does not mix in widget visitors
    assert svc.list_conversations(ALICE, gpt.id, source="chat") == []


def test_visitors_never_reach_each_others_conversations(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    mine = svc.start_embed_conversation(gpt.id, anon(1), SITE)
    list(svc.send_embed(gpt.id, anon(1), mine, "my secret").pieces)
    assert svc.embed_visitor_conversations(gpt.id, anon(2)) == []
    with pytest.raises(NotFound):
        svc.embed_visitor_messages(gpt.id, anon(2), mine)
    svc.start_embed_conversation(gpt.id, anon(2), SITE)
    with pytest.raises(NotFound):
        svc.send_embed(gpt.id, anon(2), mine, "hi")
    # nor through another GPT's widget
    other = svc.create_gpt(ALICE, name="Other")
    svc.publish(ALICE, other.id)
    svc.save_embed_settings(ALICE, other.id, sites=[SITE])
    with pytest.raises(NotFound):
        svc.embed_visitor_messages(other.id, anon(1), mine)


def test_site_must_be_listed_or_our_own_origin(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    for bad in ("https://bloom.example", "https://evil.example", "", "https://www.bloom.example/page", None):
        with pytest.raises(Forbidden):
            svc.start_embed_conversation(gpt.id, anon(), bad)
    preview = svc.start_embed_conversation(gpt.id, anon(), "http://localhost:8501", own_origin="http://localhost:8501")
    assert svc.embed_conversations(ALICE, gpt.id)[0].site == "http://localhost:8501"
    list(svc.send_embed(gpt.id, anon(), preview, "hi", own_origin="http://localhost:8501").pieces)
    # a site taken off the list stops its conversations
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    svc.save_embed_settings(ALICE, gpt.id, sites=["https://bloom.example"])
    with pytest.raises(Forbidden):
        svc.send_embed(gpt.id, anon(), conv, "still there?")


def test_limits_apply_to_widget_messages(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE], limits={
        "per_visitor_minute": 2, "per_visitor_day": 5, "max_message_chars": 20, "max_conversation_messages": 6,
    })
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    with pytest.raises(TooLarge):
        svc.send_embed(gpt.id, anon(), conv, "x" * 21)
    with pytest.raises(InvalidInput):
        svc.send_embed(gpt.id, anon(), conv, "   ")
    for text in ("one", "two"):
        list(svc.send_embed(gpt.id, anon(), conv, text).pieces)
    with pytest.raises(RateLimited) as caught:
        svc.send_embed(gpt.id, anon(), conv, "three")
    assert 1 <= caught.value.retry_after <= 60
    # another visitor has their own minute
    other = svc.start_embed_conversation(gpt.id, anon(2), SITE)
    list(svc.send_embed(gpt.id, anon(2), other, "hello").pieces)
    assert len(svc.embed_visitor_messages(gpt.id, anon(), conv)) == 4  # nothing saved for refused messages


def test_conversation_length_limit(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE], limits={"max_conversation_messages": 4})
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    for text in ("one", "two"):
        list(svc.send_embed(gpt.id, anon(), conv, text).pieces)
    with pytest.raises(TooLarge, match="new chat"):
        svc.send_embed(gpt.id, anon(), conv, "three")


def test_signin_policy_is_decided_like_a_share_link(svc, gpt):
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE], policy="signin", domains=["client.example"])
    assert svc.embed_page(gpt.id).policy == "signin"
    assert svc.embed_access(gpt.id, anon()).outcome == "sign_in"
    with pytest.raises(LinkRefused) as caught:
        svc.start_embed_conversation(gpt.id, anon(), SITE)
    assert caught.value.decision.outcome == "sign_in"
    assert svc.embed_access(gpt.id, signed_in(BOB)).outcome == "denied"  # bob@example.com not on the list
    assert svc.embed_access(gpt.id, signed_in(CAROL, ago=timedelta(days=2))).reason == "session_too_old"
    unverified = Principal(issuer=CAROL.issuer, subject="c2", email="c2@client.example", email_verified=False)
    assert svc.embed_access(gpt.id, signed_in(unverified)).reason == "unverified_email"
    assert svc.embed_access(gpt.id, signed_in(CAROL)).allowed
    conv = svc.start_embed_conversation(gpt.id, signed_in(CAROL), SITE)
    list(svc.send_embed(gpt.id, signed_in(CAROL), conv, "hi").pieces)
    assert svc.embed_conversations(ALICE, gpt.id)[0].visitor == "carol@client.example"
    with pytest.raises(NotFound):  # Bob (even signed in, and allowed later) never sees Carol's conversation
        svc.save_embed_settings(ALICE, gpt.id, domains=["client.example", "example.com"])
        svc.embed_visitor_messages(gpt.id, signed_in(BOB), conv)
    # switching to public drops the lists
    assert svc.save_embed_settings(ALICE, gpt.id, policy="public").allowed_domains == []


class _Passages:
    """Stand-in at the retriever seam (real retrieval is tested in test_knowledge.py)."""

    def has_knowledge(self, gpt_id):
        return True

    def relevant(self, gpt_id, query):
        from personal_gpt.knowledge.retrieval import Passage

        return [Passage(1, 1, "kf_0000000000000001", "price-list.pdf", 2, None,
                        "Roses cost four pounds a stem.", 1.0, 0.9)]

    def forget(self, gpt_id):
        pass


@pytest.mark.parametrize("show", [False, True])
def test_widget_visitors_see_sources_only_when_the_creator_shows_them(svc, gpt, show):
    svc.__dict__["retriever"] = _Passages()
    g = svc.get_gpt(ALICE, gpt.id)
    svc.save_draft(ALICE, gpt.id, {**g.spec.model_dump(), "show_sources": show}, g.revision)
    svc.publish(ALICE, gpt.id)
    svc.save_embed_settings(ALICE, gpt.id, sites=[SITE])
    conv = svc.start_embed_conversation(gpt.id, anon(), SITE)
    reply = svc.send_embed(gpt.id, anon(), conv, "how much are roses?")
    "".join(reply.pieces)
    [answer] = [m for m in svc.embed_visitor_messages(gpt.id, anon(), conv) if m.role == "assistant"]
    expected = [{"n": 1, "file": "price-list.pdf", "page": 2, "text": "Roses cost four pounds a stem."}]
    assert [c["file"] for c in reply.citations] == (["price-list.pdf"] if show else [])
    assert answer.citations == (expected if show else [])
