"""Safe rendering in a real browser: XSS payloads in a knowledge file, in the GPT's
description and starter, in a typed message and in the model's streamed answer (a
real OpenAI-compatible test server that echoes the message back, so the answer is
the payload) render inert on the creator's chat page and on a client's share page —
real app server, real ingest and retrieval, headless Chromium. No dialog opens, the
sentinel global stays unset, no script / event handler / javascript:, vbscript: or
data: link / remote image comes from the content, and the payloads show as text. The
safe stream (glue.stream_markdown, instead of st.write_stream) still stops on Stop."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from tests.support.openai_server import running_openai_server
from tests.support.server import running_app_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KNOWLEDGE = b"""Tulip care guide

Water tulips once a week in spring. Tulip bulbs rest in summer.
<script>window.__xss = 'knowledge script'</script>
<img src=x onerror="window.__xss = 'knowledge img'; alert(1)">
<svg onload="window.__xss = 'knowledge svg'"></svg>
[click me](javascript:window.__xss='knowledge link')
[data me](data:text/html,<script>alert(1)</script>)
<iframe src="javascript:window.__xss='knowledge iframe'"></iframe>
![pixel](https://tracker.example/knowledge.png)
"""

MESSAGE = (
    "How often should I water tulips? <script>window.__xss='msg script'</script> "
    "<img src=x onerror=\"window.__xss='msg img'\"> <svg onload=\"window.__xss='msg svg'\"> "
    "[click](javascript:window.__xss='msg link') [Click](JaVaScRiPt:alert(1)) "
    "[ent](&#106;avascript:window.__xss='msg entity') <javascript:window.__xss='msg autolink'> "
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) [vb](vbscript:msgbox(1)) "
    "![pixel](https://tracker.example/message.png) <iframe src=javascript:alert(1)></iframe> "
    "$\\href{javascript:window.__xss='maths'}{maths}$ <b onmouseover=alert(1)>bold</b>"
)

# Everything on the page that content could have turned into something live.
FINDINGS = r"""() => {
  const app = document.querySelector('[data-testid="stApp"]') || document.body;
  const bad = [];
  for (const s of document.querySelectorAll('script')) {
    if (/__xss|alert\(/.test(s.textContent) || /tracker|evil/.test(s.src)) bad.push('script ' + s.outerHTML.slice(0, 80));
  }
  for (const s of app.querySelectorAll('script, iframe, object, embed, frame')) bad.push(s.tagName + ' in the app');
  for (const e of app.querySelectorAll('*')) {
    for (const a of e.attributes) if (/^on/i.test(a.name)) bad.push(e.tagName + ' ' + a.name);
  }
  for (const a of app.querySelectorAll('[href], [src], [action], [formaction]')) {
    for (const name of ['href', 'src', 'action', 'formaction']) {
      const v = (a.getAttribute(name) || '').replace(/[\x00-\x20]/g, '').toLowerCase();
      if (/^(javascript|vbscript):/.test(v) || (/^data:/.test(v) && a.tagName !== 'IMG')) bad.push(a.tagName + ' ' + name + '=' + v);
    }
  }
  for (const i of app.querySelectorAll('img')) {
    const src = i.getAttribute('src') || '';
    if (src === 'x' || src.includes('tracker.example') || src.startsWith('data:image/svg')) bad.push('img ' + src);
  }
  return bad;
}"""


def watch(page) -> dict:
    """Dialogs, requests to the tracker and the sentinel, from before the first page loads."""
    seen = {"dialogs": [], "tracker": []}

    def on_dialog(dialog):
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("request", lambda r: seen["tracker"].append(r.url) if "tracker.example" in r.url else None)
    return seen


def assert_inert(page, seen: dict) -> None:
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.evaluate(FINDINGS) == []
    assert page.evaluate("() => window.__xss === undefined"), page.evaluate("() => String(window.__xss)")
    assert seen["dialogs"] == []
    assert seen["tracker"] == []  # no remote image was loaded (a tracking pixel)


def test_payloads_render_inert_on_chat_and_share_pages(home, tmp_path, browser):
    me = Principal.local()
    with running_openai_server(api_key="sk-xss-test") as model_server:
        svc = Services()  # the same home as the server below
        provider = svc.add_provider(me, name="Echo", base_url=model_server.base_url, model="echo",
                                    api_key="sk-xss-test")
        gpt = svc.create_gpt(me, spec={
            "name": "Garden helper",
            "description": "Tulips and more ![p](https://tracker.example/description.png) "
                           "[x](javascript:window.__xss='description')",
            "instructions": "You help with gardens.",
            "starters": ["Tulips? ![s](https://tracker.example/starter.png) [go](javascript:window.__xss='starter')"],
            "model": f"openai:{provider.id}",
        })
        svc.publish(me, gpt.id)
        slow = svc.add_provider(me, name="Slow echo", base_url=model_server.base_url, model="slow-echo",
                                api_key="sk-xss-test")
        stopper = svc.create_gpt(me, spec={"name": "Stopper", "instructions": "Echo.", "model": f"openai:{slow.id}"})
        svc.publish(me, stopper.id)
        svc.add_knowledge(me, gpt.id, [("tulip-care.txt", KNOWLEDGE)], run_jobs=False)  # the server reads it
        _, token = svc.create_share_link(me, gpt.id, public=True)

        with running_app_server(home, log_dir=tmp_path) as server:
            for _ in range(240):  # the server's job runner ingests the file (parse, chunk, embed)
                (kf,) = svc.list_knowledge(me, gpt.id)
                if kf.status in ("ready", "failed"):
                    break
                time.sleep(0.25)
            assert kf.status == "ready", kf.error

            # the creator's chat page: starters, a typed message, the streamed answer, the sources
            page = browser.new_context().new_page()
            page.set_default_timeout(60_000)
            seen = watch(page)
            page.goto(f"{server.url}/chat?gpt={gpt.id}")
            expect(page.get_by_role("heading", name="Garden helper")).to_be_visible()
            expect(page.get_by_role("button", name=re.compile(r"Tulips\?"))).to_be_visible()
            assert_inert(page, seen)
            box = page.locator("textarea[data-testid='stChatInputTextArea']")
            box.fill(MESSAGE)
            box.press("Enter")
            expect(page.get_by_role("button", name="Regenerate")).to_be_visible()
            messages = page.get_by_test_id("stChatMessage")
            expect(messages).to_have_count(2)
            for m in (messages.nth(0), messages.nth(1)):  # the message and its echo: payloads shown as text
                expect(m).to_contain_text("<script>window.__xss='msg script'</script>")
                expect(m).to_contain_text("[click](javascript:window.__xss='msg link')")
                expect(m).to_contain_text("<b onmouseover=alert(1)>bold</b>")
            page.get_by_text(re.compile(r"Sources \(\d\)")).click()
            expect(page.get_by_text("<script>window.__xss = 'knowledge script'</script>", exact=False).first).to_be_visible()
            expect(page.get_by_role("button", name=re.compile("How often should I water"))).to_be_visible()  # its title
            assert_inert(page, seen)
            page.context.close()

            # a client on the share link: description, starter, message and streamed answer
            client = browser.new_context().new_page()
            client.set_default_timeout(60_000)
            seen = watch(client)
            client.goto(f"{server.url}/s/{token}")
            expect(client.get_by_role("heading", name="Garden helper")).to_be_visible()
            assert_inert(client, seen)
            box = client.locator("textarea[data-testid='stChatInputTextArea']")
            box.fill(MESSAGE)
            box.press("Enter")
            messages = client.get_by_test_id("stChatMessage")
            expect(messages).to_have_count(2)
            expect(messages.nth(1)).to_contain_text("<script>window.__xss='msg script'</script>")
            expect(client.get_by_role("button", name=re.compile("How often should I water"))).to_be_visible()
            assert_inert(client, seen)
            client.context.close()

            # the safe stream still stops: the partial answer is saved as cancelled
            page = browser.new_context().new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{server.url}/chat?gpt={stopper.id}")
            box = page.locator("textarea[data-testid='stChatInputTextArea']")
            box.fill(" ".join(f"w{i}" for i in range(400)))  # echoed one word every 50 ms
            box.press("Enter")
            expect(page.get_by_test_id("stChatMessage").nth(1)).to_contain_text("w10")
            page.get_by_test_id("stChatInputStopButton").click()
            for _ in range(40):
                (conv,) = svc.list_conversations(me, stopper.id, source="chat")
                saved = svc.messages(me, conv.id)
                if len(saved) == 2:
                    break
                time.sleep(0.25)
            assert [m.role for m in saved] == ["user", "assistant"]
            assert saved[1].meta.get("finish_reason") == "cancelled"
            assert 10 <= len(saved[1].content.split()) < 400
            page.context.close()
        svc.close()
