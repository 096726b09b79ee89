"""`personal-gpt export GPT -o FILE`, `personal-gpt import FILE` and `personal-gpt templates save GPT --key K`;
registered on the main group by cli.py. Everything goes through ``services``; errors
are one sentence on stderr and exit 2 (``cli.friendly``). ``import`` prints the NEW
share-link addresses, the only time their tokens are shown.
"""

from __future__ import annotations

from pathlib import Path

import click


def import_dict(result, share_url=None) -> dict:
    out = result.to_dict()
    if share_url is not None:
        for link in out["share_links"]:
            link["url"] = share_url(link["token"])
    return out


def register(main) -> None:
    """Add this module's commands to the `personal-gpt` group."""
    from personal_gpt.cli import _dump, _principal, _services, friendly

    @main.command("export")
    @click.argument("gpt_id")
    @click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
                  help="Where to write the bundle (.zip).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def export_cmd(gpt_id, output, as_json):
        """Export a GPT as one bundle file: definition, versions, knowledge, fine-tunes and settings
        (never conversations, share tokens or API keys)."""
        svc = _services()
        path = svc.export_gpt(_principal(), gpt_id, Path(output))
        size = path.stat().st_size
        if as_json:
            _dump({"gpt": gpt_id, "file": str(path), "size_bytes": size})
        else:
            click.echo(f"Exported {gpt_id} to {path} ({size:,} bytes).")

    @main.command("import")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--base-url", metavar="URL", help="The app's address, for the new share links.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (with the new share links).")
    @friendly
    def import_cmd(file, base_url, as_json):
        """Import a bundle as a NEW GPT (never overwrites one) and wait until its knowledge is indexed."""
        from personal_gpt.cli_share import _base_url

        svc = _services()
        base = _base_url(base_url)
        result = svc.import_gpt(_principal(), Path(file), run_jobs=False)
        if result.ingest_job_id:
            if not as_json:
                click.echo("Reading and indexing the knowledge files…", err=True)
            svc.jobs.run_until_idle()
        data = import_dict(result, lambda token: svc.share_url(token, base))
        if as_json:
            _dump(data)
            return
        click.echo(f"Imported as {result.gpt_id} — {result.name} ({result.versions} version(s)"
                   + (f", version {result.published_version} published" if result.published_version else "")
                   + ").")
        if result.knowledge:
            click.echo(f"Knowledge: {sum(k['status'] == 'queued' for k in result.knowledge)} file(s) re-indexed.")
        if result.adapters:
            active = f", version {result.active_adapter} active" if result.active_adapter else ""
            click.echo(f"Adapters: {len(result.adapters)} imported{active}.")
        for link in data["share_links"]:
            click.echo(f"New share link {link['label'] or link['id']}: {link['url']}")
        for line in result.skipped:
            click.echo(f"Skipped: {line}", err=True)
        for line in result.notes:
            click.echo(f"Note: {line}", err=True)

    _templates_group(main, _dump, _principal, _services, friendly)


def _templates_group(main, _dump, _principal, _services, friendly) -> None:
    """Turn `templates` into a group that still lists templates when called alone
    (`personal-gpt templates [--json]`), with a `save` subcommand."""
    listing = main.commands.get("templates")
    if listing is None or isinstance(listing, click.Group):
        return

    @click.pass_context
    def list_or_sub(ctx, **kwargs):
        if ctx.invoked_subcommand is None:
            ctx.invoke(listing.callback, **kwargs)

    group = click.Group("templates", params=list(listing.params), callback=list_or_sub,
                        invoke_without_command=True, help=listing.help, short_help=listing.short_help)

    @group.command("save")
    @click.argument("gpt_id")
    @click.option("--key", required=True, help="The template's id and file name, e.g. my-shop-helper.")
    @click.option("--title", default="", help="The template's name in the gallery (default: the GPT's).")
    @click.option("--description", default="", help="One sentence (default: the GPT's description).")
    @click.option("--category", default="My templates", help="The gallery group.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def templates_save_cmd(gpt_id, key, title, description, category, as_json):
        """Save a GPT as a template in the templates folder."""
        path = _services().save_as_template(_principal(), gpt_id, key=key, title=title, description=description,
                                            category=category)
        if as_json:
            _dump({"key": key, "file": str(path)})
        else:
            click.echo(f"Saved template {key} to {path}.")

    main.add_command(group, "templates")
