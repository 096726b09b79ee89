"""The embed widget's HTTP routes: most cases on a Starlette app built from
``embed_routes()`` (+ ``auth_routes()``) with the real services (SQLite in the test's
home, the echo stand-in at the ChatModel seam); one test against the real app server
with the real bundled model (CSP, Origin, streamed answer, recorded site, 429). The
sign-in popup runs the real OpenID Connect flow against oidc-provider-mock."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.web import glue, oidc
from personal_gpt.web.embed_routes import VISITOR_HEADER, embed_routes, mint_token, return_path, return_ref
from personal_gpt.web.oidc import auth_routes
from support.oidc import authorize_at_mock, mock_user, oidc_provider, oidc_secrets  # noqa: F401 - fixtures
from tests.support.fake_model import EchoModel, FakeRegistry

ME = Principal.local()
SITE = "https://www.bloom.example"
OURS = "http://localhost"


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry(EchoModel()))
    monkeypatch.setattr(glue, "_services", s)
    oidc.clear_cache()
    yield s
    s.close()
    oidc.clear_cache()


@pytest.fixture
def client(svc):
    app = Starlette(routes=[*embed_routes(), *auth_routes(services=svc)])
    with TestClient(app, base_url=OURS, follow_redirects=False) as c:
        yield c


def make_gpt(svc, name="Bloom helper", sites=(SITE,), publish=True, **settings):
    g = svc.create_gpt(ME, spec={"name": name, "instructions": "SECRET-INSTRUCTIONS", "avatar": "🌸",
                                 "starters": ["What do you sell?"]})
    if publish:
        svc.publish(ME, g.id)
    if sites is not None:
        svc.save_embed_settings(ME, g.id, sites=list(sites), **settings)
    return g.id


def visitor(client, gpt_id, origin=OURS) -> dict:
    r = client.post(f"/embed/{gpt_id}/visitor", json={}, headers={"Origin": origin})
    assert r.status_code == 200, r.text
    return {VISITOR_HEADER: r.json()["visitor"], "Origin": origin}


def start(client, gpt_id, headers, site=SITE) -> str:
    r = client.post(f"/embed/{gpt_id}/conversations", json={"site": site}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["conversation"]


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def parsed_tags(html: str) -> list[tuple[str, list]]:
    """Every element of an HTML fragment with its attributes, as a browser's parser sees them."""
    from html.parser import HTMLParser

    found: list[tuple[str, list]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Collect().feed(html)
    return found


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()["error"]
    assert body["status"] == status and body["message"] and "Traceback" not in response.text
    return body


# --- the page and its headers -------------------------------------------------------------


def test_the_page_is_framed_only_by_the_listed_sites(svc, client):
    gpt_id = make_gpt(svc, sites=(SITE, "http://127.0.0.1:5500"))
    r = client.get(f"/embed/{gpt_id}?site={SITE}")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors https://www.bloom.example http://127.0.0.1:5500 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    # no inline script: every <script> has a src or is a JSON data block
    for tag in re.findall(r"<script[^>]*>", r.text):
        assert 'src="/embed-assets/' in tag or 'type="application/json"' in tag, tag
    assert "SECRET-INSTRUCTIONS" not in r.text and "Bloom helper" in r.text


def test_off_unknown_and_unpublished_get_the_same_refusal(svc, client):
    off = make_gpt(svc, name="Off", sites=None)
    emptied = make_gpt(svc, name="Emptied")
    svc.save_embed_settings(ME, emptied, sites="")
    draft = make_gpt(svc, name="Draft", publish=False)
    answers = []
    for gpt_id in (off, emptied, draft, "gpt_000000000000", "nonsense"):
        r = client.get(f"/embed/{gpt_id}")
        assert r.status_code == 404
        assert r.headers["content-security-policy"].endswith("frame-ancestors 'none'")
        answers.append(r.text)
        assert_json_error(client.get(f"/embed/{gpt_id}/config"), 404)
        assert_json_error(client.post(f"/embed/{gpt_id}/visitor", json={}, headers={"Origin": OURS}), 404)
    assert len(set(answers)) == 1 and "not available" in answers[0]


def test_names_cannot_break_out_of_the_config_block(svc, client):
    gpt_id = make_gpt(svc, name="</script><script>alert(1)</script>")
    r = client.get(f"/embed/{gpt_id}")
    assert "<script>alert(1)" not in r.text
    block = re.search(r'<script id="pgpt-config" type="application/json">(.*?)</script>', r.text).group(1)
    assert json.loads(block)["name"] == "</script><script>alert(1)</script>"


def test_embed_js_and_assets_are_served(client):
    r = client.get("/embed.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in r.text and "data-gpt" in r.text
    assert client.get("/embed-assets/embed-chat.js").status_code == 200
    assert client.get("/embed-assets/embed-chat.css").headers["content-type"].startswith("text/css")
    assert client.get("/embed-assets/../../services.py").status_code == 404
    assert client.get("/embed-assets/secrets.toml").status_code == 404


def test_widget_settings_are_shared_with_listed_sites_only(svc, client):
    gpt_id = make_gpt(svc, theme={"colour": "#ff8800", "position": "bottom-left"})
    r = client.get(f"/embed/{gpt_id}/widget.json", headers={"Origin": SITE})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == SITE
    assert r.json()["colour"] == "#ff8800" and r.json()["position"] == "bottom-left"
    for origin in ("https://evil.example", "https://bloom.example", "null", ""):
        r = client.get(f"/embed/{gpt_id}/widget.json", headers={"Origin": origin} if origin else {})
        assert r.status_code == 404 and "access-control-allow-origin" not in r.headers


# --- Origin and bodies ----------------------------------------------------------------------


def test_state_changing_calls_check_origin_and_site(svc, client):
    gpt_id = make_gpt(svc)
    for origin in ("https://evil.example", "https://bloom.example", "null"):
        body = assert_json_error(client.post(f"/embed/{gpt_id}/visitor", json={}, headers={"Origin": origin}), 403)
        assert body["code"] == "origin_not_allowed"
    assert_json_error(client.post(f"/embed/{gpt_id}/visitor", json={}), 403)  # no Origin at all
    headers = visitor(client, gpt_id)
    assert visitor(client, gpt_id, origin=SITE)  # the bubble's own site may call too
    for site in ("https://evil.example", "https://bloom.example", ""):
        r = client.post(f"/embed/{gpt_id}/conversations", json={"site": site}, headers=headers)
        assert_json_error(r, 403)
    conv = start(client, gpt_id, headers)
    r = client.post(f"/embed/{gpt_id}/chat", json={"conversation": conv, "message": "hi"},
                    headers={**headers, "Origin": "https://evil.example"})
    assert_json_error(r, 403)


def test_bad_bodies_get_their_status(svc, client):
    gpt_id = make_gpt(svc)
    headers = visitor(client, gpt_id)
    url = f"/embed/{gpt_id}/conversations"
    assert_json_error(client.post(url, content=b"site=x", headers={**headers, "Content-Type": "text/plain"}), 415)
    assert_json_error(client.post(url, content=b"{nope", headers={**headers, "Content-Type": "application/json"}), 400)
    assert_json_error(client.post(url, content=b"[1]", headers={**headers, "Content-Type": "application/json"}), 400)
    assert_json_error(client.post(url, json={}, headers=headers), 400)
    big = json.dumps({"site": SITE, "pad": "x" * 70_000}).encode()
    assert_json_error(client.post(url, content=big, headers={**headers, "Content-Type": "application/json"}), 413)
    no_visitor = {"Origin": OURS}
    assert_json_error(client.post(url, json={"site": SITE}, headers=no_visitor), 400)
    forged = {**headers, VISITOR_HEADER: headers[VISITOR_HEADER][:-2] + "xx"}
    assert_json_error(client.post(url, json={"site": SITE}, headers=forged), 400)
    conv = start(client, gpt_id, headers)
    chat = f"/embed/{gpt_id}/chat"
    assert_json_error(client.post(chat, json={"conversation": conv, "message": "   "}, headers=headers), 400)
    assert_json_error(client.post(chat, json={"conversation": conv, "message": 42}, headers=headers), 400)
    assert_json_error(client.post(chat, json={"conversation": "conv_0000000000000000", "message": "hi"},
                                  headers=headers), 404)
    assert_json_error(client.post(chat, json={"conversation": conv, "message": "x" * 5000}, headers=headers), 413)
    assert_json_error(client.post(chat, json={"conversation": conv, "message": "hi"},
                                  headers={**headers, "Authorization": "Bearer forged"}), 401)


# --- chat ---------------------------------------------------------------------------------------


def test_a_visitor_chats_and_the_answer_streams_then_renders_safely(svc, client):
    gpt_id = make_gpt(svc)
    headers = visitor(client, gpt_id)
    conv = start(client, gpt_id, headers)
    payload = "**Hi** <img src=x onerror=alert(1)> [x](javascript:alert(2))"
    r = client.post(f"/embed/{gpt_id}/chat", json={"conversation": conv, "message": payload}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    kinds = [k for k, _ in got]
    assert kinds.count("piece") >= 2 and kinds[-1] == "done"
    assert "".join(d["text"] for k, d in got if k == "piece") == "You said: " + payload
    html = got[-1][1]["html"]
    assert "<strong>Hi</strong>" in html
    tags = parsed_tags(html)
    assert {t for t, _ in tags} <= {"p", "strong", "a", "em", "code"} and ("img", []) not in tags
    for _tag, attrs in tags:
        assert not any(name.startswith("on") for name, _ in attrs)
        assert not any("javascript:" in (value or "").lower() for _, value in attrs)
    # the visitor's own history, and the creator's list with the site
    listed = client.get(f"/embed/{gpt_id}/conversations", headers=headers).json()["conversations"]
    assert [c["id"] for c in listed] == [conv]
    msgs = client.get(f"/embed/{gpt_id}/conversations/{conv}", headers=headers).json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["html"] == html
    other = visitor(client, gpt_id)
    assert_json_error(client.get(f"/embed/{gpt_id}/conversations/{conv}", headers=other), 404)
    (row,) = svc.embed_conversations(ME, gpt_id)
    assert (row.id, row.site, row.messages) == (conv, SITE, 2)


def test_rate_limit_answers_429_with_retry_after(svc, client):
    gpt_id = make_gpt(svc, limits={"per_visitor_minute": 1})
    headers = visitor(client, gpt_id)
    conv = start(client, gpt_id, headers)
    body = {"conversation": conv, "message": "one"}
    assert client.post(f"/embed/{gpt_id}/chat", json=body, headers=headers).status_code == 200
    r = client.post(f"/embed/{gpt_id}/chat", json={**body, "message": "two"}, headers=headers)
    error = assert_json_error(r, 429)
    assert 1 <= error["retry_after"] <= 60 and r.headers["retry-after"] == str(error["retry_after"])


def test_rotating_visitor_ids_does_not_escape_the_limits(svc):
    """SECURITY #33: a client that mints a new anonymous id for every message still meets the
    per-GPT daily limit (counted in the database) and the per-address limits (in memory)."""
    from personal_gpt.web.ratelimit import WindowLimiter

    gpt_id = make_gpt(svc, limits={"per_visitor_minute": 1, "per_gpt_day": 2})
    app = Starlette(routes=embed_routes(new_visitors=WindowLimiter(3, 60), messages=WindowLimiter(100, 60)))
    with TestClient(app, base_url=OURS) as client:
        sent = []
        for word in ("one", "two", "three"):
            headers = visitor(client, gpt_id)  # a fresh id each time
            conv = start(client, gpt_id, headers)
            sent.append(client.post(f"/embed/{gpt_id}/chat", json={"conversation": conv, "message": word},
                                    headers=headers))
        assert [r.status_code for r in sent[:2]] == [200, 200]
        assert "today" in assert_json_error(sent[2], 429)["message"]
        # a fourth id in the same minute from the same address is refused outright
        body = assert_json_error(client.post(f"/embed/{gpt_id}/visitor", json={}, headers={"Origin": OURS}), 429)
        assert 1 <= body["retry_after"] <= 60

    gpt2 = make_gpt(svc, name="Other", limits={"per_visitor_minute": 1})
    app = Starlette(routes=embed_routes(new_visitors=WindowLimiter(100, 60), messages=WindowLimiter(2, 60)))
    with TestClient(app, base_url=OURS) as client:
        codes = []
        for word in ("one", "two", "three"):
            headers = visitor(client, gpt2)
            conv = start(client, gpt2, headers)
            codes.append(client.post(f"/embed/{gpt2}/chat", json={"conversation": conv, "message": word},
                                     headers=headers).status_code)
        assert codes == [200, 200, 429]  # the address's own minute limit, whatever id it shows


# --- sign-in popup --------------------------------------------------------------------------------


def test_popup_signs_in_with_the_real_provider_and_hands_back_a_token(svc, client, oidc_secrets, oidc_provider):
    gpt_id = make_gpt(svc, policy="signin", domains=["client.example"])
    headers = visitor(client, gpt_id)
    r = client.post(f"/embed/{gpt_id}/conversations", json={"site": SITE}, headers=headers)
    assert assert_json_error(r, 401)["code"] == "sign_in"

    r = client.get(f"/embed/{gpt_id}/signin")
    assert r.status_code == 303 and r.headers["location"] == "/auth/login"
    assert return_ref(client.cookies) == "emb_" + gpt_id[4:]
    login = client.get("/auth/login")
    assert login.status_code == 303
    mock_user(oidc_provider, "carol", email="carol@client.example", email_verified=True, name="Carol")
    back = client.get(authorize_at_mock(login.headers["location"], "carol"))
    assert back.status_code == 303 and back.headers["location"] == f"/embed/{gpt_id}/signin"
    popup = client.get(back.headers["location"])
    assert popup.status_code == 200
    assert popup.headers["content-security-policy"].endswith("frame-ancestors 'none'")
    data = json.loads(re.search(r'<script id="pgpt-signin" type="application/json">(.*?)</script>', popup.text).group(1))
    assert data["type"] == "pgpt-embed-token" and data["gpt"] == gpt_id and data["origin"] == OURS
    assert return_ref(client.cookies) is None  # the way back is used once

    bearer = {**headers, "Authorization": f"Bearer {data['token']}"}
    conv = start(client, gpt_id, bearer)
    r = client.post(f"/embed/{gpt_id}/chat", json={"conversation": conv, "message": "hello"}, headers=bearer)
    assert events(r.text)[-1][0] == "done"
    assert svc.embed_conversations(ME, gpt_id)[0].visitor == "carol@client.example"
    # the token is bound to this GPT
    other = make_gpt(svc, name="Other", policy="signin")
    r = client.post(f"/embed/{other}/conversations", json={"site": SITE}, headers=bearer)
    assert_json_error(r, 401)


def test_popup_refuses_someone_not_on_the_list(svc, client, oidc_secrets, oidc_provider):
    gpt_id = make_gpt(svc, policy="signin", domains=["client.example"])
    client.get(f"/embed/{gpt_id}/signin")
    login = client.get("/auth/login")
    mock_user(oidc_provider, "mallory", email="mallory@elsewhere.example", email_verified=True)
    back = client.get(authorize_at_mock(login.headers["location"], "mallory"))
    popup = client.get(back.headers["location"])
    assert popup.status_code == 403 and "is not one of them" in popup.text and "pgpt-signin\"" not in popup.text


def test_popup_for_a_public_or_unknown_gpt_hands_out_nothing(svc, client):
    public = make_gpt(svc)
    for gpt_id in (public, "gpt_000000000000"):
        r = client.get(f"/embed/{gpt_id}/signin")
        assert r.status_code == 404 and "pgpt-signin\"" not in r.text


def test_return_targets_are_only_our_own_popup_path():
    assert return_path("emb_0123456789ab") == "/embed/gpt_0123456789ab/signin"
    for ref in (None, "shl_0123456789ab", "", "emb"):
        assert return_path(ref) is None or ref == "emb"
    from personal_gpt.web.cookies import sign

    for value in (sign("../../x", "embed-signin-return"), sign("gpt_0123456789ab", "visitor"), "garbage"):
        assert return_ref({"pgpt_embed_return": value}) is None


def test_tokens_expire_and_are_bound(svc):
    from datetime import datetime, timezone

    from personal_gpt.web.embed_routes import read_token

    who = Principal(issuer="https://idp.example", subject="carol", email="carol@client.example", email_verified=True)
    token = mint_token("gpt_0123456789ab", who, datetime.now(timezone.utc))
    principal, _at = read_token(token, "gpt_0123456789ab")
    assert principal == who
    assert read_token(token, "gpt_ffffffffffff") is None
    assert read_token(token[:-3] + "abc", "gpt_0123456789ab") is None


# --- the real app server, the real model ---------------------------------------------------------


@pytest.mark.slow
def test_real_server_embed_chat(home, tmp_path):
    from support.server import running_app_server

    s = Services()
    g = s.create_gpt(ME, name="Tiny helper")
    spec = g.spec.model_copy(update={
        "instructions": "Answer in one short sentence.",
        "generation": g.spec.generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 8}),
    })
    s.save_draft(ME, g.id, spec, g.revision)
    s.publish(ME, g.id)
    s.save_embed_settings(ME, g.id, sites=["http://127.0.0.1:5500"], limits={"per_visitor_minute": 1})
    s.close()
    with running_app_server(home, log_dir=tmp_path) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        page = http.get(f"/embed/{g.id}")
        assert page.status_code == 200
        assert "frame-ancestors http://127.0.0.1:5500 'self'" in page.headers["content-security-policy"]
        refused = http.post(f"/embed/{g.id}/visitor", json={}, headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
        ours = {"Origin": server.url}
        headers = {**ours, VISITOR_HEADER: http.post(f"/embed/{g.id}/visitor", json={}, headers=ours).json()["visitor"]}
        conv = http.post(f"/embed/{g.id}/conversations", json={"site": "http://127.0.0.1:5500"}, headers=headers)
        assert conv.status_code == 201, conv.text
        conv_id = conv.json()["conversation"]
        pieces = []
        with http.stream("POST", f"/embed/{g.id}/chat", json={"conversation": conv_id, "message": "Hello"},
                         headers=headers) as r:
            assert r.status_code == 200
            body = "".join(r.iter_text())
        got = events(body)
        pieces = [d["text"] for k, d in got if k == "piece"]
        assert pieces and got[-1][0] == "done" and got[-1][1]["html"].strip()
        again = http.post(f"/embed/{g.id}/chat", json={"conversation": conv_id, "message": "More"}, headers=headers)
        assert again.status_code == 429 and again.json()["error"]["retry_after"] >= 1
        assert http.get("/api/health").status_code == 200  # the server stays up
    s = Services()
    try:
        (row,) = s.embed_conversations(ME, g.id)
        assert row.site == "http://127.0.0.1:5500" and row.messages == 2
    finally:
        s.close()


def test_a_client_that_goes_away_stops_the_answer(home):
    """What the server does on disconnect: the event stream is closed after a piece; the
    generator is closed, and the partial answer is saved as cancelled."""
    import asyncio

    from personal_gpt.sharing import Visitor
    from personal_gpt.web.embed_routes import stream_reply

    model = EchoModel(delay=0.02)
    s = Services(models=FakeRegistry(model))
    try:
        gpt_id = make_gpt(s)
        who = Visitor(visitor_id="w" * 30)
        conv = s.start_embed_conversation(gpt_id, who, SITE)
        reply = s.send_embed(gpt_id, who, conv, " ".join(f"word{i}" for i in range(200)))

        async def read_one_then_leave() -> bytes:
            events_ = stream_reply(reply)
            first = await events_.__anext__()
            await events_.aclose()
            return first

        # in a thread of its own: a session-wide Playwright (the e2e tests) keeps an event loop
        # running in the main thread, where asyncio.run() refuses to start another
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(asyncio.run, read_one_then_leave()).result(timeout=120)
        assert first.startswith(b"event: piece")
        msgs = s.embed_visitor_messages(gpt_id, who, conv)
        assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].stopped
        assert len(msgs[1].content.split()) < 50  # stopped early, not run to the end
    finally:
        s.close()
