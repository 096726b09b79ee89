"""The `personal-gpt` command: the same operations as the UI, for scripts.

Every command goes through ``services``; a PersonalGptError becomes one
sentence on stderr and exit code 2, never a traceback. Heavy libraries load
only in the commands that chat.
"""

from __future__ import annotations

import json
import sys
import time
from functools import wraps

import click

from personal_gpt.auth import Principal
from personal_gpt.errors import PersonalGptError


def _services():
    import atexit

    from personal_gpt.services import Services

    svc = Services()
    # stop the model's scheduler thread and the job runner before the interpreter exits:
    # a torch thread still running at exit aborts the process ("terminate called…")
    atexit.register(svc.close)
    return svc


def friendly(fn):
    """Turn our errors into a sentence on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PersonalGptError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _principal() -> Principal:
    """The local creator, or with ``--as EMAIL`` (or PERSONAL_GPT_AS) a creator who has
    signed in to the web app: commands then reach only that person's GPTs."""
    ctx = click.get_current_context(silent=True)
    email = ((ctx.find_root().params.get("as_email") if ctx else None) or "").strip()
    if not email:
        return Principal.local()
    return _services().creator_by_email(email)


def _dump(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="personal-gpt")
@click.option("--as", "as_email", metavar="EMAIL", envvar="PERSONAL_GPT_AS",
              help="Act as this signed-in creator (when sign-in is configured).")
def main(as_email):
    """Personal GPTs: make, chat with and share your own GPTs.

    All state lives under PERSONAL_GPT_HOME (default ~/.personal-gpt)."""


@main.command("templates")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def templates_cmd(as_json):
    """List the templates you can start from."""
    svc = _services()
    items = svc.templates()
    if as_json:
        _dump([
            {"id": t.id, "name": t.name, "description": t.description, "icon": t.icon,
             "blanks": [{"key": b.key, "label": b.label, "required": b.required} for b in t.blanks]}
            for t in items
        ])
        return
    for t in items:
        blanks = ", ".join(f"{b.key}{'' if b.required else '?'}" for b in t.blanks)
        click.echo(f"{t.id:<24} {t.icon} {t.name} — {t.description}")
        if blanks:
            click.echo(f"{'':<24}   blanks: {blanks}")
    for problem in svc.template_problems():
        click.echo(f"(skipped {problem.file}: {problem.message})", err=True)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        if "=" not in item:
            raise PersonalGptError(f"--set takes blank=value, got '{item}'.")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


@main.command("create")
@click.option("--template", "-t", "template_id", help="Template id (see `personal-gpt templates`).")
@click.option("--name", "-n", default="", help="The GPT's name.")
@click.option("--set", "sets", multiple=True, metavar="BLANK=VALUE", help="Fill a template blank (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def create_cmd(template_id, name, sets, as_json):
    """Create a GPT (from a template) and print its id."""
    svc = _services()
    if not template_id and not name.strip():
        raise PersonalGptError("Give a --template to start from, or a --name for a blank GPT.")
    gpt = svc.create_gpt(_principal(), template_id=template_id, name=name or None, blanks=_parse_sets(sets))
    if as_json:
        _dump({"id": gpt.id, "name": gpt.name, "version": gpt.latest_version})
    else:
        click.echo(gpt.id)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def list_cmd(as_json):
    """List your GPTs."""
    items = _services().list_gpts(_principal())
    if as_json:
        _dump([
            {"id": g.id, "name": g.name, "description": g.description, "latest_version": g.latest_version,
             "published_version": g.published_version, "updated_at": g.updated_at}
            for g in items
        ])
        return
    if not items:
        click.echo("No GPTs yet. Start from a template: personal-gpt templates")
    for g in items:
        state = f"published v{g.published_version}" if g.is_published else "draft"
        click.echo(f"{g.id}  {g.avatar} {g.name}  ({state}, latest v{g.latest_version})")


@main.command("show")
@click.argument("gpt_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def show_cmd(gpt_id, as_json):
    """Show a GPT's definition."""
    gpt = _services().get_gpt(_principal(), gpt_id)
    data = {"id": gpt.id, "latest_version": gpt.latest_version, "published_version": gpt.published_version,
            **gpt.spec.model_dump(mode="json")}
    if as_json:
        _dump(data)
        return
    click.echo(f"{gpt.spec.avatar} {gpt.name}  [{gpt.id}]")
    if gpt.spec.description:
        click.echo(gpt.spec.description)
    click.echo(f"Versions: latest v{gpt.latest_version}, published: "
               f"{'v' + str(gpt.published_version) if gpt.published_version else 'not yet'}")
    click.echo("\nInstructions:\n" + gpt.spec.instructions)
    if gpt.spec.starters:
        click.echo("\nConversation starters:")
        for s in gpt.spec.starters:
            click.echo(f"  - {s}")


@main.command("publish")
@click.argument("gpt_id")
@click.option("--version", "version", type=int, default=None, help="Version number (default: the latest).")
@friendly
def publish_cmd(gpt_id, version):
    """Publish a GPT's latest (or a given) version."""
    gpt = _services().publish(_principal(), gpt_id, version)
    click.echo(f"Published {gpt.name} v{gpt.published_version}.")


def _reply_json(gpt_id, reply, wall):
    return {
        "gpt": gpt_id,
        "answer": reply.text,
        "model": reply.model_name,
        "finish_reason": reply.usage.finish_reason,
        "usage": {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens},
        "timings": {"first_token_s": reply.meta["first_token_s"], "total_s": round(wall, 4)},
    }


@main.command("ask")
@click.argument("gpt_id")
@click.argument("message")
@click.option("--json", "as_json", is_flag=True, help="Print answer, model and timings as JSON.")
@click.option("--draft", is_flag=True, help="Use the latest draft instead of the published version.")
@friendly
def ask_cmd(gpt_id, message, as_json, draft):
    """Ask a GPT one question and print the answer."""
    svc = _services()
    p = _principal()
    gpt = svc.get_gpt(p, gpt_id)
    spec = gpt.spec if (draft or gpt.published_version is None) else None
    conv = svc.start_conversation(p, gpt_id, source="cli")
    t0 = time.perf_counter()
    reply = svc.send(p, conv, message, spec=spec)
    if as_json:
        for _ in reply.pieces:
            pass
        _dump(_reply_json(gpt_id, reply, time.perf_counter() - t0))
        return
    for piece in reply.pieces:
        click.echo(piece, nl=False)
    click.echo()


@main.command("chat")
@click.argument("gpt_id")
@click.option("--draft", is_flag=True, help="Use the latest draft instead of the published version.")
@friendly
def chat_cmd(gpt_id, draft):
    """Chat with a GPT in the terminal (empty line or Ctrl-D to quit)."""
    svc = _services()
    p = _principal()
    gpt = svc.get_gpt(p, gpt_id)
    spec = gpt.spec if (draft or gpt.published_version is None) else None
    conv = svc.start_conversation(p, gpt_id, source="cli")
    click.echo(f"{gpt.spec.avatar} {gpt.name} — type a message; an empty line quits.")
    while True:
        try:
            message = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if not message:
            break
        try:
            reply = svc.send(p, conv, message, spec=spec)
            click.echo(f"{gpt.name}> ", nl=False)
            for piece in reply.pieces:
                click.echo(piece, nl=False)
            click.echo()
        except KeyboardInterrupt:
            click.echo("\n(stopped)")
        except PersonalGptError as exc:
            click.echo(f"Error: {exc}", err=True)


@main.group("knowledge")
def knowledge_group():
    """Add, list and remove a GPT's knowledge files."""


def _file_dict(f) -> dict:
    return {"id": f.id, "name": f.display_name, "status": f.status, "error": f.error or None, "type": f.filetype or None,
            "pages": f.pages, "chunks": f.chunk_count, "size_bytes": f.size_bytes}


@knowledge_group.command("add")
@click.argument("gpt_id")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print each file's outcome as JSON.")
@friendly
def knowledge_add_cmd(gpt_id, files, as_json):
    """Add files and wait until they are read and indexed."""
    from pathlib import Path

    svc = _services()
    p = _principal()
    uploads, unreadable = [], []
    for f in files:
        try:
            uploads.append((Path(f).name, Path(f).read_bytes()))
        except OSError as exc:
            unreadable.append({"name": Path(f).name, "status": "rejected", "error": f"Cannot read the file: {exc.strerror}."})
    result = svc.add_knowledge(p, gpt_id, uploads, run_jobs=False)
    if result.job_id:
        if not as_json:
            click.echo(f"Reading and indexing {sum(a.status == 'queued' for a in result.files)} file(s)…", err=True)
        svc.jobs.run_until_idle()
    by_id = {f.id: f for f in svc.list_knowledge(p, gpt_id)}
    out = list(unreadable)
    for a in result.files:
        row = by_id.get(a.file_id) if a.file_id else None
        if a.status == "rejected" or row is None:
            out.append({"name": a.name, "status": "rejected", "error": a.message})
        elif a.status == "duplicate":
            out.append({**_file_dict(row), "status": "duplicate", "note": a.message})
        else:
            out.append(_file_dict(row))
    if as_json:
        _dump(out)
    else:
        for item in out:
            detail = item.get("error") or item.get("note") or f"{item.get('chunks', 0)} passages"
            click.echo(f"{item['status']:<10} {item['name']}  — {detail}")
    if any(item["status"] in ("rejected", "failed") for item in out):
        sys.exit(1)


@knowledge_group.command("list")
@click.argument("gpt_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def knowledge_list_cmd(gpt_id, as_json):
    """List a GPT's knowledge files with their status."""
    files = _services().list_knowledge(_principal(), gpt_id)
    if as_json:
        _dump([_file_dict(f) for f in files])
        return
    if not files:
        click.echo("No knowledge files yet: personal-gpt knowledge add GPT FILE…")
    for f in files:
        detail = f.error if f.status == "failed" else f"{f.chunk_count} passages" + (f", {f.pages} pages" if f.pages else "")
        click.echo(f"{f.id}  {f.status:<9} {f.display_name}  — {detail}")


@knowledge_group.command("remove")
@click.argument("gpt_id")
@click.argument("file_id")
@friendly
def knowledge_remove_cmd(gpt_id, file_id):
    """Remove a knowledge file and everything indexed from it."""
    _services().remove_knowledge(_principal(), gpt_id, file_id)
    click.echo("Removed.")


@main.command("search")
@click.argument("gpt_id")
@click.argument("query")
@click.option("-k", "k", type=int, default=5, show_default=True, help="How many passages.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def search_cmd(gpt_id, query, k, as_json):
    """Search a GPT's knowledge: ranked passages with file, page and score."""
    hits = _services().search_knowledge(_principal(), gpt_id, query, k=k)
    if as_json:
        _dump([{"rank": h.n, "file": h.file, "file_id": h.file_id, "page": h.page, "section": h.section,
                "score": round(h.score, 4), "text": h.text} for h in hits])
        return
    if not hits:
        click.echo("Nothing found.")
    for h in hits:
        where = h.file + (f", page {h.page}" if h.page else "")
        click.echo(f"[{h.n}] {where}  (score {h.score:.3f})\n    {' '.join(h.text.split())[:300]}")


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@main.command("serve")
@click.option("--port", type=int, default=8501, show_default=True)
@click.option("--host", default="localhost", show_default=True, help="Address to listen on.")
def serve_cmd(port, host):
    """Start the app (web UI and HTTP routes on one port)."""
    from personal_gpt.auth_config import load_auth_config

    try:
        signin = load_auth_config() is not None
    except PersonalGptError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if host not in LOCAL_HOSTS and not signin:
        click.echo(
            f"Warning: listening on {host} with no sign-in configured: anyone who can reach this "
            "address can use and change your GPTs.", err=True,
        )
    click.echo(f"Personal GPTs is starting at http://{'localhost' if host in LOCAL_HOSTS else host}:{port}")
    from personal_gpt.web.server import serve

    serve(port, host)


def _register_groups() -> None:
    """Command groups that live in their own modules (fine-tuning, sharing)."""
    from personal_gpt import cli_eval, cli_finetune, cli_keys, cli_share

    cli_finetune.register(main)
    cli_share.register(main)
    cli_eval.register(main)
    cli_keys.register(main)
    from personal_gpt import cli_privacy

    cli_privacy.register(main)
    from personal_gpt import cli_bundle

    cli_bundle.register(main)


_register_groups()

if __name__ == "__main__":
    main()
