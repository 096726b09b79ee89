"""Sign-in end to end over HTTP: the /auth routes in a Starlette app, a real OpenID
provider (oidc-provider-mock) on 127.0.0.1, and a small issuer whose ID tokens the
test shapes. Covers SECURITY.md cases 20 and 27-30."""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from personal_gpt.services import Services
from personal_gpt.store.schema import login_states, sessions, users
from personal_gpt.web import oidc
from personal_gpt.web.oidc import SignInRejected, auth_routes, principal_from_cookies, validate_id_token
from support.oidc import (  # noqa: F401 - fixtures
    CLIENT_ID,
    REDIRECT_URI,
    authorize_at_mock,
    callback_query,
    mock_user,
    oidc_provider,
    oidc_secrets,
    running_fake_issuer,
    running_mock_provider,
    unsigned_token,
    write_secrets,
)
from support.server import free_port

ALICE = "alice@client.example"


@pytest.fixture(autouse=True)
def _fresh_cache():
    oidc.clear_cache()
    yield
    oidc.clear_cache()


@pytest.fixture
def svc(home):
    services = Services()
    yield services
    services.close()


def make_client(svc) -> TestClient:
    app = Starlette(routes=auth_routes(services=svc))
    return TestClient(app, base_url="http://localhost", follow_redirects=False)


def count(svc, table) -> int:
    with svc.store.read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def start_login(client: TestClient, **params) -> str:
    response = client.get("/auth/login", params=params)
    assert response.status_code == 303, response.text
    return response.headers["location"]


def sign_in_alice(client, provider_url, **claims) -> httpx.Response:
    mock_user(provider_url, ALICE, email=ALICE, name="Alice", **claims)
    location = start_login(client)
    return client.get(authorize_at_mock(location, ALICE))


def link_cookie(link_id: str) -> str:
    """A ``pgpt_link`` value as the share route sets it (link id + token fingerprint)."""
    from personal_gpt.web.cookies import sign

    return sign(f"{link_id}.{'0' * 16}", "share-link")


# --- the happy path against the real provider ---------------------------------------


def test_login_with_a_real_provider_gives_a_session_for_issuer_and_subject(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    mock_user(oidc_provider, ALICE, email=ALICE, email_verified=False, name="Alice")

    location = start_login(client)
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}" == oidc_provider
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["scope"] == "openid email profile"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
    browser_cookie = client.cookies.get("pgpt_browser")
    assert browser_cookie and browser_cookie not in location

    callback = authorize_at_mock(location, ALICE)
    assert callback.startswith(REDIRECT_URI + "?")
    response = client.get(callback)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith("pgpt_session=pgsess_")
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie and "Max-Age=43200" in set_cookie
    assert "Secure" not in set_cookie  # plain http on localhost

    principal, signed_in_at = principal_from_cookies(client.cookies, services=svc)
    assert principal.key == (oidc_provider, ALICE)
    assert principal.email == ALICE and principal.name == "Alice"
    assert principal.email_verified is False  # recorded as such: a verified-only share refuses it
    assert abs(datetime.now(timezone.utc) - signed_in_at) < timedelta(minutes=1)
    with svc.store.read() as conn:
        row = conn.execute(sa.select(users)).one()
    assert (row.issuer, row.subject, row.email_verified) == (oidc_provider, ALICE, False)
    assert count(svc, login_states) == 0

    me = client.get("/auth/me")
    assert me.status_code == 200 and me.json()["subject"] == ALICE


def test_https_sites_get_secure_cookies_and_a_base_path_is_kept(svc, home, monkeypatch, oidc_provider, caplog):
    caplog.set_level("DEBUG", logger="personal_gpt")
    path = write_secrets(home / "secrets.toml", {"mock": oidc_provider}, redirect_uri="https://localhost/base/auth/callback")
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
    client = TestClient(Starlette(routes=auth_routes(services=svc)), base_url="https://localhost", follow_redirects=False)
    mock_user(oidc_provider, ALICE, email=ALICE)
    login = client.get("/auth/login")
    assert login.status_code == 303 and "Secure" in login.headers["set-cookie"]
    callback = authorize_at_mock(login.headers["location"], ALICE)
    assert callback.startswith("https://localhost/base/auth/callback?")
    query = callback_query(callback)
    response = client.get("/auth/callback", params=query)  # the proxy strips /base
    assert response.status_code == 303 and response.headers["location"] == "/base/"
    cookie = response.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    token = client.cookies.get("pgpt_session")
    assert principal_from_cookies(client.cookies, services=svc)[0].subject == ALICE
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("personal_gpt", "httpx"))
    assert token not in logged and query["code"] not in logged and query["state"] not in logged


def test_verified_creator_email_makes_a_creator(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    assert sign_in_alice(client, oidc_provider, email_verified=True).status_code == 303
    principal, _ = principal_from_cookies(client.cookies, services=svc)
    assert principal.email_verified and svc.is_creator(principal)


def test_logout_ends_the_session_and_clears_the_cookie(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    sign_in_alice(client, oidc_provider)
    token = client.cookies.get("pgpt_session")
    for method in ("post", "get"):
        response = getattr(client, method)("/auth/logout")
        assert response.status_code == 303 and response.headers["location"] == "/"
    assert 'pgpt_session=""' in response.headers["set-cookie"] or "Max-Age=0" in response.headers["set-cookie"]
    assert svc.principal_for_session(token) is None
    assert principal_from_cookies({"pgpt_session": token}, services=svc) is None


def test_the_chooser_lists_providers_by_escaped_label(svc, home, monkeypatch, oidc_provider):
    path = write_secrets(home / "secrets.toml", {
        "mock": {"server_metadata_url": oidc_provider + "/.well-known/openid-configuration", "label": "Mock <b>&</b>"},
        "evil": {"server_metadata_url": oidc_provider + "/.well-known/openid-configuration",
                 "label": "<script>alert(1)</script>\"'"},
    })
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
    client = make_client(svc)
    page = client.get("/auth/login")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "Sign in with Mock &lt;b&gt;&amp;&lt;/b&gt;" in page.text
    assert 'href="login?provider=mock"' in page.text and 'href="login?provider=evil"' in page.text
    assert count(svc, login_states) == 0  # nothing stored until a provider is chosen
    assert client.get("/auth/login", params={"provider": "mock"}).status_code == 303
    unknown = client.get("/auth/login", params={"provider": "<img src=x onerror=alert(1)>"})
    assert unknown.status_code == 400 and "<img" not in unknown.text


# --- state (case 27) -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "wrong", "reused", "another browser", "no browser cookie"])
def test_bad_state_at_the_callback_creates_no_session(svc, oidc_secrets, oidc_provider, case):
    client = make_client(svc)
    mock_user(oidc_provider, ALICE, email=ALICE)
    callback = authorize_at_mock(start_login(client), ALICE)
    query = callback_query(callback)
    if case == "missing":
        response = client.get("/auth/callback", params={"code": query["code"]})
    elif case == "wrong":
        response = client.get("/auth/callback", params={"code": query["code"], "state": secrets.token_urlsafe(32)})
    elif case == "reused":
        assert client.get(callback).status_code == 303
        assert count(svc, sessions) == 1
        response = client.get(callback)
    elif case == "another browser":
        other = make_client(svc)
        start_login(other)  # the other browser has its own pgpt_browser cookie
        response = other.get(callback)
    else:
        client.cookies.delete("pgpt_browser")
        response = client.get(callback)
    assert response.status_code == 403
    assert "was started in another browser" in response.text and "Traceback" not in response.text
    assert "pgpt_session" not in response.headers.get("set-cookie", "")
    assert count(svc, sessions) == (1 if case == "reused" else 0)
    assert count(svc, users) == (1 if case == "reused" else 0)


def test_a_refusal_at_the_provider_creates_nothing_and_spends_the_state(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    location = start_login(client)
    denied = httpx.post(location, data={"action": "deny"}, timeout=10).headers["location"]
    assert callback_query(denied)["error"] == "access_denied"
    response = client.get(denied)  # the mock leaves the state out of its error answer
    assert response.status_code in (400, 403) and "Traceback" not in response.text
    assert count(svc, sessions) == 0

    state = parse_qs(urlsplit(start_login(client)).query)["state"][0]
    response = client.get("/auth/callback", params={"error": "access_denied", "state": state})
    assert response.status_code == 400 and "cancelled or refused" in response.text
    assert count(svc, sessions) == 0
    with svc.store.read() as conn:
        hashes = conn.execute(sa.select(login_states.c.state_hash)).scalars().all()
    assert hashlib.sha256(state.encode()).hexdigest() not in hashes


# --- ID-token claims (case 28) -----------------------------------------------------------


def _shape(issuer, case):
    if case == "wrong nonce":
        issuer.claims = lambda c: {**c, "nonce": "not-the-nonce-we-sent"}
    elif case == "no nonce":
        issuer.claims = lambda c: {k: v for k, v in c.items() if k != "nonce"}
    elif case == "wrong aud":
        issuer.claims = lambda c: {**c, "aud": "someone-else"}
    elif case == "aud list without us":
        issuer.claims = lambda c: {**c, "aud": ["someone-else", "third"]}
    elif case == "wrong iss":
        issuer.claims = lambda c: {**c, "iss": "https://evil.test"}
    elif case == "expired":
        issuer.claims = lambda c: {**c, "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}
    elif case == "issued in the future":
        issuer.claims = lambda c: {**c, "iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}
    elif case == "alg none":
        issuer.token = lambda c: unsigned_token(c)
    elif case == "alg none, signature kept":
        issuer.token = lambda c: unsigned_token(c) + issuer.sign(c).rsplit(".", 1)[1]
    elif case == "HS256 keyed with the public key":
        issuer.token = lambda c: hs256_token(c, issuer.key.as_pem(private=False), issuer.key.kid)
    elif case == "signed by another key":
        from joserfc.jwk import RSAKey

        stranger = RSAKey.generate_key(2048, parameters={"kid": issuer.key.kid}, private=True)
        issuer.token = lambda c: issuer.sign(c, key=stranger)
    elif case == "payload swapped":
        issuer.token = lambda c: (lambda good, bad: good.split(".")[0] + "." + bad.split(".")[1] + "." + good.split(".")[2])(
            issuer.sign(c), issuer.sign({**c, "sub": "admin"})
        )
    elif case == "no sub":
        issuer.claims = lambda c: {k: v for k, v in c.items() if k != "sub"}


def hs256_token(claims: dict, secret: bytes, kid: str) -> str:
    """The classic key-confusion forgery: HMAC keyed with the provider's public key."""
    import hmac as _hmac
    import json

    from support.oidc import b64url

    signing_input = b64url(json.dumps({"alg": "HS256", "kid": kid}).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = _hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


CLAIM_CASES = [
    "wrong nonce", "no nonce", "wrong aud", "aud list without us", "wrong iss", "expired", "issued in the future",
    "alg none", "alg none, signature kept", "HS256 keyed with the public key", "signed by another key",
    "payload swapped", "no sub",
]


@pytest.fixture
def fake_issuer(home, monkeypatch):
    with running_fake_issuer() as issuer:
        path = write_secrets(home / "secrets.toml", {"fake": issuer.url}, creators=["fake@client.example"])
        monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
        yield issuer


def test_a_well_formed_token_from_the_fake_issuer_signs_in_with_pkce(svc, fake_issuer):
    client = make_client(svc)
    callback = httpx.get(start_login(client)).headers["location"]
    response = client.get(callback)
    assert response.status_code == 303, response.text
    assert fake_issuer.pkce_ok == [True]  # the verifier we sent matches the S256 challenge
    assert fake_issuer.client_auth == ["basic"]
    principal, _ = principal_from_cookies(client.cookies, services=svc)
    assert principal.key == (fake_issuer.url, "fake-subject") and svc.is_creator(principal)


def test_client_secret_post_when_configured(svc, fake_issuer, home):
    write_secrets(home / "secrets.toml", {"fake": {
        "server_metadata_url": fake_issuer.url + "/.well-known/openid-configuration",
        "client_kwargs": {"token_endpoint_auth_method": "client_secret_post", "prompt": "login"},
    }})
    client = make_client(svc)
    location = start_login(client)
    assert callback_query(location)["prompt"] == "login"
    assert client.get(httpx.get(location).headers["location"]).status_code == 303
    assert fake_issuer.client_auth == ["post"]


@pytest.mark.parametrize("case", CLAIM_CASES)
def test_a_bad_id_token_at_the_callback_creates_no_session(svc, fake_issuer, case):
    _shape(fake_issuer, case)
    client = make_client(svc)
    callback = httpx.get(start_login(client)).headers["location"]
    response = client.get(callback)
    assert response.status_code == 400, (case, response.text)
    assert "could not be verified" in response.text and "Traceback" not in response.text
    assert "pgpt_session" not in response.headers.get("set-cookie", "")
    assert count(svc, sessions) == 0 and count(svc, users) == 0


_SIGN = object()


def _direct(fake, claims=None, token=_SIGN, **kwargs):
    from joserfc.jwk import KeySet

    nonce = "n-" + secrets.token_urlsafe(16)
    good = {**fake.good_claims(nonce), **(claims or {})}
    params = dict(keys=KeySet([fake.key]), issuer=fake.url, client_id=CLIENT_ID, nonce=nonce)
    params.update(kwargs)
    return validate_id_token(fake.sign(good) if token is _SIGN else token, **params)


def test_validate_id_token_directly():
    from support.oidc import FakeIssuer

    fake = FakeIssuer()
    fake.url = "https://issuer.example"
    assert _direct(fake)["sub"] == "fake-subject"  # the control passes
    assert _direct(fake, {"aud": ["other", CLIENT_ID], "azp": CLIENT_ID})["sub"] == "fake-subject"
    now = int(time.time())
    assert _direct(fake, {"exp": now - 30, "iat": now - 300})  # inside the 60 s clock leeway
    refused = [
        dict(claims={"nonce": "other"}),
        dict(claims={"aud": "other"}),
        dict(claims={"aud": ["other", CLIENT_ID]}),  # several audiences and no azp
        dict(claims={"aud": ["other", CLIENT_ID], "azp": "other"}),
        dict(claims={"iss": "https://issuer.example/"}),  # exact, not "close enough"
        dict(claims={"exp": now - 120, "iat": now - 600}),
        dict(claims={"exp": "never"}),
        dict(token=unsigned_token({**fake.good_claims("x")})),
        dict(token=unsigned_token({**fake.good_claims("x")}, header={"alg": "None"})),
        dict(token="not.a.jwt"),
        dict(token="a.b.c.d.e"),
        dict(token=""),
        dict(token=None),
        dict(token="x" * 20_000),
        dict(algorithms=["RS384"]),  # the provider says it signs with RS384 only
        dict(algorithms=["none", "HS256"]),
    ]
    for case in refused:
        with pytest.raises(SignInRejected):
            kwargs = dict(case)
            _direct(fake, kwargs.pop("claims", None), kwargs.pop("token", _SIGN), **kwargs)
    with pytest.raises(SignInRejected):
        _direct(fake, nonce="")  # we always send a nonce; an empty one is a bug


# --- two issuers (case 30) ---------------------------------------------------------------


def test_the_same_subject_from_two_real_providers_is_two_people(svc, home, monkeypatch, oidc_provider):
    with running_mock_provider() as second:
        path = write_secrets(home / "secrets.toml", {"one": oidc_provider, "two": second})
        monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
        found = []
        for name, url in (("one", oidc_provider), ("two", second)):
            client = make_client(svc)
            mock_user(url, "same-subject", email=ALICE, email_verified=True)
            callback = authorize_at_mock(start_login(client, provider=name), "same-subject")
            assert client.get(callback).status_code == 303
            found.append(principal_from_cookies(client.cookies, services=svc)[0])
    assert [p.key for p in found] == [(oidc_provider, "same-subject"), (second, "same-subject")]
    assert count(svc, users) == 2


# --- where a login returns to (case 29) ------------------------------------------------------


def test_a_login_started_from_a_share_link_returns_to_the_shared_page(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    client.cookies.set("pgpt_link", link_cookie("shl_0123456789abcdef"))
    response = sign_in_alice(client, oidc_provider)
    assert response.status_code == 303 and response.headers["location"] == "/shared"


@pytest.mark.parametrize(
    "target",
    ["//evil.test", "https://evil.test", "/\\evil.test", "%2F%2Fevil.test", "javascript:alert(1)", "/shared"],
)
def test_return_targets_in_the_url_are_ignored(svc, oidc_secrets, oidc_provider, target):
    names = ("next", "return_to", "redirect", "redirect_uri", "return", "state_next")
    client = make_client(svc)
    mock_user(oidc_provider, ALICE, email=ALICE)
    location = start_login(client, **{name: target for name in names})
    assert location.startswith(oidc_provider + "/oauth2/authorize?")
    assert parse_qs(urlsplit(location).query)["redirect_uri"] == [REDIRECT_URI]
    callback = authorize_at_mock(location, ALICE)
    # the same parameters tacked onto the callback are ignored as well
    response = client.get(callback + "&" + str(httpx.QueryParams({name: target for name in names})))
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_a_forged_or_foreign_link_cookie_is_no_return_target(svc, oidc_secrets, oidc_provider):
    from personal_gpt.web.cookies import sign

    for value in ("shl_0123456789abcdef", sign("shl_0123456789abcdef", "visitor"), link_cookie("../../x"), "garbage"):
        client = make_client(svc)
        client.cookies.set("pgpt_link", value)
        response = sign_in_alice(client, oidc_provider)
        assert response.status_code == 303 and response.headers["location"] == "/", value


# --- sessions over HTTP (case 20) ------------------------------------------------------------


def test_a_route_that_needs_a_session_answers_401_with_no_data(svc, oidc_secrets, oidc_provider):
    client = make_client(svc)
    sign_in_alice(client, oidc_provider)
    good = client.cookies.get("pgpt_session")
    expired = good
    with svc.store.tx() as conn:
        conn.execute(
            sa.update(sessions)
            .where(sessions.c.token_hash == hashlib.sha256(expired.encode()).hexdigest())
            .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        )
    for value in (None, "", "pgsess_" + "A" * 43, expired, "garbage\x7f", "x" * 5000, "pgs_" + "B" * 43):
        anonymous = make_client(svc)
        if value is not None:
            anonymous.cookies.set("pgpt_session", value)
        response = anonymous.get("/auth/me")
        assert response.status_code == 401
        assert response.json() == {"error": oidc.NOT_SIGNED_IN}
        assert ALICE not in response.text and oidc_provider not in response.text
        assert principal_from_cookies(anonymous.cookies, services=svc) is None


def test_principal_from_cookies_takes_any_mapping_and_garbage(svc, oidc_secrets):
    for cookies in ({}, {"pgpt_session": None}, {"pgpt_session": 5}, {"other": "x"}, {"pgpt_session": "pgsess_\n"}):
        assert principal_from_cookies(cookies, services=svc) is None


# --- the provider is down or misconfigured ---------------------------------------------------


def test_an_unreachable_provider_gets_a_friendly_page(svc, home, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(write_secrets(home / "secrets.toml", {"down": dead})))
    client = make_client(svc)
    response = client.get("/auth/login")
    assert response.status_code == 503
    assert "cannot be reached right now" in response.text
    assert "Traceback" not in response.text and "ConnectError" not in response.text and dead not in response.text
    assert count(svc, login_states) == 0


def test_a_provider_that_dies_between_login_and_callback(svc, home, monkeypatch):
    with running_fake_issuer() as issuer:
        monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(write_secrets(home / "secrets.toml", {"fake": issuer.url})))
        client = make_client(svc)
        callback = httpx.get(start_login(client)).headers["location"]
        oidc.clear_cache()
    response = client.get(callback)  # the issuer is gone now
    assert response.status_code == 503 and "cannot be reached" in response.text
    assert count(svc, sessions) == 0


@pytest.mark.parametrize("advertised", ["https://accounts.google.com", "{url}/other", "{url}/tenant/{{tenantid}}"])
def test_a_discovery_document_naming_another_issuer_is_refused(svc, fake_issuer, advertised):
    fake_issuer.advertised_issuer = advertised.format(url=fake_issuer.url)
    response = make_client(svc).get("/auth/login")
    assert response.status_code == 503 and "settings are incomplete" in response.text
    assert count(svc, login_states) == 0


def test_a_broken_or_missing_configuration_is_a_page_not_a_crash(svc, home, monkeypatch, tmp_path):
    broken = home / "secrets.toml"
    broken.write_text("[auth]\nredirect_uri = \"nope\"\n")
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(broken))
    client = make_client(svc)
    for path in ("/auth/login", "/auth/callback?state=x&code=y"):
        response = client.get(path)
        assert response.status_code == 503 and "settings are incomplete" in response.text
        assert "nope" not in response.text
    assert client.get("/auth/me").status_code == 503
    assert client.get("/auth/logout").status_code == 303

    monkeypatch.delenv("PERSONAL_GPT_SECRETS")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    response = client.get("/auth/login")
    assert response.status_code == 503 and "not set up" in response.text
    assert principal_from_cookies({"pgpt_session": "pgsess_" + "A" * 43}, services=svc) is None


def test_an_unforeseen_failure_is_a_friendly_page_not_a_500(svc, oidc_secrets, oidc_provider, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("database exploded at /srv/secret/path")

    client = make_client(svc)
    monkeypatch.setattr(svc, "begin_login", broken)
    monkeypatch.setattr(svc, "principal_for_session", broken)
    response = client.get("/auth/login")
    assert response.status_code == 503 and "not available right now" in response.text
    assert "exploded" not in response.text and "Traceback" not in response.text
    client.cookies.set("pgpt_session", "pgsess_" + "A" * 43)
    me = client.get("/auth/me")
    assert me.status_code == 503 and "exploded" not in me.text
