"""`personal-gpt share` commands (create, list, revoke, rotate); registered on the
main group by cli.py. They print the link's URL — the only time the token is
shown — and go through ``services`` like every other command.
"""

from __future__ import annotations

import os

import click

DEFAULT_BASE_URL = "http://localhost:8501"
BASE_URL_ENV = "PERSONAL_GPT_BASE_URL"
BASE_URL_HELP = f"The app's address (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})."


def _base_url(value: str | None) -> str:
    """--base-url, else $PERSONAL_GPT_BASE_URL, else localhost; checked before anything is made."""
    from personal_gpt.sharing import check_base_url

    return check_base_url(value or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)


def _audience(link) -> str:
    if link.public:
        return "public"
    allowed = link.allowed_emails + link.allowed_domains
    return "sign-in: " + ", ".join(allowed) if allowed else "sign-in: anyone verified"


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M UTC") if dt else "never"


def link_dict(link) -> dict:
    return {
        "id": link.id, "gpt": link.gpt_id, "label": link.label, "status": link.status, "policy": link.policy,
        "allowed_emails": link.allowed_emails, "allowed_domains": link.allowed_domains,
        "expires_at": link.expires_at.isoformat() if link.expires_at else None,
        "message_quota": link.message_quota, "messages_used": link.messages_used, "opens": link.opens,
        "conversations": link.conversations,
        "last_used_at": link.last_used_at.isoformat() if link.last_used_at else None,
        "created_at": link.created_at.isoformat(),
        "revoked_at": link.revoked_at.isoformat() if link.revoked_at else None,
    }


def link_line(link) -> str:
    from personal_gpt.sharing import expiry_label

    messages = f"{link.messages_used}/{link.message_quota}" if link.message_quota else str(link.messages_used)
    line = (
        f"{link.id}  {link.status:<7}  {_audience(link)}  — opens {link.opens}, conversations {link.conversations}, "
        f"messages {messages}, expires {expiry_label(link.expires_at)}, last used {_when(link.last_used_at)}"
    )
    return line + (f"  [{link.label}]" if link.label else "")


def register(main) -> None:
    """Add this module's commands to the `personal-gpt` group."""
    from personal_gpt.cli import _dump, _principal, _services, friendly
    from personal_gpt.errors import InvalidInput

    @main.group("share")
    def share_group():
        """Share a GPT with a link: create, list, revoke and rotate links."""

    @share_group.command("create")
    @click.argument("gpt_id")
    @click.option("--label", default="", help="A note for you, e.g. who the link is for.")
    @click.option("--public", is_flag=True, help="Anyone with the link may chat (no sign-in).")
    @click.option("--allow-email", "emails", multiple=True, metavar="E",
                  help="Only this verified e-mail may chat (repeatable).")
    @click.option("--allow-domain", "domains", multiple=True, metavar="D",
                  help="Only verified e-mails at exactly this domain may chat (repeatable).")
    @click.option("--expires", metavar="YYYY-MM-DD", help="Last day the link works (it stops at the end of it, UTC).")
    @click.option("--quota", metavar="N", help="Most messages all visitors together may send.")
    @click.option("--base-url", metavar="URL", help=BASE_URL_HELP)
    @friendly
    def share_create_cmd(gpt_id, label, public, emails, domains, expires, quota, base_url):
        """Create a share link for a GPT and print its URL."""
        from personal_gpt.sharing import parse_expiry_date

        expiry = parse_expiry_date(expires) if expires is not None else None
        limit = None
        if quota is not None:
            if not quota.strip().isdigit():
                raise InvalidInput(f"--quota takes a whole number of messages, e.g. 100 (got '{quota[:40]}').")
            limit = int(quota.strip())
        base = _base_url(base_url)
        svc = _services()
        p = _principal()
        link, token = svc.create_share_link(
            p, gpt_id, label=label, public=public, emails=emails, domains=domains, expires=expiry, quota=limit,
        )
        click.echo(svc.share_url(token, base))
        if svc.get_gpt(p, gpt_id).published_version is None:
            click.echo("Note: this GPT is not published yet; the link works once you publish it.", err=True)

    @share_group.command("list")
    @click.argument("gpt_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def share_list_cmd(gpt_id, as_json):
        """List a GPT's share links with their use."""
        items = _services().list_share_links(_principal(), gpt_id)
        if as_json:
            _dump([link_dict(link) for link in items])
            return
        if not items:
            click.echo(f"No share links yet: personal-gpt share create {gpt_id}")
        for link in items:
            click.echo(link_line(link))

    @share_group.command("revoke")
    @click.argument("link_id")
    @friendly
    def share_revoke_cmd(link_id):
        """Stop a share link for good."""
        link = _services().revoke_share_link(_principal(), link_id)
        click.echo(f"Revoked {link.id}.")

    @share_group.command("rotate")
    @click.argument("link_id")
    @click.option("--base-url", metavar="URL", help=BASE_URL_HELP)
    @friendly
    def share_rotate_cmd(link_id, base_url):
        """Give a link a new URL (the old one stops working) and print it."""
        base = _base_url(base_url)
        svc = _services()
        _, token = svc.rotate_share_link(_principal(), link_id)
        click.echo(svc.share_url(token, base))
