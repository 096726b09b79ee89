"""Share links end to end: a real OpenID Connect provider (oidc-provider-mock) on
127.0.0.1, the real app server, headless Chromium. A client opens a sign-in link
signed out, signs in at the provider as alice@client.example, lands on that GPT and
chats; someone from another domain is turned away; revoked and expired links say
"not available"; a signed-in client cannot reach a creator's builder."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.store import schema
from tests.support.oidc import mock_user, running_mock_provider, write_secrets
from tests.support.server import free_port, running_app_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def provider():
    with running_mock_provider() as url:
        yield url


def _sign_in_at_provider(page, sub: str) -> None:
    link = page.get_by_role("link", name=re.compile("Sign in with")).first
    expect(link).to_be_visible()
    link.click()
    page.locator("input[name=sub]").fill(sub)
    page.get_by_role("button", name="Authorize").click()


def test_share_link_sign_in_round_trip(home, tmp_path, provider, browser, monkeypatch):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secrets = write_secrets(home / "secrets.toml", {"company": provider}, redirect_uri=f"{base}/auth/callback",
                            creators=["owner@creator.example", "bob@creator.example"])
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(secrets))

    svc = Services()
    owner = Principal(issuer=provider, subject="owner", email="owner@creator.example", email_verified=True)
    gpt = svc.create_gpt(owner, name="Garden helper")
    spec = gpt.spec.model_copy(update={
        "instructions": "You help clients with their gardens. Answer in one short sentence.",
        "starters": ["When should I plant tulips?"],
        "generation": gpt.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 24}),
    })
    svc.save_draft(owner, gpt.id, spec, gpt.revision)
    svc.publish(owner, gpt.id)
    _, token = svc.create_share_link(owner, gpt.id, label="Client Co", domains=["client.example"])
    revoked, revoked_token = svc.create_share_link(owner, gpt.id, label="Old client", public=True)
    svc.revoke_share_link(owner, revoked.id)
    expired, expired_token = svc.create_share_link(owner, gpt.id, label="Trial", public=True)
    with svc.store.tx() as conn:  # a link whose expiry date has passed (creating one in the past is refused)
        conn.execute(sa.update(schema.share_links).where(schema.share_links.c.id == expired.id)
                     .values(expires_at=datetime.now(timezone.utc) - timedelta(days=1)))
    svc.close()
    mock_user(provider, "alice", email="alice@client.example", email_verified=True, name="Alice")
    mock_user(provider, "bob", email="bob@creator.example", email_verified=True, name="Bob")
    mock_user(provider, "mallory", email="mallory@elsewhere.example", email_verified=True, name="Mallory")

    with running_app_server(home, port=port, log_dir=tmp_path):
        # Alice: signed out -> sign in at the provider -> back on this GPT -> chat
        alice = browser.new_context().new_page()
        alice.set_default_timeout(60_000)
        alice.goto(f"{base}/s/{token}")
        expect(alice.get_by_text("Sign in to chat with this GPT.")).to_be_visible()
        assert token not in alice.url  # the token is exchanged for a cookie and a clean URL
        _sign_in_at_provider(alice, "alice")
        expect(alice.get_by_role("heading", name="Garden helper")).to_be_visible()
        assert alice.url.rstrip("/").endswith("/shared")
        alice.get_by_role("button", name="When should I plant tulips?").click()
        expect(alice.get_by_test_id("stChatMessage")).to_have_count(2, timeout=90_000)
        answer = alice.get_by_test_id("stChatMessage").nth(1)
        expect(answer).not_to_have_text("", timeout=60_000)
        assert alice.get_by_text("You help clients with their gardens").count() == 0  # instructions never shown

        # Alice is a client, not a creator: the builder is not hers
        alice.goto(f"{base}/builder?gpt={gpt.id}")
        expect(alice.get_by_text("cannot create GPTs", exact=False)).to_be_visible()
        assert alice.get_by_text("You help clients with their gardens").count() == 0

        # Mallory, from another domain: a friendly refusal that never shows the GPT
        mallory = browser.new_context().new_page()
        mallory.set_default_timeout(60_000)
        mallory.goto(f"{base}/s/{token}")
        _sign_in_at_provider(mallory, "mallory")
        expect(mallory.get_by_text("is not one of them", exact=False)).to_be_visible()
        assert mallory.get_by_role("heading", name="Garden helper").count() == 0

        # revoked and expired links: the same "not available" page
        for dead in (revoked_token, expired_token):
            other = browser.new_context().new_page()
            response = other.goto(f"{base}/s/{dead}")
            assert response.status == 404
            expect(other.get_by_text("expired or been revoked", exact=False).first).to_be_visible()
            other.context.close()
        # Bob, another creator, signs in from the home page: his GPTs only, not the owner's by id
        bob = browser.new_context().new_page()
        bob.set_default_timeout(60_000)
        bob.goto(base)
        _sign_in_at_provider(bob, "bob")
        expect(bob.get_by_text("You have no GPTs yet", exact=False)).to_be_visible()
        bob.goto(f"{base}/builder?gpt={gpt.id}")
        expect(bob.get_by_text("There is no GPT", exact=False)).to_be_visible()
        assert bob.get_by_text("You help clients with their gardens").count() == 0
        for context in (alice.context, mallory.context, bob.context):
            context.close()
