"""Thumbs on widget answers over HTTP (``POST /embed/<gpt>/feedback``): the answer's id
comes with the streamed answer and the conversation's messages, a wrong Origin gets the
403 JSON refusal, another browser or a bad rating gets its JSON error, and a good call is
stored (and shown again with the conversation). Real services on SQLite, echo model."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.web import glue
from personal_gpt.web.embed_routes import VISITOR_HEADER, embed_routes
from tests.support.fake_model import FakeRegistry

ME = Principal.local()
SITE = "https://www.bloom.example"
OURS = "http://localhost"


@pytest.fixture
def svc(home, monkeypatch):
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "_services", s)
    yield s
    s.close()


@pytest.fixture
def client(svc):
    with TestClient(Starlette(routes=embed_routes()), base_url=OURS, follow_redirects=False) as c:
        yield c


def visitor(client, gpt_id) -> dict:
    r = client.post(f"/embed/{gpt_id}/visitor", json={}, headers={"Origin": OURS})
    assert r.status_code == 200, r.text
    return {VISITOR_HEADER: r.json()["visitor"], "Origin": OURS}


def ask(client, gpt_id, headers, text: str) -> tuple[str, int]:
    r = client.post(f"/embed/{gpt_id}/conversations", json={"site": SITE}, headers=headers)
    conv = r.json()["conversation"]
    r = client.post(f"/embed/{gpt_id}/chat", json={"conversation": conv, "message": text}, headers=headers)
    assert r.status_code == 200, r.text
    done = [json.loads(b.split("data: ", 1)[1]) for b in r.text.strip().split("\n\n") if b.startswith("event: done")]
    return conv, done[0]["id"]


@pytest.fixture
def widget(svc, client):
    g = svc.create_gpt(ME, spec={"name": "Bloom helper", "instructions": "Help."})
    svc.publish(ME, g.id)
    svc.save_embed_settings(ME, g.id, sites=[SITE])
    headers = visitor(client, g.id)
    conv, answer = ask(client, g.id, headers, "Do you deliver?")
    return g.id, headers, conv, answer


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json") and "Traceback" not in response.text
    return response.json()["error"]


def test_answers_carry_their_id_and_a_rating_is_stored(svc, client, widget):
    gpt_id, headers, conv, answer = widget
    assert isinstance(answer, int)
    r = client.post(f"/embed/{gpt_id}/feedback", headers={**headers, "Origin": SITE},
                    json={"conversation": conv, "message": answer, "rating": -1, "comment": "Not what I asked"})
    assert r.status_code == 200, r.text
    assert r.json() == {"message": answer, "rating": -1, "comment": "Not what I asked"}
    turn = svc.creator_conversation(ME, conv).turns[-1]
    assert (turn.id, turn.rating, turn.comment) == (answer, -1, "Not what I asked")
    shown = client.get(f"/embed/{gpt_id}/conversations/{conv}", headers=headers).json()["messages"]
    assert [(m["role"], m["rating"]) for m in shown] == [("user", None), ("assistant", -1)]
    assert shown[-1]["id"] == answer


def test_refusals(svc, client, widget):
    gpt_id, headers, conv, answer = widget
    body = {"conversation": conv, "message": answer, "rating": 1}
    assert error(client.post(f"/embed/{gpt_id}/feedback", json=body,
                             headers={**headers, "Origin": "https://evil.example"}), 403)["code"] == "origin_not_allowed"
    no_origin = {VISITOR_HEADER: headers[VISITOR_HEADER]}
    assert error(client.post(f"/embed/{gpt_id}/feedback", json=body, headers=no_origin), 403)
    other = visitor(client, gpt_id)  # another browser: not its conversation
    error(client.post(f"/embed/{gpt_id}/feedback", json=body, headers=other), 404)
    error(client.post(f"/embed/{gpt_id}/feedback", json={**body, "rating": 5}, headers=headers), 400)
    error(client.post(f"/embed/{gpt_id}/feedback", json={**body, "message": "1 OR 1=1"}, headers=headers), 400)
    error(client.post(f"/embed/{gpt_id}/feedback", json={**body, "message": answer - 1}, headers=headers), 404)
    error(client.post(f"/embed/{gpt_id}/feedback", json={**body, "comment": "x" * 1001}, headers=headers), 400)
    error(client.post(f"/embed/{gpt_id}/feedback", content=b"rating=1", headers=headers), 415)
    assert svc.creator_conversation(ME, conv).turns[-1].rating is None  # nothing was stored
    svc.save_embed_settings(ME, gpt_id, sites=[])  # the widget turned off
    error(client.post(f"/embed/{gpt_id}/feedback", json=body, headers=headers), 404)
    assert svc.creator_conversation(ME, conv).turns[-1].rating is None
