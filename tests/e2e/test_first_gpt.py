"""A creator's first minutes in a real browser: template -> builder -> publish ->
chat, against the real server and the real bundled model (greedy, offline)."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_create_publish_and_chat_with_streamed_answer(live_server, page):
    page.set_default_timeout(60_000)
    # a first visit straight to a page keeps our own navigation (not Streamlit's automatic pages/ menu)
    page.goto(live_server.url + "/builder")
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_role("link", name="My GPTs")).to_be_visible()
    expect(nav).not_to_contain_text("streamlit app")
    expect(page.get_by_text("You have no GPTs yet: start one from a template")).to_be_visible()
    page.goto(live_server.url + "/")
    expect(page.get_by_text("You have no GPTs yet")).to_be_visible()

    # the template gallery -> fill the blanks in the dialog
    page.locator(".st-key-tpl-customer-support button").click()  # Streamlit marks a keyed widget st-key-<key>
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("textbox", name="Name your GPT", exact=True).fill("Bloom helper")
    dialog.get_by_role("textbox", name="Business name", exact=True).fill("Bloom & Branch")
    dialog.get_by_role("textbox", name="What you sell", exact=True).fill("flower bouquets")
    dialog.get_by_role("textbox", name="How to reach a person", exact=True).fill("hello@bloom.example")
    dialog.get_by_role("button", name="Create GPT").click()

    # the builder opens on the new GPT
    expect(page).to_have_url(re.compile(r"/builder\?gpt=gpt_[0-9a-f]+"))
    expect(page.get_by_role("heading", name=re.compile("Bloom helper"))).to_be_visible()
    instructions = page.get_by_role("textbox", name="Instructions", exact=True)
    expect(instructions).to_have_value(re.compile("Bloom & Branch"))
    page.get_by_role("button", name="Publish").click()
    expect(page.get_by_text(re.compile(r"Published v\d")).first).to_be_visible()

    page.get_by_role("button", name="Open chat").click()
    expect(page).to_have_url(re.compile(r"/chat\?gpt=gpt_"))
    expect(page.get_by_role("heading", name=re.compile("Bloom helper"))).to_be_visible()

    box = page.locator("textarea[data-testid='stChatInputTextArea']")
    box.fill("What do you sell?")
    box.press("Enter")

    answer = page.locator("[data-testid='stChatMessage']").nth(1)
    lengths: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        errors = page.locator("[data-testid='stAlertContentError'], [data-testid='stException']")
        if errors.count():
            pytest.fail(f"the chat showed an error: {errors.first.inner_text()}")
        if answer.count():
            n = len(answer.inner_text().strip())
            if not lengths or n != lengths[-1]:
                lengths.append(n)
            if page.get_by_role("button", name="Regenerate").count():
                break  # the run finished: the answer is complete
        time.sleep(0.05)
    assert lengths and lengths[-1] > 0, "an answer appeared"
    growing = [n for n in lengths if n > 0]
    assert len(growing) >= 3, f"the answer streamed in pieces, saw lengths {lengths}"
    expect(page.get_by_role("button", name="Regenerate")).to_be_visible()
    # the page shows the question and no error or traceback
    expect(page.locator("[data-testid='stChatMessage']").first).to_contain_text("What do you sell?")
    assert page.locator("[data-testid='stException']").count() == 0
