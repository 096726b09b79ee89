"""The builder's Share tab and the client's shared-chat page through AppTest, on the
real database with the echo stand-in at the ChatModel seam. The cookies a browser
would carry (the signed link id, the visitor id) are what ``glue.share_visitor``
reads; AppTest cannot send cookies, so these tests hand that one function its
result — the real cookie handling is covered by tests/web and the browser test."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.sharing import Visitor
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "streamlit_app.py")
SHARED = str(ROOT / "pages" / "shared.py")
VISITOR_ID = "v" * 43


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


def published_gpt(svc, name="Garden helper"):
    g = svc.create_gpt(ME, name=name)
    spec = g.spec.model_copy(update={"instructions": "SECRET INSTRUCTIONS", "starters": ["Hello garden"]})
    svc.save_draft(ME, g.id, spec, g.revision)
    svc.publish(ME, g.id)
    return svc.get_gpt(ME, g.id)


def builder(gpt_id: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["gpt"] = gpt_id
    at.run()
    at.switch_page("pages/builder.py")
    at.run()
    return at


def client_page(monkeypatch, link_id: str | None, visitor: Visitor) -> AppTest:
    monkeypatch.setattr(glue, "share_visitor", lambda: (link_id, visitor))
    at = AppTest.from_file(SHARED, default_timeout=60)
    at.run()
    return at


def all_text(at) -> str:
    parts = [e.value for e in (*at.markdown, *at.caption, *at.info, *at.error, *at.title)]
    parts += [b.label for b in at.button]
    return " ".join(str(p) for p in parts)


def test_share_tab_creates_a_link_and_shows_it_once(svc):
    g = published_gpt(svc)
    at = builder(g.id)
    assert not at.exception
    assert any("No share links yet." in i.value for i in at.info)
    at.text_input[[t.label for t in at.text_input].index("Label (who is it for?)")].input("Acme — Jane")
    at.radio[[r.label for r in at.radio].index("Who can open it")].set_value("public")
    next(b for b in at.button if b.label == "Create link").click().run()
    assert not at.exception
    codes = [c.value for c in at.code if "/s/pgs_" in c.value]  # (the API section shows call snippets too)
    assert len(codes) == 1
    links = svc.list_share_links(ME, g.id)
    assert [link.label for link in links] == ["Acme — Jane"] and links[0].public
    token = codes[0].rsplit("/s/", 1)[1]
    assert svc.open_share_token(token) == links[0].id  # the URL shown really opens this link
    at.run()
    assert not [c for c in at.code if "pgs_" in c.value], "the URL is shown once, then only its statistics"
    assert any("1 open · 0 conversations" in c.value for c in at.caption)


def test_share_tab_revoke_asks_first(svc):
    g = published_gpt(svc)
    link, token = svc.create_share_link(ME, g.id, label="Client", public=True)
    at = builder(g.id)
    at.button(key=f"share-rev-{link.id}").click().run()
    assert not at.exception
    assert svc.list_share_links(ME, g.id)[0].status == "active", "one click revokes nothing"
    at.button(key="share-ask-yes").click().run()
    assert not at.exception
    assert svc.list_share_links(ME, g.id)[0].status == "revoked"
    with pytest.raises(glue.PersonalGptError):
        svc.open_share_token(token)


def test_share_tab_rejects_bad_input_with_a_sentence(svc):
    g = published_gpt(svc)
    at = builder(g.id)
    at.text_area[[t.label for t in at.text_area].index("Allowed e-mails (one per line)")].input("not an email")
    next(b for b in at.button if b.label == "Create link").click().run()
    assert not at.exception
    assert at.error and svc.list_share_links(ME, g.id) == []


def test_client_page_chats_and_never_shows_instructions(svc, monkeypatch):
    g = published_gpt(svc)
    link, _ = svc.create_share_link(ME, g.id, label="Client", public=True)
    at = client_page(monkeypatch, link.id, Visitor(visitor_id=VISITOR_ID))
    assert not at.exception
    assert [t.value for t in at.title] == ["Garden helper"]
    next(b for b in at.button if b.label == "Hello garden").click().run()
    assert not at.exception
    assert "You said: Hello garden" in all_text(at)
    assert "SECRET INSTRUCTIONS" not in all_text(at)
    assert svc.list_share_links(ME, g.id)[0].conversations == 1


def test_client_page_asks_to_sign_in_and_turns_away_dead_links(svc, monkeypatch):
    g = published_gpt(svc)
    signin, _ = svc.create_share_link(ME, g.id, label="Client", domains=["client.example"])
    at = client_page(monkeypatch, signin.id, Visitor(visitor_id=VISITOR_ID))
    assert not at.exception
    assert "Sign in to chat with this GPT." in all_text(at)
    assert "Garden helper" not in all_text(at)

    svc.revoke_share_link(ME, signin.id)
    at = client_page(monkeypatch, signin.id, Visitor(visitor_id=VISITOR_ID))
    assert not at.exception
    assert "expired or been revoked" in all_text(at) and "Garden helper" not in all_text(at)

    at = client_page(monkeypatch, None, Visitor(visitor_id=VISITOR_ID))
    assert "Open the link you were sent" in all_text(at)


def test_client_page_refuses_the_wrong_account(svc, monkeypatch):
    from datetime import datetime, timezone

    g = published_gpt(svc)
    link, _ = svc.create_share_link(ME, g.id, label="Client", domains=["client.example"])
    mallory = Principal(issuer="https://idp.example", subject="m", email="m@evilclient.example", email_verified=True)
    at = client_page(monkeypatch, link.id, Visitor(principal=mallory, signed_in_at=datetime.now(timezone.utc)))
    assert not at.exception
    assert "is not one of them" in all_text(at) and "Garden helper" not in all_text(at)
    alice = Principal(issuer="https://idp.example", subject="a", email="alice@client.example", email_verified=True)
    at = client_page(monkeypatch, link.id, Visitor(principal=alice, signed_in_at=datetime.now(timezone.utc)))
    assert not at.exception
    assert [t.value for t in at.title] == ["Garden helper"]
