"""`personal-gpt share create|list|revoke|rotate`: exact outputs, exit codes, one
sentence on stderr for every error (exit 2), and URLs whose tokens really open."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from personal_gpt.auth import Principal
from personal_gpt.cli import main
from personal_gpt.errors import NotFound
from personal_gpt.services import Services
from personal_gpt.sharing import NOT_AVAILABLE

URL = re.compile(r"(?P<base>.+)/s/(?P<token>pgs_[A-Za-z0-9_-]{43})\n")


@pytest.fixture
def run(monkeypatch):
    monkeypatch.delenv("PERSONAL_GPT_BASE_URL", raising=False)
    runner = CliRunner()

    def _run(*args, code=0):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    return _run


@pytest.fixture
def gpt_id(run):
    gid = run("create", "--name", "Bloom helper").stdout.strip()
    run("publish", gid)
    return gid


@pytest.fixture
def svc(home):
    s = Services()
    yield s
    s.close()


def token_of(result) -> str:
    m = URL.fullmatch(result.stdout)
    assert m, result.stdout
    return m["token"]


def test_create_prints_only_the_url(run, gpt_id, svc):
    result = run("share", "create", gpt_id)
    m = URL.fullmatch(result.stdout)
    assert m and m["base"] == "http://localhost:8501" and result.stderr == ""
    (link,) = svc.list_share_links(Principal.local(), gpt_id)
    assert svc.open_share_token(m["token"]) == link.id
    assert (link.policy, link.label, link.expires_at, link.message_quota) == ("signin", "", None, None)


def test_base_url_from_option_or_environment(run, gpt_id, monkeypatch):
    monkeypatch.setenv("PERSONAL_GPT_BASE_URL", "https://gpts.example.org/")
    assert URL.fullmatch(run("share", "create", gpt_id, "--public").stdout)["base"] == "https://gpts.example.org"
    out = run("share", "create", gpt_id, "--public", "--base-url", "http://10.0.0.5:8501").stdout
    assert URL.fullmatch(out)["base"] == "http://10.0.0.5:8501"


def test_unpublished_gpt_gets_a_note(run):
    gid = run("create", "--name", "Draft").stdout.strip()
    result = run("share", "create", gid, "--public")
    assert URL.fullmatch(result.stdout)
    assert result.stderr == "Note: this GPT is not published yet; the link works once you publish it.\n"


def test_list_text_and_json(run, gpt_id):
    assert run("share", "list", gpt_id).stdout == f"No share links yet: personal-gpt share create {gpt_id}\n"
    assert json.loads(run("share", "list", gpt_id, "--json").stdout) == []
    run("share", "create", gpt_id, "--label", "Team", "--allow-email", "Carol@Acme.example",
        "--allow-domain", "@acme.example", "--allow-domain", "partner.example", "--expires", "2099-12-31",
        "--quota", "5")
    run("share", "create", gpt_id, "--public")
    items = json.loads(run("share", "list", gpt_id, "--json").stdout)
    assert [i["policy"] for i in items] == ["public", "signin"]
    team = items[1]
    assert team["id"].startswith("shl_")
    assert {k: v for k, v in team.items() if k not in ("id", "created_at")} == {
        "gpt": gpt_id, "label": "Team", "status": "active", "policy": "signin",
        "allowed_emails": ["carol@acme.example"], "allowed_domains": ["acme.example", "partner.example"],
        "expires_at": "2100-01-01T00:00:00+00:00", "message_quota": 5, "messages_used": 0, "opens": 0,
        "conversations": 0, "last_used_at": None, "revoked_at": None,
    }
    assert run("share", "list", gpt_id).stdout == (
        f"{items[0]['id']}  active   public  — opens 0, conversations 0, messages 0, expires never, last used never\n"
        f"{team['id']}  active   sign-in: carol@acme.example, acme.example, partner.example  — opens 0, "
        "conversations 0, messages 0/5, expires end of 2099-12-31 (UTC), last used never  [Team]\n"
    )


def test_revoke(run, gpt_id, svc):
    token = token_of(run("share", "create", gpt_id, "--public"))
    link_id = json.loads(run("share", "list", gpt_id, "--json").stdout)[0]["id"]
    assert run("share", "revoke", link_id).stdout == f"Revoked {link_id}.\n"
    assert json.loads(run("share", "list", gpt_id, "--json").stdout)[0]["status"] == "revoked"
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.open_share_token(token)
    result = run("share", "rotate", link_id, code=2)
    assert result.stderr == "Error: This link was revoked, so it cannot get a new address: create a new link.\n"


def test_rotate(run, gpt_id, svc):
    old = token_of(run("share", "create", gpt_id, "--allow-domain", "example.com", "--quota", "9"))
    before = json.loads(run("share", "list", gpt_id, "--json").stdout)[0]
    result = run("share", "rotate", before["id"], "--base-url", "https://gpts.example")
    assert URL.fullmatch(result.stdout)["base"] == "https://gpts.example"
    new = token_of(result)
    assert new != old
    with pytest.raises(NotFound, match=NOT_AVAILABLE):
        svc.open_share_token(old)
    assert svc.open_share_token(new) == before["id"]
    after = json.loads(run("share", "list", gpt_id, "--json").stdout)[0]
    assert {**after, "opens": 0, "last_used_at": None} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["share", "create", "gpt_000000000000"], "There is no GPT with that id."),
        (["share", "create", "../etc"], "There is no GPT with that id."),
        (["share", "create", "GPT", "--allow-email", "carol"], "'carol' is not an e-mail address, e.g. name@example.com."),
        (["share", "create", "GPT", "--allow-domain", "*.example.com"],
         "'*.example.com': wildcards are not supported; write the domain itself, e.g. example.com "
         "(subdomains are listed one by one)."),
        (["share", "create", "GPT", "--public", "--allow-email", "a@example.com"],
         "A public link is open to anyone: remove the e-mail and domain lists, or make it a sign-in link."),
        (["share", "create", "GPT", "--expires", "31/12/2099"],
         "'31/12/2099' is not a date: write it as YYYY-MM-DD, e.g. 2025-12-31."),
        (["share", "create", "GPT", "--expires", "2001-01-01"], "The expiry date is in the past: pick today or a later date."),
        (["share", "create", "GPT", "--quota", "lots"], "--quota takes a whole number of messages, e.g. 100 (got 'lots')."),
        (["share", "create", "GPT", "--quota", "0"], "The message limit must be a whole number from 1 to 1,000,000."),
        (["share", "create", "GPT", "--base-url", "gpts.example"],
         "The base URL must be the app's address, e.g. https://gpts.example.com."),
        (["share", "list", "gpt_000000000000"], "There is no GPT with that id."),
        (["share", "revoke", "shl_0000000000000000"], "There is no share link with that id."),
        (["share", "rotate", "'; DROP TABLE share_links; --"], "There is no share link with that id."),
    ],
)
def test_errors_are_one_sentence_and_exit_2(run, gpt_id, args, message):
    args = [gpt_id if a == "GPT" else a for a in args]
    result = run(*args, code=2)
    assert result.stdout == "" and result.stderr == f"Error: {message}\n"
    assert json.loads(run("share", "list", gpt_id, "--json").stdout) == []  # nothing was made


def test_cli_acts_as_a_signed_in_creator_only_with_as(home, tmp_path, monkeypatch):
    """With sign-in configured, ``--as EMAIL`` reaches only that creator's GPTs; an
    unknown or non-creator e-mail gets one sentence and exit 2."""
    from click.testing import CliRunner

    from personal_gpt.cli import main
    from personal_gpt.services import Services
    from tests.support.oidc import write_secrets

    secrets_file = write_secrets(tmp_path / "secrets.toml", {"idp": "https://idp.example"},
                                 creators=["ann@studio.example"])
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(secrets_file))
    svc = Services()
    ann = svc.sign_in({"iss": "https://idp.example", "sub": "ann", "email": "ann@studio.example",
                       "email_verified": True}, "idp")
    ann_p, _ = svc.principal_for_session(ann)
    svc.create_gpt(ann_p, name="Ann's helper")
    svc.close()
    runner = CliRunner()
    listed = runner.invoke(main, ["--as", "ann@studio.example", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [g["name"] for g in json.loads(listed.output)] == ["Ann's helper"]
    local = runner.invoke(main, ["list", "--json"])
    assert local.exit_code == 0 and json.loads(local.output) == []
    stranger = runner.invoke(main, ["--as", "bob@studio.example", "list"])
    assert stranger.exit_code == 2 and "No creator with the verified e-mail bob@studio.example" in stranger.output


def test_serve_warns_when_listening_beyond_localhost_without_sign_in(home, tmp_path, monkeypatch):
    """The warning is the point here, not the server (started for real by the e2e tests):
    ``serve`` itself is replaced by a recorder."""
    from click.testing import CliRunner

    import personal_gpt.web.server as server
    from personal_gpt.cli import main
    from tests.support.oidc import write_secrets

    started = []
    monkeypatch.setattr(server, "serve", lambda port, host: started.append((port, host)))
    runner = CliRunner()
    open_to_all = runner.invoke(main, ["serve", "--host", "0.0.0.0", "--port", "9999"])
    assert open_to_all.exit_code == 0 and "no sign-in configured" in open_to_all.output
    local = runner.invoke(main, ["serve"])
    assert "Warning" not in local.output
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(write_secrets(tmp_path / "s.toml", {"idp": "https://idp.example"})))
    with_signin = runner.invoke(main, ["serve", "--host", "0.0.0.0"])
    assert with_signin.exit_code == 0 and "Warning" not in with_signin.output
    assert started == [(9999, "0.0.0.0"), (8501, "localhost"), (8501, "0.0.0.0")]
