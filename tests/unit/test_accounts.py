"""Accounts in the services facade, on the real SQLite store: single-use login states
bound to a browser, sessions stored as SHA-256 only, people keyed by issuer + subject,
and who may create GPTs."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.errors import Forbidden, InvalidInput
from personal_gpt.services import Services
from personal_gpt.services_accounts import STATE_REFUSED
from personal_gpt.store import accounts
from personal_gpt.store.schema import login_states, sessions, users
from support.oidc import write_secrets

ISSUER_A = "https://issuer-a.example"
ISSUER_B = "https://issuer-b.example"
LINK_ID = "lnk_0123456789abcdef"


def browser() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def secrets_file(home, monkeypatch):
    path = write_secrets(
        home / "secrets.toml", {"a": ISSUER_A, "b": ISSUER_B},
        creators=["alice@client.example", "@creators.example"],
    )
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(path))
    return path


@pytest.fixture
def svc(secrets_file):
    services = Services()
    yield services
    services.close()


def claims(sub="alice", iss=ISSUER_A, **extra):
    return {"iss": iss, "sub": sub, "aud": "x", "email": "alice@client.example", "email_verified": False, **extra}


def count(svc, table) -> int:
    with svc.store.read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def db_bytes(svc) -> bytes:
    path = svc.settings.home / "personal-gpt.db"
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


# --- login states ---------------------------------------------------------------


def test_a_login_state_is_kept_hashed_and_handed_back_once(svc):
    me = browser()
    state, nonce, verifier = svc.begin_login("a", me, LINK_ID)
    assert len(state) >= 43 and len(nonce) >= 43 and 43 <= len(verifier) <= 128
    assert state.encode() not in db_bytes(svc)
    assert hashlib.sha256(state.encode()).hexdigest().encode() in db_bytes(svc)
    assert me.encode() not in db_bytes(svc)

    login = svc.finish_login(state, me)
    assert (login.provider, login.nonce, login.code_verifier, login.return_link_id) == ("a", nonce, verifier, LINK_ID)
    assert count(svc, login_states) == 0
    with pytest.raises(Forbidden, match="expired, was already used"):
        svc.finish_login(state, me)


def _expire(svc, state):
    with svc.store.tx() as conn:
        conn.execute(
            sa.update(login_states)
            .where(login_states.c.state_hash == hashlib.sha256(state.encode()).hexdigest())
            .values(created_at=datetime.now(timezone.utc) - timedelta(minutes=11))
        )


@pytest.mark.parametrize("case", ["missing", "none", "wrong", "reused", "other browser", "expired", "garbage", "huge"])
def test_bad_states_are_refused_and_create_nothing(svc, case):
    me = browser()
    state, _, _ = svc.begin_login("a", me)
    presented, presenter = state, me
    if case == "missing":
        presented = ""
    elif case == "none":
        presented = None
    elif case == "wrong":
        presented = secrets.token_urlsafe(32)
    elif case == "reused":
        svc.finish_login(state, me)
    elif case == "other browser":
        presenter = browser()
    elif case == "expired":
        _expire(svc, state)
    elif case == "garbage":
        presented = "../x' OR '1'='1"
    elif case == "huge":
        presented = "A" * 10_000
    with pytest.raises(Forbidden) as caught:
        svc.finish_login(presented, presenter)
    assert str(caught.value) == STATE_REFUSED
    assert count(svc, sessions) == 0 and count(svc, users) == 0
    if case in ("other browser", "expired"):
        # a presented state is spent whoever presented it: the right browser cannot use it later
        with pytest.raises(Forbidden):
            svc.finish_login(state, me)


def test_begin_login_checks_its_inputs(svc, monkeypatch, tmp_path):
    with pytest.raises(InvalidInput, match="no sign-in provider with that name"):
        svc.begin_login("nope", browser())
    for bad in ("", "short", "x" * 500, "bad browser id with spaces!!", None):
        with pytest.raises(InvalidInput, match="sign-in cookie is not valid"):
            svc.begin_login("a", bad)
    state, _, _ = svc.begin_login("a", (me := browser()), "../../etc/passwd")
    assert svc.finish_login(state, me).return_link_id is None  # a malformed link id is dropped

    monkeypatch.delenv("PERSONAL_GPT_SECRETS")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InvalidInput, match="Sign-in is not set up"):
        svc.begin_login("a", browser())


def test_old_login_states_are_swept(svc):
    old, _, _ = svc.begin_login("a", browser())
    _expire(svc, old)
    svc.begin_login("a", browser())
    assert count(svc, login_states) == 1


# --- sessions --------------------------------------------------------------------


def test_sign_in_records_the_person_and_stores_only_the_tokens_hash(svc):
    token = svc.sign_in(claims(name="Alice"), "a")
    assert token.startswith("pgsess_") and len(token) == 50
    raw = db_bytes(svc)
    assert token.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw

    principal, signed_in_at = svc.principal_for_session(token)
    assert principal == Principal(ISSUER_A, "alice", "alice@client.example", False, "Alice")
    assert abs(datetime.now(timezone.utc) - signed_in_at) < timedelta(minutes=1)
    with svc.store.read() as conn:
        row = conn.execute(sa.select(users)).one()
        session = conn.execute(sa.select(sessions)).one()
    assert (row.issuer, row.subject, row.email, row.email_verified) == (ISSUER_A, "alice", "alice@client.example", False)
    assert row.last_login_at is not None
    expires = session.expires_at.replace(tzinfo=timezone.utc) - session.created_at.replace(tzinfo=timezone.utc)
    assert expires == timedelta(hours=12)
    assert session.provider == "a"


def test_a_later_sign_in_refreshes_email_verification(svc):
    first = svc.sign_in(claims(), "a")
    second = svc.sign_in(claims(email_verified=True), "a")
    assert count(svc, users) == 1 and count(svc, sessions) == 2
    assert svc.principal_for_session(second)[0].email_verified
    assert svc.principal_for_session(first)[0].email_verified  # one person, one current record
    third = svc.sign_in(claims(email_verified="false"), "a")
    assert not svc.principal_for_session(third)[0].email_verified


def test_the_same_subject_from_two_issuers_is_two_people(svc):
    token_a = svc.sign_in(claims(sub="same", iss=ISSUER_A, email_verified=True), "a")
    token_b = svc.sign_in(claims(sub="same", iss=ISSUER_B, email="mallory@elsewhere.example", email_verified=True), "b")
    assert count(svc, users) == 2
    a, _ = svc.principal_for_session(token_a)
    b, _ = svc.principal_for_session(token_b)
    assert a.key == (ISSUER_A, "same") and b.key == (ISSUER_B, "same")
    assert a.email == "alice@client.example" and b.email == "mallory@elsewhere.example"
    with svc.store.read() as conn:
        ids = conn.execute(sa.select(sessions.c.user_id)).scalars().all()
    assert len(set(ids)) == 2


@pytest.mark.parametrize(
    "garbage",
    [None, "", "x", "pgsess_", "pgsess_" + "A" * 43, "pgsess_" + "A" * 42 + "\x00", "A" * 10_000,
     "pgsess_../../etc", "' OR 1=1 --", 42, b"pgsess_bytes", {"token": "x"}, ["pgsess_x"], "pgsess_" + "é" * 43,
     "pgs_" + "A" * 43, " pgsess_" + "A" * 43],
)
def test_anything_that_is_not_a_live_session_is_nobody(svc, garbage):
    svc.sign_in(claims(), "a")
    assert svc.principal_for_session(garbage) is None
    svc.sign_out(garbage)  # never raises either


def _age_session(svc, token, *, created=None, expires=None):
    values = {}
    if created is not None:
        values["created_at"] = created
    if expires is not None:
        values["expires_at"] = expires
    with svc.store.tx() as conn:
        conn.execute(
            sa.update(sessions)
            .where(sessions.c.token_hash == hashlib.sha256(token.encode()).hexdigest())
            .values(**values)
        )


def test_expired_and_signed_out_sessions_are_nobody(svc):
    expired = svc.sign_in(claims(), "a")
    _age_session(svc, expired, expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert svc.principal_for_session(expired) is None

    live = svc.sign_in(claims(), "a")
    assert svc.principal_for_session(live) is not None
    svc.sign_out(live)
    assert svc.principal_for_session(live) is None
    svc.sign_out(live)  # twice is fine


def test_a_lowered_max_age_ends_older_sessions(svc, secrets_file):
    token = svc.sign_in(claims(), "a")
    _age_session(svc, token, created=datetime.now(timezone.utc) - timedelta(hours=2))
    assert svc.principal_for_session(token) is not None  # within the 12 h it was given
    write_secrets(secrets_file, {"a": ISSUER_A, "b": ISSUER_B}, session_max_age_hours=1)
    assert svc.principal_for_session(token) is None


def test_sign_in_refuses_claims_without_an_identity(svc):
    for bad in ({}, {"iss": ISSUER_A}, {"sub": "x"}, {"iss": "", "sub": "x"}, {"iss": ISSUER_A, "sub": 5},
                {"iss": "local", "sub": "creator"}, {"iss": ISSUER_A, "sub": "x" * 501}, "not a mapping"):
        with pytest.raises(InvalidInput):
            svc.sign_in(bad, "a")
    assert count(svc, users) == 0 and count(svc, sessions) == 0


@pytest.mark.parametrize(
    "extra, verified",
    [
        ({"email_verified": True}, True),
        ({"email_verified": "true"}, True),
        ({"email_verified": False}, False),
        ({"email_verified": "false"}, False),
        ({"email_verified": 1}, False),
        ({"email_verified": None, "xms_edov": True}, False),  # present-but-null is not absent
        ({"xms_edov": True}, True),  # Microsoft Entra ID: domain verified by the tenant
        ({"xms_edov": False}, False),
        ({}, False),
        ({"email": None, "email_verified": True}, False),  # nothing to be verified
    ],
)
def test_what_counts_as_a_verified_email(svc, extra, verified):
    base = {"iss": ISSUER_A, "sub": "v", "email": "alice@client.example"}
    token = svc.sign_in({**base, **extra}, "a")
    assert svc.principal_for_session(token)[0].email_verified is verified


# --- creators --------------------------------------------------------------------


def test_creators_are_verified_listed_emails_when_sign_in_is_configured(svc):
    def principal(email, verified=True, iss=ISSUER_A):
        return Principal(iss, "s-" + email, email, verified)

    assert svc.is_creator(principal("alice@client.example"))
    assert svc.is_creator(principal("bob@creators.example"))
    assert not svc.is_creator(principal("alice@client.example", verified=False))
    assert not svc.is_creator(principal("x@evilexample.com"))
    assert not svc.is_creator(principal("bob@evilcreators.example"))
    assert not svc.is_creator(principal("bob@creators.example.evil.test"))
    assert not svc.is_creator(Principal.local())
    assert not svc.is_creator(Principal("local", "someone", "alice@client.example", True))
    assert not svc.is_creator("alice@client.example")

    token = svc.sign_in(claims(email_verified=True), "a")
    assert svc.is_creator(svc.principal_for_session(token)[0])
    unverified = svc.sign_in(claims(sub="other", email_verified=False), "a")
    assert not svc.is_creator(svc.principal_for_session(unverified)[0])


def test_without_sign_in_only_the_local_creator_creates(home, monkeypatch, tmp_path):
    monkeypatch.delenv("PERSONAL_GPT_SECRETS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.streamlit/secrets.toml of the machine's user
    services = Services()
    try:
        assert services.auth_config is None
        assert services.is_creator(Principal.local())
        assert not services.is_creator(Principal(ISSUER_A, "alice", "alice@client.example", True))
        assert services.principal_for_session("pgsess_" + "A" * 43) is None
        with pytest.raises(InvalidInput, match="Sign-in is not set up"):
            services.sign_in(claims(), "a")
    finally:
        services.close()


def test_repository_counts_agree(svc):
    svc.begin_login("a", browser())
    token = svc.sign_in(claims(), "a")
    with svc.store.read() as conn:
        assert accounts.count_login_states(conn) == 1
        assert accounts.count_sessions(conn) == 1
        found = accounts.session_identity(conn, hashlib.sha256(token.encode()).hexdigest())
        assert accounts.count_sessions(conn, found.user_id) == 1


def test_the_accounts_flow_on_postgresql(home, secrets_file, postgres_url):
    """Single-use states, the upsert and timezone-aware expiry on PostgreSQL too."""
    import uuid

    from personal_gpt.config import Settings

    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    services = Services(Settings(home=home, database_url=url))
    try:
        me = browser()
        state, nonce, _ = services.begin_login("a", me, LINK_ID)
        with pytest.raises(Forbidden):
            services.finish_login(state, browser())  # another browser spends it
        state, nonce, _ = services.begin_login("a", me, LINK_ID)
        assert services.finish_login(state, me).nonce == nonce
        with pytest.raises(Forbidden):
            services.finish_login(state, me)
        token_a = services.sign_in(claims(sub="same", email_verified=True), "a")
        token_b = services.sign_in(claims(sub="same", iss=ISSUER_B), "b")
        services.sign_in(claims(sub="same", email_verified=True), "a")  # the upsert path
        assert count(services, users) == 2
        principal, signed_in_at = services.principal_for_session(token_a)
        assert principal.key == (ISSUER_A, "same") and principal.email_verified
        assert signed_in_at.tzinfo is not None
        assert services.is_creator(principal)
        assert not services.principal_for_session(token_b)[0].email_verified
        services.sign_out(token_a)
        assert services.principal_for_session(token_a) is None
    finally:
        services.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
