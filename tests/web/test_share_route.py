"""``GET /s/{token}`` on a Starlette app built from ``share_routes()`` with the real
services (SQLite in the test's home): one byte-identical "not available" answer for
every dead or bad token, a clean redirect with signed cookies for a live one, the
per-client limiter, and no token in any log line. SECURITY.md cases 22 and 26."""

from __future__ import annotations

import logging
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput
from personal_gpt.services import Services
from personal_gpt.store.schema import share_links
from personal_gpt.web import cookies, glue
from personal_gpt.web.share_routes import (
    LINK_COOKIE,
    VISITOR_COOKIE,
    FailureLimiter,
    share_routes,
    shared_link_id,
    visitor_id,
)

ALICE = Principal.local()


@pytest.fixture
def svc(home, monkeypatch):
    s = Services()
    monkeypatch.setattr(glue, "_services", s)
    yield s
    s.close()


@pytest.fixture
def client(svc):
    """The routes with a limiter loose enough for the scenario tables."""
    with TestClient(Starlette(routes=share_routes(FailureLimiter(limit=1000))), follow_redirects=False) as c:
        yield c


@pytest.fixture
def links(svc):
    """A live link, and one of each way a token can be dead."""
    gpt = svc.create_gpt(ALICE, name="Bloom helper")
    svc.publish(ALICE, gpt.id)
    live, live_token = svc.create_share_link(ALICE, gpt.id, public=True)
    revoked, revoked_token = svc.create_share_link(ALICE, gpt.id, public=True)
    svc.revoke_share_link(ALICE, revoked.id)
    expired, expired_token = svc.create_share_link(ALICE, gpt.id, public=True)
    with svc.store.tx() as conn:
        conn.execute(sa.update(share_links).where(share_links.c.id == expired.id)
                     .values(expires_at=datetime.now(timezone.utc) - timedelta(minutes=1)))
    gone = svc.create_gpt(ALICE, name="Deleted")
    svc.publish(ALICE, gone.id)
    _, deleted_token = svc.create_share_link(ALICE, gone.id, public=True)
    svc.delete_gpt(ALICE, gone.id)
    draft = svc.create_gpt(ALICE, name="Never published")
    _, unpublished_token = svc.create_share_link(ALICE, draft.id, public=True)
    return {
        "live": (live.id, live_token), "revoked": revoked_token, "expired": expired_token,
        "deleted": deleted_token, "unpublished": unpublished_token,
    }


def dead_paths(links) -> dict[str, str]:
    live = links["live"][1]
    return {
        "no token": "/s/",
        "random": "/s/pgs_" + "Q" * 43,
        "malformed": "/s/pgs_short",
        "tampered": "/s/" + live[:-1] + ("A" if live[-1] != "A" else "B"),
        "truncated": "/s/" + live[:-1],
        "extra slash": "/s/" + live + "/",
        "sub path": "/s/" + live + "/x",
        "sql": "/s/pgs_'%20OR%20'1'='1",
        "encoded traversal": "/s/..%2F..%2Fetc%2Fpasswd",
        "huge": "/s/" + "x" * 5000,
        "revoked": "/s/" + links["revoked"],
        "expired": "/s/" + links["expired"],
        "gpt deleted": "/s/" + links["deleted"],
        "unpublished": "/s/" + links["unpublished"],
    }


def test_every_dead_token_gets_the_same_bytes(client, links):
    answers = {}
    for name, path in dead_paths(links).items():
        r = client.get(path)
        answers[name] = (r.status_code, r.content, sorted(r.headers.items()))
        assert "set-cookie" not in r.headers, name
    assert len(set(map(repr, answers.values()))) == 1, {k: v[0] for k, v in answers.items()}
    status, body, headers = next(iter(answers.values()))
    assert status == 404 and b"This link is not available" in body
    assert dict(headers)["referrer-policy"] == "no-referrer" and dict(headers)["cache-control"] == "no-store"
    assert b"Bloom" not in body and b"gpt_" not in body and b"shl_" not in body


def _cookie(response, name: str) -> str:
    (line,) = [v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(name + "=")]
    return line


def test_a_live_token_becomes_a_cookie_and_a_clean_redirect(client, links, svc):
    link_id, token = links["live"]
    r = client.get(f"/s/{token}?next=https://evil.test/&return=//evil.test")
    assert r.status_code == 303 and r.headers["location"] == "/shared"
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["cache-control"] == "no-store"
    assert token not in r.text and token not in str(r.headers)
    link_cookie = _cookie(r, LINK_COOKIE).lower()
    for flag in ("httponly", "samesite=lax", "path=/", "max-age="):
        assert flag in link_cookie, link_cookie
    assert "secure" not in link_cookie  # plain http (a local install): a Secure cookie would never come back
    assert "httponly" in _cookie(r, VISITOR_COOKIE).lower()
    assert shared_link_id(r.cookies) == link_id
    first_visitor = visitor_id(r.cookies)
    assert first_visitor and len(first_visitor) >= 16
    opens = {x.id: x.opens for g in svc.list_gpts(ALICE) for x in svc.list_share_links(ALICE, g.id)}
    assert opens[link_id] == 1 and sum(opens.values()) == 1

    # the browser keeps its visitor id on the next visit; a forged one is replaced
    client.cookies.clear()
    again = client.get(f"/s/{token}", headers={"Cookie": f"{VISITOR_COOKIE}={r.cookies[VISITOR_COOKIE]}"})
    assert again.status_code == 303 and shared_link_id(again.cookies) == link_id
    assert VISITOR_COOKIE not in again.cookies
    client.cookies.clear()
    forged = client.get(f"/s/{token}", headers={"Cookie": f"{VISITOR_COOKIE}=forged-visitor-id-0123456789"})
    assert visitor_id(forged.cookies) not in (None, first_visitor)


@pytest.mark.parametrize("how", ["https", "forwarded"])
def test_cookies_are_secure_behind_https(svc, links, how):
    link_id, token = links["live"]
    base = "https://testserver" if how == "https" else "http://testserver"
    headers = {"X-Forwarded-Proto": "https"} if how == "forwarded" else {}
    with TestClient(Starlette(routes=share_routes()), base_url=base, follow_redirects=False) as c:
        r = c.get(f"/s/{token}", headers=headers)
    assert r.status_code == 303 and r.headers["location"] == "/shared"
    assert "; secure" in _cookie(r, LINK_COOKIE).lower() and "; secure" in _cookie(r, VISITOR_COOKIE).lower()


def test_tampered_or_misused_cookies_are_worthless(client, links):
    link_id, token = links["live"]
    r = client.get(f"/s/{token}")
    value = r.cookies[LINK_COOKIE]
    assert shared_link_id({LINK_COOKIE: value}) == link_id
    assert shared_link_id({LINK_COOKIE: value[:-2] + ("AA" if value[-2:] != "AA" else "BB")}) is None
    assert shared_link_id({LINK_COOKIE: cookies.sign(link_id, "visitor")}) is None  # signed for another purpose
    assert shared_link_id({LINK_COOKIE: link_id}) is None and shared_link_id({}) is None
    assert visitor_id({VISITOR_COOKIE: value}) is None


def test_failed_guesses_are_limited_per_client(svc, links):
    _, token = links["live"]
    client = TestClient(Starlette(routes=share_routes()), follow_redirects=False)  # the default limiter
    for i in range(10):
        assert client.get(f"/s/pgs_{'Z' * 42}{i}" if i % 2 else "/s/nonsense").status_code == 404
    blocked = client.get(f"/s/{token}")  # even a good token waits: the client is guessing
    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert b"Too many tries" in blocked.content and blocked.headers["cache-control"] == "no-store"
    assert LINK_COOKIE not in blocked.cookies


def test_the_limiter_forgets_after_its_window():
    clock = [1000.0]
    limiter = FailureLimiter(limit=3, window=60, clock=lambda: clock[0])
    for _ in range(3):
        assert limiter.retry_after("1.2.3.4") is None
        limiter.failed("1.2.3.4")
        clock[0] += 1
    assert limiter.retry_after("1.2.3.4") == 57
    assert limiter.retry_after("5.6.7.8") is None  # another client is not affected
    clock[0] += 57
    assert limiter.retry_after("1.2.3.4") is None
    small = FailureLimiter(limit=1, window=60, clock=lambda: clock[0], max_clients=2)
    for ip in ("a", "b", "c"):
        small.failed(ip)
    assert small.retry_after("a") is None and small.retry_after("c") == 60  # memory stays bounded


def test_no_token_in_the_logs(client, links, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    # an in-process uvicorn (or Streamlit) set up by another test may have reconfigured this logger:
    # propagation off, disabled, or a higher level
    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "propagate", True)
    monkeypatch.setattr(access, "disabled", False)
    caplog.set_level(logging.DEBUG, logger="uvicorn.access")
    _, token = links["live"]
    tokens = [token, links["revoked"], links["expired"]]
    for t in tokens:
        client.get(f"/s/{t}")
    logging.getLogger("uvicorn.access").info('%s - "GET %s HTTP/1.1" %d', "127.0.0.1", f"/s/{token}", 303)
    # the test's own HTTP client (httpx) logs the URL it requests; that is not the app's log
    app = [r for r in caplog.records if not r.name.startswith("httpx")]
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in app)
    assert "opened" in text and "pgs_[redacted]" in text and "not opened: revoked" in text
    for t in tokens:
        assert t not in text and t[4:] not in text


def test_the_cookie_secret(home, monkeypatch):
    monkeypatch.delenv(cookies.SECRET_ENV, raising=False)
    first = cookies.cookie_secret()
    path = home / "cookie_secret"
    assert path.read_text() == first and len(first) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert cookies.cookie_secret() == first
    signed = cookies.sign("shl_0123456789abcdef", "share-link")
    assert cookies.unsign(signed, "share-link", max_age=60) == "shl_0123456789abcdef"
    assert cookies.unsign(signed, "session", max_age=60) is None
    monkeypatch.setenv(cookies.SECRET_ENV, "e" * 40)
    assert cookies.cookie_secret() == "e" * 40
    assert cookies.unsign(signed, "share-link", max_age=60) is None  # another secret
    monkeypatch.setenv(cookies.SECRET_ENV, "too-short")
    with pytest.raises(InvalidInput, match="too short"):
        cookies.cookie_secret()


def test_trouble_on_our_side_is_a_friendly_503(client, links, monkeypatch, svc):
    from personal_gpt.errors import StoreError

    def broken(token):
        raise StoreError("Could not open the database at the configured database: check that it is running.")

    monkeypatch.setattr(svc, "open_share_token", broken)
    r = client.get("/s/" + links["live"][1])
    assert r.status_code == 503 and b"Something went wrong on our side" in r.content
    assert b"database" not in r.content and r.headers["retry-after"] == "60"


def test_rotating_a_link_shuts_out_browsers_that_opened_the_old_url(client, links, svc):
    from personal_gpt.web.share_routes import shared_link_ref

    link_id, token = links["live"]
    ref = shared_link_ref(client.get(f"/s/{token}").cookies)
    assert ref[0] == link_id and svc.share_link_current(*ref)
    _, new_token = svc.rotate_share_link(ALICE, link_id)
    assert not svc.share_link_current(*ref), "the old URL's cookie no longer admits"
    assert client.get(f"/s/{token}").status_code == 404
    fresh = shared_link_ref(client.get(f"/s/{new_token}").cookies)
    assert fresh[0] == link_id and svc.share_link_current(*fresh)
    assert not svc.share_link_current("../x", fresh[1]) and not svc.share_link_current(link_id, "short")
