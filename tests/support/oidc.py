"""OpenID Connect providers for tests, on 127.0.0.1, plus the secrets file that points at them.

* ``oidc_provider``: the real ``oidc-provider-mock`` (Authlib's provider code) in a thread,
  one per test session; ``mock_user(url, sub, **claims)`` sets who signs in.
* ``FakeIssuer``: a tiny discovery + JWKS + token server whose ID tokens the test shapes
  (wrong nonce/aud/iss, expired, alg=none) and which checks the PKCE verifier it receives.
* ``write_secrets`` / the ``oidc_secrets`` fixture: a Streamlit-format secrets.toml in the
  test's home, with PERSONAL_GPT_SECRETS pointing at it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import pytest

COOKIE_SECRET = "test-cookie-secret-" + "0123456789abcdef" * 2
REDIRECT_URI = "http://localhost/auth/callback"
CLIENT_ID = "personal-gpt-test"
CLIENT_SECRET = "test-client-secret"


@contextlib.contextmanager
def serve_wsgi(app) -> Iterator[str]:
    """Serve a WSGI app on a free 127.0.0.1 port in a thread; yields its base URL."""
    import werkzeug.serving

    server = werkzeug.serving.make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def running_mock_provider(**options) -> Iterator[str]:
    """oidc-provider-mock (nonce required by default); yields its issuer URL."""
    import authlib.deprecate  # first: on import it asks for its warnings "always"

    with warnings.catch_warnings():  # the mock itself still imports authlib.jose (deprecated)
        warnings.simplefilter("ignore", authlib.deprecate.AuthlibDeprecationWarning)
        import oidc_provider_mock

    options.setdefault("require_nonce", True)
    with serve_wsgi(oidc_provider_mock.app(**options)) as url:
        yield url


def mock_user(provider_url: str, sub: str, **claims) -> None:
    """Tell the mock provider which claims ``sub`` gets in its ID token."""
    response = httpx.put(f"{provider_url}/users/{quote(sub, safe='')}", json=claims, timeout=10)
    assert response.status_code == 204, response.text


def authorize_at_mock(authorization_url: str, sub: str) -> str:
    """Press "Authorize" on the mock provider's form as ``sub``; returns the callback URL."""
    response = httpx.post(authorization_url, data={"sub": sub}, timeout=10)
    assert response.status_code in (302, 303), response.text[:500]
    return response.headers["location"]


def toml_value(value) -> str:
    """A TOML literal for a string, number, list or (inline) table."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_secrets(
    path: Path,
    providers: Mapping[str, str | Mapping],
    *,
    redirect_uri: str = REDIRECT_URI,
    creators: list[str] | None = None,
    session_max_age_hours: float | None = None,
    unnamed: bool = False,
) -> Path:
    """A secrets.toml in Streamlit's format. ``providers``: name -> issuer URL (or a
    table of settings). ``unnamed``: the single provider's keys directly in [auth]."""
    lines = ["[auth]", f"redirect_uri = {json.dumps(redirect_uri)}", f"cookie_secret = {json.dumps(COOKIE_SECRET)}"]

    def table(settings: str | Mapping) -> list[str]:
        if isinstance(settings, str):
            settings = {"server_metadata_url": settings.rstrip("/") + "/.well-known/openid-configuration"}
        values = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **settings}
        return [f"{key} = {toml_value(value)}" for key, value in values.items()]

    if unnamed:
        (settings,) = providers.values()
        lines += table(settings)
    else:
        for name, settings in providers.items():
            lines += ["", f"[auth.{name}]", *table(settings)]
    lines += ["", "[personal_gpt]", f"creators = {json.dumps(creators or [])}"]
    if session_max_age_hours is not None:
        lines.append(f"session_max_age_hours = {session_max_age_hours}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- a provider whose ID tokens the test shapes ----------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict, header: dict | None = None) -> str:
    """A JWT with ``alg: none`` and an empty signature."""
    head = header or {"alg": "none", "typ": "JWT"}
    return f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}."


class FakeIssuer:
    """Discovery, JWKS, an authorize endpoint that answers at once, and a token endpoint
    returning an RS256 ID token built from ``claims`` (callable overrides per test)."""

    def __init__(self, key=None):
        from joserfc.jwk import RSAKey

        self.key = key or RSAKey.generate_key(2048, parameters={"kid": "test-key"}, private=True)
        self.url = ""
        self.subject = "fake-subject"
        self.claims: Callable[[dict], dict] = lambda claims: claims  # adjust the good claims
        self.token: Callable[[dict], str] | None = None  # replace the whole token
        self.advertised_issuer: str | None = None  # set to make discovery name another issuer
        self.pending: dict[str, dict] = {}
        self.pkce_ok: list[bool] = []
        self.client_auth: list[str] = []  # "basic" / "post" for each token request with the right credentials

    def sign(self, claims: dict, header: dict | None = None, key=None) -> str:
        from joserfc import jwt

        return jwt.encode(header or {"alg": "RS256", "kid": self.key.kid}, claims, key or self.key)

    def good_claims(self, nonce: str) -> dict:
        now = int(time.time())
        return {
            "iss": self.url, "sub": self.subject, "aud": CLIENT_ID, "iat": now, "exp": now + 300, "nonce": nonce,
            "email": "fake@client.example", "email_verified": True,
        }

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if path == "/.well-known/openid-configuration":
            return self._json(start_response, {
                "issuer": self.advertised_issuer or self.url,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code"],
            })
        if path == "/jwks":
            return self._json(start_response, {"keys": [self.key.as_dict(private=False)]})
        if path == "/authorize":
            code = secrets.token_urlsafe(16)
            self.pending[code] = {k: v[0] for k, v in query.items()}
            target = query["redirect_uri"][0] + "?" + urlencode({"code": code, "state": query["state"][0]})
            start_response("302 Found", [("Location", target)])
            return [b""]
        if path == "/token":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read(length).decode()).items()}
            basic = environ.get("HTTP_AUTHORIZATION", "")
            if basic.startswith("Basic ") and base64.b64decode(basic[6:]).decode() == f"{CLIENT_ID}:{CLIENT_SECRET}":
                self.client_auth.append("basic")
            elif (form.get("client_id"), form.get("client_secret")) == (CLIENT_ID, CLIENT_SECRET):
                self.client_auth.append("post")
            request = self.pending.pop(form.get("code", ""), None)
            if request is None:
                start_response("400 Bad Request", [("Content-Type", "application/json")])
                return [json.dumps({"error": "invalid_grant"}).encode()]
            challenge = b64url(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
            self.pkce_ok.append(challenge == request.get("code_challenge") and request.get("code_challenge_method") == "S256")
            claims = self.claims(self.good_claims(request.get("nonce", "")))
            id_token = self.token(claims) if self.token else self.sign(claims)
            return self._json(start_response, {"access_token": "at-" + secrets.token_hex(8), "token_type": "Bearer", "id_token": id_token})
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    @staticmethod
    def _json(start_response, data: dict):
        body = json.dumps(data).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


@contextlib.contextmanager
def running_fake_issuer() -> Iterator[FakeIssuer]:
    issuer = FakeIssuer()
    with serve_wsgi(issuer) as url:
        issuer.url = url
        yield issuer


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[str]:
    """The real mock provider for the whole run; its issuer URL (http://127.0.0.1:<port>)."""
    with running_mock_provider() as url:
        yield url


@pytest.fixture
def oidc_secrets(home, monkeypatch, oidc_provider) -> Path:
    """secrets.toml in the test's home naming the mock provider as ``mock``, with
    alice@client.example and @creators.example as creators; PERSONAL_GPT_SECRETS set."""
    path = write_secrets(home / "secrets.toml", {"mock": oidc_provider}, creators=["alice@client.example", "@creators.example"])
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
    return path


def callback_query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
