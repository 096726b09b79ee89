"""The creator's review loop in headless Chromium against the real app server: from the
builder's header to the Conversations page (the conversation listed, opened, its answer
fixed into the fine-tuning data), then to the Analytics page (the figures of that
conversation). The conversation is made beforehand through Services with the echo
stand-in (the answer text does not matter here; the real model answers in the other
browser tests); the server reads the same database."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from tests.support.fake_model import FakeRegistry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ME = Principal.local()


def test_builder_to_conversations_fix_and_analytics(home, live_server, page):
    svc = Services(models=FakeRegistry())
    g = svc.create_gpt(ME, name="Garden helper")
    svc.publish(ME, g.id)
    conv = svc.start_conversation(ME, g.id, "chat")
    reply = svc.send(ME, conv, "When do I sow broad beans?")
    "".join(reply.pieces)
    svc.close()

    page.set_default_timeout(60_000)
    page.goto(f"{live_server.url}/builder?gpt={g.id}")
    expect(page.get_by_role("heading", name=re.compile("Garden helper"))).to_be_visible()
    page.get_by_role("main").get_by_role("link", name="Conversations").click()
    expect(page).to_have_url(re.compile(rf"/conversations\?gpt={g.id}"))
    expect(page.get_by_role("heading", name=re.compile("Conversations · Garden helper"))).to_be_visible()
    expect(page.get_by_test_id("stDataFrame")).to_be_visible()

    # open the conversation and fix its answer into the fine-tuning data
    page.get_by_test_id("stSelectbox").filter(has_text="Open a conversation").click()
    page.get_by_role("option", name=re.compile("When do I sow broad beans")).click()
    expect(page.get_by_test_id("stChatMessage").first).to_contain_text("When do I sow broad beans?")
    page.get_by_text("Fix this answer").first.click()
    page.get_by_role("textbox", name="The right answer").fill("Sow broad beans in October or in March.")
    page.get_by_text("Add to fine-tuning data").first.click()
    page.get_by_role("button", name="Save the right answer").click()
    expect(page.get_by_text("In the fine-tuning data").first).to_be_visible()
    assert page.locator("[data-testid='stException']").count() == 0

    # the fixed pair is in the store, as a training example for this GPT
    check = Services(models=FakeRegistry())
    try:
        (fix,) = check.list_corrections(ME, g.id)
        assert (fix.question, fix.answer, fix.target) == (
            "When do I sow broad beans?", "Sow broad beans in October or in March.", "finetune")
    finally:
        check.close()

    # the analytics page of the same GPT counts that conversation
    page.goto(f"{live_server.url}/builder?gpt={g.id}")
    page.get_by_role("main").get_by_role("link", name="Analytics").click()
    expect(page).to_have_url(re.compile(rf"/analytics\?gpt={g.id}"))
    tile = page.get_by_test_id("stMetric").filter(has_text="Conversations").first
    expect(tile).to_contain_text("1")
    assert page.locator("[data-testid='stException']").count() == 0
