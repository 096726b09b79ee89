"""The embed widget end to end: the real app server with the real bundled model, a
host page served from a second origin on 127.0.0.1 (a tiny http.server on another
port) that adds the widget with its one script tag, headless Chromium. On a listed
site the bubble opens and a starter gets a streamed answer (recorded with the site's
origin); on a site that is not listed the bubble is not drawn and a plain iframe of
the chat page is refused by the browser (frame-ancestors); a sign-in GPT signs its
visitor in through the pop-up against a real OpenID provider (oidc-provider-mock)."""

from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from tests.support.oidc import mock_user, running_mock_provider, write_secrets
from tests.support.server import free_port, running_app_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ME = Principal.local()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def host_site(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on a free 127.0.0.1 port (another origin than the app); yields its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def provider():
    with running_mock_provider() as url:
        yield url


def _gpt(svc, name: str, sites: list[str], **settings) -> str:
    g = svc.create_gpt(ME, name=name)
    spec = g.spec.model_copy(update={
        "instructions": "You help people with their gardens. Answer in one short sentence.",
        "starters": ["When should I plant tulips?"],
        "generation": g.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 8}),
    })
    svc.save_draft(ME, g.id, spec, g.revision)
    svc.publish(ME, g.id)
    svc.save_embed_settings(ME, g.id, sites=sites, theme={"colour": "#0a7d32", "greeting": "Hello from the garden!"},
                            **settings)
    return g.id


def test_widget_on_a_listed_site_refused_elsewhere_and_signed_in_by_popup(home, tmp_path, browser, provider, monkeypatch):
    folder = tmp_path / "host"
    folder.mkdir()
    port = free_port()
    secrets = write_secrets(home / "secrets.toml", {"company": provider},
                            redirect_uri=f"http://127.0.0.1:{port}/auth/callback")
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(secrets))
    mock_user(provider, "carol", email="carol@client.example", email_verified=True, name="Carol")
    with host_site(folder) as host:
        svc = Services()
        allowed = _gpt(svc, "Garden helper", [host])
        refused = _gpt(svc, "Shop helper", ["https://www.bloom.example"])
        members = _gpt(svc, "Members helper", [host], policy="signin", domains=["client.example"])
        svc.close()
        with running_app_server(home, port=port, log_dir=tmp_path) as server:
            (folder / "allowed.html").write_text(
                "<!doctype html><html><head><title>Bloom shop</title></head><body><h1>Bloom shop</h1>"
                f'<script src="{server.url}/embed.js" data-gpt="{allowed}" async></script></body></html>'
            )
            (folder / "members.html").write_text(
                "<!doctype html><html><head><title>Members</title></head><body><h1>Members</h1>"
                f'<script src="{server.url}/embed.js" data-gpt="{members}" data-open="true" async></script></body></html>'
            )
            (folder / "refused.html").write_text(
                "<!doctype html><html><head><title>Other shop</title></head><body><h1>Other shop</h1>"
                f'<iframe id="plain" title="plain" src="{server.url}/embed/{refused}?site={host}" '
                'width="360" height="500"></iframe>'
                f'<script src="{server.url}/embed.js" data-gpt="{refused}" async></script></body></html>'
            )

            # a listed site: bubble -> chat -> streamed, then rendered answer
            context = browser.new_context(viewport={"width": 1200, "height": 800})
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{host}/allowed.html")
            bubble = page.get_by_role("button", name="Chat with Garden helper")
            expect(bubble).to_be_visible()
            expect(bubble).to_have_attribute("aria-expanded", "false")
            bubble.click()
            expect(bubble).to_have_attribute("aria-expanded", "true")
            chat = page.frame_locator("iframe[title='Chat with Garden helper']")
            expect(chat.get_by_text("Hello from the garden!")).to_be_visible()
            chat.get_by_role("button", name="When should I plant tulips?").click()
            answer = chat.locator(".msg.assistant:not(.streaming) .body p").last
            expect(answer).not_to_have_text("", timeout=120_000)
            expect(chat.locator(".msg.user")).to_have_text("When should I plant tulips?")
            # a typed message too
            chat.get_by_label("Your message").fill("And roses?")
            chat.get_by_role("button", name="Send").click()
            expect(chat.locator(".msg.assistant:not(.streaming) .body p")).to_have_count(2, timeout=120_000)
            # Escape inside the chat closes the panel and gives focus back to the bubble
            chat.get_by_label("Your message").press("Escape")
            expect(bubble).to_have_attribute("aria-expanded", "false")
            expect(bubble).to_be_focused()
            # phones: the panel fills the screen
            page.set_viewport_size({"width": 400, "height": 720})
            bubble.click()
            box = page.locator("iframe[title='Chat with Garden helper']").bounding_box()
            assert box is not None and box["width"] >= 399 and box["height"] >= 719
            context.close()

            # a site that is not listed: no bubble, and the browser refuses the frame
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(30_000)
            messages: list[str] = []
            page.on("console", lambda m: messages.append(m.text))
            page.goto(f"{host}/refused.html")
            expect(page.get_by_role("heading", name="Other shop")).to_be_visible()
            page.wait_for_function("() => [...document.querySelectorAll('iframe')].length === 1")
            for _ in range(100):  # until the script has asked for its settings and given up (at most 10 s)
                if any("not available on " + host in m for m in messages):
                    break
                page.wait_for_timeout(100)
            assert page.locator("[data-pgpt-widget]").count() == 0
            frame = page.frame_locator("#plain")
            assert frame.locator("#app").count() == 0
            plain = next(f for f in page.frames if f != page.main_frame)
            assert plain.url.startswith("chrome-error://")  # Chromium's page for a refused frame
            assert any("frame-ancestors" in m and "blocked" in m for m in messages), messages
            assert any("not available on " + host in m for m in messages), messages
            context.close()

            # a sign-in GPT: the pop-up signs Carol in at the provider and hands the token to the chat
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{host}/members.html")
            chat = page.frame_locator("iframe[title='Chat with Members helper']")  # data-open="true"
            with page.expect_popup() as opened:
                chat.get_by_role("button", name="Sign in").click()
            popup = opened.value
            popup.locator("input[name=sub]").fill("carol")
            popup.get_by_role("button", name="Authorize").click()
            popup.wait_for_event("close")
            expect(chat.get_by_label("Your message")).to_be_visible()
            chat.get_by_label("Your message").fill("Hello")
            chat.get_by_role("button", name="Send").click()
            expect(chat.locator(".msg.assistant:not(.streaming) .body p").last).not_to_have_text("", timeout=120_000)
            assert "pgpt-embed-token" not in page.content()  # nothing reached the host page
            context.close()

    svc = Services()
    try:
        (member_row,) = svc.embed_conversations(ME, members)
        assert (member_row.site, member_row.visitor, member_row.messages) == (host, "carol@client.example", 2)
        rows = svc.embed_conversations(ME, allowed)
        assert [(r.site, r.messages) for r in rows] == [(host, 4)]
        assert svc.embed_conversations(ME, refused) == []
    finally:
        svc.close()
