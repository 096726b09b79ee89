"""Share links, the pure part: tokens, the access decision as one table, and the
checks of what a creator types. No database, no HTTP (SECURITY.md cases 21, 22, 24)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from personal_gpt.auth import Principal
from personal_gpt.errors import InvalidInput
from personal_gpt.sharing import (
    NOT_AVAILABLE,
    LinkFacts,
    Visitor,
    check_base_url,
    decide,
    expiry_label,
    hash_token,
    link_url,
    looks_like_token,
    new_token,
    normalise_domains,
    normalise_emails,
    normalise_expiry,
    normalise_label,
    normalise_quota,
    parse_expiry_date,
    redact_tokens,
    visitor_email,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
AGE = timedelta(hours=12)

# --- tokens -----------------------------------------------------------------------


def test_tokens_are_unique_prefixed_long_and_url_safe():
    tokens = [new_token() for _ in range(100)]
    assert len(set(tokens)) == 100
    for t in tokens:
        assert t.startswith("pgs_")
        body = t.removeprefix("pgs_")
        assert len(body) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", body)
        assert looks_like_token(t)
    # 100 tokens x 43 base64 characters: every position varies (no fixed padding or counter)
    assert all(len({t[i] for t in tokens}) > 10 for i in range(4, 47))


def test_hash_is_sha256_hex():
    t = new_token()
    assert hash_token(t) == hashlib.sha256(t.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_token(t)) and hash_token(t) != hash_token(new_token())


_GOOD = "pgs_" + "Ab0_-" * 8 + "xyz"  # 43 characters after the prefix


@pytest.mark.parametrize(
    "value",
    [
        _GOOD[:-1],  # truncated
        _GOOD + "a",  # one too many
        "pgx_" + _GOOD[4:],  # other prefix
        "PGS_" + _GOOD[4:],
        _GOOD[:-1] + "=",  # padding
        _GOOD[:-1] + "+",  # standard base64
        _GOOD[:-1] + "/",
        _GOOD[:-1] + "%",
        " " + _GOOD,
        _GOOD + "\n",
        _GOOD[:-1] + "é",
        "",
        "pgs_",
        "../../etc/passwd",
        "pgs_' OR '1'='1",
        "x" * 10_000,
        None,
        42,
        _GOOD.encode(),
    ],
)
def test_malformed_tokens_are_refused_before_any_lookup(value):
    assert looks_like_token(_GOOD)
    assert looks_like_token(value) is False


def test_redact_tokens_in_log_lines():
    t = new_token()
    line = f'127.0.0.1 - "GET /s/{t} HTTP/1.1" 303'
    assert t not in redact_tokens(line) and "/s/pgs_[redacted]" in redact_tokens(line)


def test_link_url():
    t = new_token()
    assert link_url(t, "https://gpts.example.com/") == f"https://gpts.example.com/s/{t}"
    assert link_url(t, "http://localhost:8501") == f"http://localhost:8501/s/{t}"
    for bad in ("gpts.example.com", "ftp://x.example", "https://x.example/?a=1", "javascript:alert(1)", ""):
        with pytest.raises(InvalidInput, match="base URL must be the app's address"):
            check_base_url(bad)
    with pytest.raises(InvalidInput, match="not a share token"):
        link_url("pgs_short", "https://x.example")


# --- the decision, as a table --------------------------------------------------------------


def person(email: str, verified: bool = True, signed_in: timedelta | None = timedelta(minutes=5),
           issuer: str = "https://idp.example") -> Visitor:
    p = Principal(issuer=issuer, subject=f"sub-{email}", email=email, email_verified=verified)
    return Visitor(p, None if signed_in is None else NOW - signed_in)


VISITORS = {
    "anonymous": Visitor(),
    "anonymous+cookie": Visitor(visitor_id="v" * 32),
    "alice": person("alice@example.com"),
    "alice-unverified": person("alice@example.com", verified=False),
    "alice-uppercase": person("ALICE@Example.COM"),
    "bob-same-domain": person("bob@example.com"),
    "evilexample": person("alice@evilexample.com"),
    "suffix-trick": person("alice@example.com.evil.test"),
    "subdomain": person("alice@mail.example.com"),
    "homoglyph": person("alice@ex\u0430mple.com"),  # Cyrillic a
    "no-email": Visitor(Principal(issuer="https://idp.example", subject="x", email=None, email_verified=True), NOW),
    "malformed-email": person("alice@@example.com"),
    "old-session": person("alice@example.com", signed_in=timedelta(hours=12)),
    "almost-old": person("alice@example.com", signed_in=timedelta(hours=11, minutes=59)),
    "no-sign-in-time": person("alice@example.com", signed_in=None),
}

LINKS = {
    "public": LinkFacts("shl_0000000000000001", "gpt_000000000001", "public", gpt_published=True),
    "signin": LinkFacts("shl_0000000000000002", "gpt_000000000001", "signin", gpt_published=True),
    "signin-email": LinkFacts("shl_0000000000000003", "gpt_000000000001", "signin",
                              allowed_emails=("alice@example.com",), gpt_published=True),
    "signin-domain": LinkFacts("shl_0000000000000004", "gpt_000000000001", "signin",
                               allowed_domains=("example.com",), gpt_published=True),
}

ALLOW = ("allow", "")
SIGN_IN = ("sign_in", "not_signed_in")
TOO_OLD = ("sign_in", "session_too_old")
UNVERIFIED = ("denied", "unverified_email")
NOT_ON_LIST = ("denied", "not_on_list")

# link kind -> visitor -> expected (outcome, reason) on a live link
TABLE = {
    "public": {v: ALLOW for v in VISITORS},
    "signin": {
        "anonymous": SIGN_IN, "anonymous+cookie": SIGN_IN, "alice": ALLOW, "alice-unverified": UNVERIFIED,
        "alice-uppercase": ALLOW, "bob-same-domain": ALLOW, "evilexample": ALLOW, "suffix-trick": ALLOW,
        "subdomain": ALLOW, "homoglyph": ALLOW, "no-email": UNVERIFIED, "malformed-email": ALLOW,
        "old-session": TOO_OLD, "almost-old": ALLOW, "no-sign-in-time": TOO_OLD,
    },
    "signin-email": {
        "anonymous": SIGN_IN, "anonymous+cookie": SIGN_IN, "alice": ALLOW, "alice-unverified": UNVERIFIED,
        "alice-uppercase": ALLOW, "bob-same-domain": NOT_ON_LIST, "evilexample": NOT_ON_LIST,
        "suffix-trick": NOT_ON_LIST, "subdomain": NOT_ON_LIST, "homoglyph": NOT_ON_LIST, "no-email": UNVERIFIED,
        "malformed-email": NOT_ON_LIST, "old-session": TOO_OLD, "almost-old": ALLOW, "no-sign-in-time": TOO_OLD,
    },
    "signin-domain": {
        "anonymous": SIGN_IN, "anonymous+cookie": SIGN_IN, "alice": ALLOW, "alice-unverified": UNVERIFIED,
        "alice-uppercase": ALLOW, "bob-same-domain": ALLOW, "evilexample": NOT_ON_LIST,
        "suffix-trick": NOT_ON_LIST, "subdomain": NOT_ON_LIST, "homoglyph": NOT_ON_LIST, "no-email": UNVERIFIED,
        "malformed-email": NOT_ON_LIST, "old-session": TOO_OLD, "almost-old": ALLOW, "no-sign-in-time": TOO_OLD,
    },
}

AUDIENCE_CASES = [(lk, v, *TABLE[lk][v]) for lk in TABLE for v in VISITORS]


def test_the_table_covers_every_link_and_visitor():
    assert all(set(row) == set(VISITORS) for row in TABLE.values()) and set(TABLE) == set(LINKS)


@pytest.mark.parametrize("link_kind, visitor, outcome, reason", AUDIENCE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in AUDIENCE_CASES])
def test_audience(link_kind, visitor, outcome, reason):
    d = decide(LINKS[link_kind], VISITORS[visitor], NOW, max_session_age=AGE)
    assert (d.outcome, d.reason) == (outcome, reason)
    assert d.allowed is (outcome == "allow") and not d.not_available
    assert (d.message == "") is (outcome == "allow")


# Link states override the audience: for every link kind and every visitor, the state wins.
STATES = {
    "expired": (dict(expires_at=NOW - timedelta(seconds=1)), ("denied", "expired")),
    "expires-this-instant": (dict(expires_at=NOW), ("denied", "expired")),
    "revoked": (dict(revoked_at=NOW - timedelta(days=1)), ("denied", "revoked")),
    "revoked-and-expired": (dict(revoked_at=NOW, expires_at=NOW - timedelta(days=1)), ("denied", "revoked")),
    "unpublished": (dict(gpt_published=False), ("denied", "unpublished")),
    "expired-and-unpublished": (dict(gpt_published=False, expires_at=NOW), ("denied", "expired")),
    "quota-used-up": (dict(message_quota=5, messages_used=5), ("denied", "quota")),
    "quota-overdrawn": (dict(message_quota=5, messages_used=7), ("denied", "quota")),
    "odd-policy": (dict(policy="everyone"), ("denied", "unknown")),
}
STATE_CASES = [(s, lk, v) for s in STATES for lk in LINKS for v in ("anonymous", "alice", "evilexample", "old-session")]


@pytest.mark.parametrize("state, link_kind, visitor", STATE_CASES, ids=["-".join(c) for c in STATE_CASES])
def test_link_state_wins(state, link_kind, visitor):
    changes, expected = STATES[state]
    d = decide(replace(LINKS[link_kind], **changes), VISITORS[visitor], NOW, max_session_age=AGE)
    assert (d.outcome, d.reason) == expected


@pytest.mark.parametrize(
    "changes",
    [dict(expires_at=NOW + timedelta(seconds=1)), dict(message_quota=5, messages_used=4), dict(message_quota=1)],
    ids=["expires-next-second", "one-message-left", "fresh-quota"],
)
def test_just_inside_the_limits(changes):
    for kind in LINKS:
        d = decide(replace(LINKS[kind], **changes), VISITORS["alice"], NOW, max_session_age=AGE)
        assert d.allowed, (kind, d)


def test_unknown_and_the_not_available_states_look_the_same():
    decisions = [decide(None, VISITORS["alice"], NOW, max_session_age=AGE)]
    for state in ("expired", "revoked", "unpublished"):
        decisions.append(decide(replace(LINKS["public"], **STATES[state][0]), Visitor(), NOW, max_session_age=AGE))
    assert [d.reason for d in decisions] == ["unknown", "expired", "revoked", "unpublished"]
    assert {(d.outcome, d.message) for d in decisions} == {("denied", NOT_AVAILABLE)}
    assert all(d.not_available for d in decisions)


def test_session_age_is_a_parameter():
    d = decide(LINKS["signin"], VISITORS["almost-old"], NOW, max_session_age=timedelta(hours=1))
    assert (d.outcome, d.reason) == TOO_OLD
    d = decide(LINKS["signin"], VISITORS["old-session"], NOW, max_session_age=timedelta(days=1))
    assert d.allowed


def test_naive_times_are_read_as_utc():
    link = replace(LINKS["public"], expires_at=(NOW - timedelta(minutes=1)).replace(tzinfo=None))
    assert decide(link, Visitor(), NOW.replace(tzinfo=None), max_session_age=AGE).reason == "expired"
    other_zone = NOW.astimezone(timezone(timedelta(hours=5)))
    assert decide(replace(LINKS["public"], expires_at=NOW), Visitor(), other_zone, max_session_age=AGE).reason == "expired"


def test_refusal_messages_reveal_nothing_of_the_link():
    seen = set()
    for kind in LINKS:
        for v in VISITORS:
            d = decide(LINKS[kind], VISITORS[v], NOW, max_session_age=AGE)
            seen.add(d.message)
            assert "example.com" not in d.message and "shl_" not in d.message and "gpt_" not in d.message
    assert len(seen) >= 5


# --- what the creator types ------------------------------------------------------------


def test_emails_are_normalised():
    got = normalise_emails(["Alice@Example.COM", " bob@example.com ", "alice@example.com", "z@B\u00fcCHER.de"])
    assert got == ("alice@example.com", "bob@example.com", "z@xn--bcher-kva.de")
    assert normalise_emails("a@x.example, b@y.example\nc@z.example") == ("a@x.example", "b@y.example", "c@z.example")
    assert normalise_emails(()) == () and normalise_emails(None) == ()
    assert visitor_email("ALICE@B\u00fccher.DE") == "alice@xn--bcher-kva.de"
    assert visitor_email("not an email") is None and visitor_email(None) is None


@pytest.mark.parametrize(
    "bad",
    ["alice", "alice@", "@example.com", "a@b@example.com", "alice@localhost", "alice@example", "a b@example.com",
     "alice@exa mple.com", "alice@-example.com", "alice@example..com", ".alice@example.com", "a..b@example.com",
     "alice@127.0.0.1", "alice@example.com.", "<alice@example.com>", "x" * 65 + "@example.com", "a\x00@example.com"],
)
def test_bad_emails(bad):
    with pytest.raises(InvalidInput, match="is not an e-mail address"):
        normalise_emails([bad])


def test_domains_are_normalised():
    assert normalise_domains(["Example.COM", "@example.org", "example.net.", "B\u00fccher.de", "example.com"]) == (
        "example.com", "example.org", "example.net", "xn--bcher-kva.de",
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ("*", "wildcards are not supported"),
        ("*.example.com", "wildcards are not supported"),
        ("https://example.com", "not a web address"),
        ("example.com/path", "not a web address"),
        ("alice@example.com", "looks like an e-mail address"),
        ("localhost", "is not a domain name"),
        ("example.com:443", "is not a domain name"),
        ("10.0.0.1", "is not a domain name"),
        ("exa_mple.com", "is not a domain name"),
        ("-example.com", "is not a domain name"),
        ("a" * 64 + ".com", "is not a domain name"),
    ],
)
def test_bad_domains(bad, message):
    with pytest.raises(InvalidInput, match=message):
        normalise_domains([bad])


def test_lists_must_be_text():
    with pytest.raises(InvalidInput, match="must be text"):
        normalise_emails([42])


def test_labels_quota():
    assert normalise_label("  For   the\tteam ") == "For the team"
    assert normalise_label(None) == ""
    with pytest.raises(InvalidInput, match="label is too long"):
        normalise_label("x" * 101)
    assert normalise_quota(None) is None and normalise_quota(1) == 1
    for bad in (0, -3, True, 2.5, "10", 1_000_001):
        with pytest.raises(InvalidInput, match="message limit must be a whole number"):
            normalise_quota(bad)


def test_expiry():
    # a date means the end of that day in UTC
    assert normalise_expiry(date(2025, 6, 1), NOW) == datetime(2025, 6, 2, tzinfo=timezone.utc)
    assert normalise_expiry(date(2025, 12, 31), NOW) == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert normalise_expiry(None, NOW) is None
    assert normalise_expiry(datetime(2025, 6, 1, 13, 0), NOW) == datetime(2025, 6, 1, 13, tzinfo=timezone.utc)
    with pytest.raises(InvalidInput, match="expiry date is in the past"):
        normalise_expiry(date(2025, 5, 31), NOW)
    with pytest.raises(InvalidInput, match="expiry date is in the past"):
        normalise_expiry(NOW, NOW)
    with pytest.raises(InvalidInput, match="too far in the future"):
        normalise_expiry(date.max, NOW)
    with pytest.raises(InvalidInput, match="must be a date"):
        normalise_expiry("2025-12-31", NOW)
    assert parse_expiry_date("2025-12-31") == date(2025, 12, 31)
    for bad in ("31/12/2025", "2025-02-30", "tomorrow", "2025-1-1"):
        with pytest.raises(InvalidInput, match="YYYY-MM-DD"):
            parse_expiry_date(bad)
    assert expiry_label(None) == "never"
    assert expiry_label(datetime(2026, 1, 1, tzinfo=timezone.utc)) == "end of 2025-12-31 (UTC)"
    assert expiry_label(datetime(2026, 1, 1, 14, 30, tzinfo=timezone.utc)) == "2026-01-01 14:30 UTC"
