"""`personal-gpt cleanup`: delete conversations past their GPT's retention now (the
server also does it at start and hourly). Registered on the main group by ``cli.py``;
the rules live in the services."""

from __future__ import annotations

import click


def register(main) -> None:
    from personal_gpt.cli import _dump, _services, friendly

    @main.command("cleanup")
    @click.option("--json", "as_json", is_flag=True, help="Print {\"deleted\": N} as JSON.")
    @friendly
    def cleanup_cmd(as_json):
        """Delete conversations older than their GPT's retention (Privacy tab), for every GPT."""
        deleted = _services().cleanup_conversations()
        if as_json:
            _dump({"deleted": deleted})
        else:
            click.echo(f"Deleted {deleted} conversation{'' if deleted == 1 else 's'} past their GPT's retention.")
