"""Reading the sign-in settings from a Streamlit-format secrets.toml: where the file is
found, what a good file gives, and the one sentence each misconfiguration gets."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from personal_gpt.auth_config import (
    DEFAULT_SCOPE,
    SECRETS_ENV,
    UNNAMED_PROVIDER,
    load_auth_config,
    parse_auth_config,
    secrets_path,
)
from personal_gpt.errors import InvalidInput

SECRET = "s" * 40
GOOGLE = "https://accounts.google.com/.well-known/openid-configuration"


def good(**overrides) -> dict:
    data = {
        "auth": {
            "redirect_uri": "https://gpts.example.com/auth/callback",
            "cookie_secret": SECRET,
            "google": {"client_id": "gid", "client_secret": "gsecret", "server_metadata_url": GOOGLE},
            "company": {
                "client_id": "kid", "client_secret": "ksecret", "label": "Company account",
                "server_metadata_url": "https://sso.example.com/realms/staff/.well-known/openid-configuration",
                "client_kwargs": {"prompt": "login", "token_endpoint_auth_method": "client_secret_post"},
            },
        },
        "personal_gpt": {"creators": ["Ana@Example.com", "@Studio.example"], "session_max_age_hours": 8},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def test_a_good_file_with_two_named_providers():
    config = parse_auth_config(good())
    assert list(config.providers) == ["google", "company"]
    google, company = config.providers["google"], config.providers["company"]
    assert (google.client_id, google.client_secret, google.server_metadata_url) == ("gid", "gsecret", GOOGLE)
    assert google.label == "Google" and company.label == "Company account"
    assert google.scope == DEFAULT_SCOPE == "openid email profile"
    assert company.token_endpoint_auth_method == "client_secret_post"
    assert dict(company.authorize_params) == {"prompt": "login"}
    assert config.creators == ("ana@example.com", "@studio.example")
    assert config.session_max_age == timedelta(hours=8)
    assert config.secure_cookies
    assert "gsecret" not in repr(config) and SECRET not in repr(config)


def test_a_single_unnamed_provider_directly_in_auth_and_defaults():
    config = parse_auth_config({
        "auth": {
            "redirect_uri": "http://localhost:8501/auth/callback", "cookie_secret": SECRET,
            "client_id": "id", "client_secret": "secret", "server_metadata_url": GOOGLE,
            "client_kwargs": {"scope": "email"},
        }
    })
    assert list(config.providers) == [UNNAMED_PROVIDER]
    assert config.providers[UNNAMED_PROVIDER].scope == "openid email"  # openid is always asked for
    assert config.creators == ()
    assert config.session_max_age == timedelta(hours=12)
    assert not config.secure_cookies  # plain http on this machine


def test_cookie_secret_is_optional_but_never_weak():
    assert parse_auth_config(good(**{"auth.cookie_secret": None})).cookie_secret == ""
    assert parse_auth_config(good()).cookie_secret == SECRET


def test_no_auth_section_means_sign_in_is_not_configured():
    assert parse_auth_config({"personal_gpt": {"creators": ["a@b.example"]}}) is None
    assert parse_auth_config({"openai_key": "x"}) is None


@pytest.mark.parametrize(
    "overrides, sentence",
    [
        ({"auth.google.client_id": None}, "[auth.google] has no client_id"),
        ({"auth.google.client_secret": ""}, "[auth.google] has no client_secret"),
        ({"auth.google.server_metadata_url": None}, "server_metadata_url in [auth.google] is missing"),
        ({"auth.google.server_metadata_url": "accounts.google.com"}, "must be a full web address starting with https://"),
        ({"auth.google.server_metadata_url": "ftp://accounts.google.com/.well-known/openid-configuration"}, "starting with https://"),
        ({"auth.google.server_metadata_url": "http://sso.example.com/.well-known/openid-configuration"}, "must use https://"),
        ({"auth.google.server_metadata_url": "https://accounts.google.com/"}, "must end with /.well-known/openid-configuration"),
        ({"auth.google.server_metadata_url": "https://x:99999/.well-known/openid-configuration"}, "is not a valid web address"),
        ({"auth.google.client_id": 1234}, "client_id in [auth.google] must be text"),
        ({"auth.google.domain": "x"}, "Unknown setting 'domain' in [auth.google]"),
        ({"auth.google.client_kwargs": {"state": "fixed"}}, "client_kwargs in [auth.google] has 'state'"),
        ({"auth.google.client_kwargs": {"redirect_uri": "https://evil.test"}}, "has 'redirect_uri', which cannot be set"),
        ({"auth.google.client_kwargs": {"code_challenge_method": "plain"}}, "can only be \"S256\""),
        ({"auth.google.client_kwargs": {"token_endpoint_auth_method": "none"}}, "token_endpoint_auth_method in [auth.google] must be one of"),
        ({"auth.google.client_kwargs": "prompt=login"}, "client_kwargs in [auth.google] must be a table"),
        ({"auth.redirect_uri": None}, "redirect_uri in [auth] is missing"),
        ({"auth.redirect_uri": "https://gpts.example.com/oauth2callback"}, "followed by /auth/callback"),
        ({"auth.redirect_uri": "http://gpts.example.com/auth/callback"}, "must use https://"),
        ({"auth.redirect_uri": "https://gpts.example.com/auth/callback?next=/x"}, "followed by /auth/callback"),
        ({"auth.cookie_secret": "short"}, "cookie_secret in [auth] must be a random text of at least 32 characters"),
        ({"auth.google": None, "auth.company": None}, "[auth] names no sign-in provider"),
        ({"auth.client_id_typo": "x"}, "Unknown setting 'client_id_typo' in [auth]"),
        ({"auth.bad name!": {"client_id": "a"}}, "is not a usable provider name"),
        ({"personal_gpt.creators": ["not-an-email"]}, "creators in [personal_gpt] has 'not-an-email'"),
        ({"personal_gpt.creators": ["@localhost"]}, "creators in [personal_gpt] has '@localhost'"),
        ({"personal_gpt.creators": {"a": 1}}, "creators in [personal_gpt] must be a list"),
        ({"personal_gpt.session_max_age_hours": 0}, "session_max_age_hours in [personal_gpt] must be a number"),
        ({"personal_gpt.session_max_age_hours": 10_000}, "at most 720"),
        ({"personal_gpt.session_max_age_hours": "12"}, "must be a number of hours"),
        ({"personal_gpt": "yes"}, "must be a section: [personal_gpt]"),
    ],
)
def test_each_misconfiguration_gets_one_clear_sentence(overrides, sentence):
    with pytest.raises(InvalidInput) as caught:
        parse_auth_config(good(**overrides))
    message = str(caught.value)
    assert sentence in message
    assert message.endswith(".") and "Traceback" not in message
    assert "gsecret" not in message and SECRET not in message  # never echo a secret


def test_creator_matching_is_exact_for_addresses_and_domains():
    config = parse_auth_config(good())
    assert config.is_creator_email("ana@example.com")
    assert config.is_creator_email(" ANA@example.COM ")
    assert config.is_creator_email("bo@studio.example")
    for outsider in (
        "ana@example.com.evil.test", "x@example.com", "bo@evilstudio.example", "bo@studio.example.evil.test",
        "bo@sub.studio.example", "ana@example.com\nx@evil.test", "", None, 42, "@studio.example", "studio.example",
    ):
        assert not config.is_creator_email(outsider), outsider


# --- where the file is found -----------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD_TOML = f"""
[auth]
redirect_uri = "https://gpts.example.com/auth/callback"
cookie_secret = "{SECRET}"

[auth.google]
client_id = "gid"
client_secret = "gsecret"
server_metadata_url = "{GOOGLE}"
"""


def test_file_lookup_order_env_then_working_dir_then_home(tmp_path, monkeypatch):
    cwd, user_home = tmp_path / "project", tmp_path / "user"
    cwd.mkdir()
    user_home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.delenv(SECRETS_ENV, raising=False)
    assert secrets_path() is None
    assert load_auth_config() is None

    in_home = _write(user_home / ".streamlit" / "secrets.toml", GOOD_TOML)
    assert secrets_path() == in_home
    in_cwd = _write(cwd / ".streamlit" / "secrets.toml", "[personal_gpt]\ncreators = []\n")
    assert secrets_path() == in_cwd
    assert load_auth_config() is None  # the working-dir file wins and has no [auth]

    named = _write(tmp_path / "elsewhere.toml", GOOD_TOML)
    monkeypatch.setenv(SECRETS_ENV, str(named))
    assert secrets_path() == named
    assert list(load_auth_config().providers) == ["google"]


def test_a_named_file_that_does_not_exist_is_an_error_not_sign_in_off(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRETS_ENV, str(tmp_path / "typo.toml"))
    with pytest.raises(InvalidInput, match="PERSONAL_GPT_SECRETS points to .*typo.toml, which is not a file"):
        load_auth_config()


def test_broken_toml_is_one_sentence(tmp_path, monkeypatch):
    path = _write(tmp_path / "secrets.toml", "[auth\nredirect_uri = ")
    monkeypatch.setenv(SECRETS_ENV, str(path))
    with pytest.raises(InvalidInput, match=r"is not valid TOML"):
        load_auth_config()


def test_the_file_is_read_again_when_it_changes(tmp_path, monkeypatch):
    path = _write(tmp_path / "secrets.toml", GOOD_TOML)
    monkeypatch.setenv(SECRETS_ENV, str(path))
    first = load_auth_config()
    assert load_auth_config() is first  # cached while unchanged
    _write(path, GOOD_TOML + "\n[personal_gpt]\nsession_max_age_hours = 1\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_auth_config().session_max_age == timedelta(hours=1)
