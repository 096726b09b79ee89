"""Thumbs in the embed widget, in headless Chromium against the real app server with the
real bundled model: after a streamed answer the visitor presses "Bad answer" with the
keyboard, adds a comment, and the creator's conversations show both; reloading the
chat shows the pressed thumb again."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ME = Principal.local()


def test_widget_thumbs_and_comment_reach_the_creator(home, live_server, page):
    svc = Services()
    g = svc.create_gpt(ME, name="Garden helper")
    spec = g.spec.model_copy(update={
        "instructions": "You help people with their gardens. Answer in one short sentence.",
        "generation": g.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 8}),
    })
    svc.save_draft(ME, g.id, spec, g.revision)
    svc.publish(ME, g.id)
    svc.save_embed_settings(ME, g.id, sites=["https://www.bloom.example"])

    page.set_default_timeout(60_000)
    page.goto(f"{live_server.url}/embed/{g.id}")
    page.get_by_label("Your message").fill("When should I plant tulips?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".msg.assistant:not(.streaming) .body p")).not_to_have_text("", timeout=120_000)
    bad = page.get_by_role("button", name="Bad answer")
    expect(bad).to_have_attribute("aria-pressed", "false")
    bad.focus()
    page.keyboard.press("Enter")  # keyboard-usable
    expect(bad).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "false")
    comment = page.get_by_label("What was wrong or right about this answer? (optional)")
    comment.fill("<b>Too short</b>")
    comment.press("Enter")
    expect(page.get_by_text("Thanks — your comment was sent.")).to_be_visible()

    (conv,) = svc.creator_conversations(ME, g.id)
    turn = svc.creator_conversation(ME, conv.id).turns[-1]
    assert (turn.role, turn.rating, turn.comment) == ("assistant", -1, "<b>Too short</b>")
    assert (conv.site, conv.thumbs_down) == (live_server.url, 1)

    page.reload()  # the conversation comes back with its rating
    expect(page.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    svc.close()
