"""Knowledge in a real browser: upload several formats in the builder, watch
them being read, ask a question answered on page 3 of a PDF, and see the
citation — real server, real parser, embedder and bundled model."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from tests.support.documents import pdf_with_pages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_upload_formats_and_answer_with_a_page_citation(live_server, page, tmp_path):
    svc = Services()  # the same home as the server: it sees this GPT
    me = Principal.local()
    gpt = svc.create_gpt(me, name="Bloom shop")
    spec = gpt.spec.model_copy(update={
        "instructions": "You answer questions about the Bloom & Branch flower shop. Keep answers short.",
        "generation": gpt.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 48}),
    })
    svc.save_draft(me, gpt.id, spec, gpt.revision)
    svc.publish(me, gpt.id)
    svc.close()

    files = {
        "catalogue.pdf": pdf_with_pages([
            "Bloom & Branch catalogue. We are a family flower shop in Leeds, founded in 1998.",
            "Our florists arrange every bouquet by hand in the morning.",
            "Prices. The Sunrise bouquet costs 35 pounds. The Meadow bouquet costs 42 pounds.",
        ]),
        "delivery.md": b"# Delivery\n\nDelivery in Leeds costs 4.99 pounds, free over 50 pounds.\n",
        "opening.html": b"<html><body><h1>Opening hours</h1><p>Open Monday to Saturday, 9am to 5pm.</p></body></html>",
        "staff.csv": b"name,role\nAmira,head florist\nJoe,delivery driver\n",
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))

    page.set_default_timeout(90_000)
    page.goto(f"{live_server.url}/builder?gpt={gpt.id}")
    page.get_by_role("tab", name="Knowledge").click()
    expect(page.get_by_text("No knowledge files yet.")).to_be_visible()
    page.locator(f".st-key-kupload-{gpt.id}-0 input[type=file]").set_input_files(paths)
    page.get_by_role("button", name="Add to knowledge").click()

    # progress while reading, then every file ready with its passages
    for name in files:  # in the file list (the uploader's chips may still show the same names for a moment)
        expect(page.locator(f"strong:text-is('{name}')")).to_be_visible()
    expect(page.get_by_text("✅ ready")).to_have_count(len(files), timeout=180_000)
    expect(page.get_by_text(re.compile(r"\d+ passages · 3 pages"))).to_be_visible()

    page.goto(f"{live_server.url}/chat?gpt={gpt.id}")
    box = page.locator("textarea[data-testid='stChatInputTextArea']")
    box.fill("How much does the Sunrise bouquet cost?")
    box.press("Enter")
    expect(page.get_by_role("button", name="Regenerate")).to_be_visible(timeout=180_000)
    assert page.locator("[data-testid='stException'], [data-testid='stAlertContentError']").count() == 0
    sources = page.get_by_text(re.compile(r"Sources \(\d\)"))
    sources.click()
    expect(page.get_by_text("[1] catalogue.pdf, page 3")).to_be_visible()
    expect(page.get_by_text(re.compile("Sunrise bouquet costs 35 pounds")).first).to_be_visible()
