"""`personal-gpt keys` commands (create, list, revoke) for a GPT's HTTP API keys;
registered on the main group by cli.py. ``keys create`` prints the key — the only
time it is shown; the store keeps its SHA-256. Everything goes through ``services``.
"""

from __future__ import annotations

import click


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M UTC") if dt else "never"


def key_dict(key) -> dict:
    return {
        "id": key.id, "gpt": key.gpt_id, "name": key.name, "hint": key.hint,
        "status": "active" if key.active else "revoked", "uses": key.uses,
        "created_at": key.created_at.isoformat(),
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def key_line(key) -> str:
    status = "active" if key.active else "revoked"
    line = f"{key.id}  {status:<7}  {key.masked}  — uses {key.uses}, last used {_when(key.last_used_at)}, " \
           f"created {_when(key.created_at)}"
    return line + (f"  [{key.name}]" if key.name else "")


def register(main) -> None:
    """Add this module's commands to the `personal-gpt` group."""
    from personal_gpt.cli import _dump, _principal, _services, friendly

    @main.group("keys")
    def keys_group():
        """API keys for a GPT's OpenAI-compatible HTTP API: create, list and revoke."""

    @keys_group.command("create")
    @click.argument("gpt_id")
    @click.option("--name", default="", help="A note for you, e.g. which tool uses the key.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (with the key).")
    @friendly
    def keys_create_cmd(gpt_id, name, as_json):
        """Create an API key for a GPT and print it (it is shown only this once)."""
        svc = _services()
        p = _principal()
        key, secret = svc.create_api_key(p, gpt_id, name=name)
        published = svc.get_gpt(p, gpt_id).published_version is not None
        if as_json:
            _dump({**key_dict(key), "key": secret})
        else:
            click.echo(secret)
            click.echo("Copy this key now: it is not shown again (keys list shows only its last characters).",
                       err=True)
        if not published:
            click.echo("Note: this GPT is not published yet; calls answer 404 until you publish it.", err=True)

    @keys_group.command("list")
    @click.argument("gpt_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def keys_list_cmd(gpt_id, as_json):
        """List a GPT's API keys with their use (never the keys themselves)."""
        items = _services().list_api_keys(_principal(), gpt_id)
        if as_json:
            _dump([key_dict(k) for k in items])
            return
        if not items:
            click.echo(f"No API keys yet: personal-gpt keys create {gpt_id}")
        for key in items:
            click.echo(key_line(key))

    @keys_group.command("revoke")
    @click.argument("key_id")
    @friendly
    def keys_revoke_cmd(key_id):
        """Stop an API key for good (its next call gets 401)."""
        key = _services().revoke_api_key(_principal(), key_id)
        click.echo(f"Revoked {key.id}.")
