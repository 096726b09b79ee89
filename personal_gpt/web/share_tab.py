"""The builder's Share tab: make share links (label, who may open, expiry, message
quota), see each link's opens, conversations and last use, revoke and rotate.

UI only: the access rules live in ``sharing.py`` and ``services``. A link's token is
shown once, right after it is made; the store keeps only its hash.
"""

from __future__ import annotations

import os
from datetime import date, timedelta
from urllib.parse import urlsplit

import streamlit as st

from personal_gpt.web import glue

POLICIES = {"signin": "People who sign in (optionally only the e-mails or domains you list)",
            "public": "Anyone with the link (no sign-in)"}


def base_url() -> str:
    """Where clients reach this app: PERSONAL_GPT_BASE_URL, else this page's own origin."""
    configured = os.environ.get("PERSONAL_GPT_BASE_URL", "").strip().rstrip("/")
    if configured:
        return configured
    try:
        parts = urlsplit(st.context.url or "")
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"
    except Exception:  # noqa: BLE001 - older runtimes without st.context.url
        pass
    return "http://localhost:8501"


def _lines(text: str) -> list[str]:
    return [x.strip() for x in text.replace(",", "\n").splitlines() if x.strip()]


def render(svc, me, gpt) -> None:
    st.caption("Send a client a link to chat with your GPT. Each link has its own label, rules and statistics; "
               "revoke it any time.")
    if not gpt.published_version:
        st.warning("Clients chat with the published version, and this GPT is not published yet: publish it "
                   "first, or links will say the GPT is not available.", icon="📣")
    _new_link_form(svc, me, gpt)
    fresh = st.session_state.pop(f"share-new-{gpt.id}", None)
    if fresh:
        label, url = fresh
        st.success(f"Link for **{label or 'your client'}** — copy it now; for your clients' safety it is shown "
                   "only once (rotate the link to get a new one).", icon="🔗")
        st.code(url, language=None)
    _links(svc, me, gpt)
    st.divider()
    from personal_gpt.web.embed_tab import render_embed

    render_embed(svc, me, gpt.id)
    st.divider()
    from personal_gpt.web.keys_tab import render_api_keys

    render_api_keys(svc, me, gpt.id)


def _new_link_form(svc, me, gpt) -> None:
    signin_ready = glue.sign_in_configured()
    with st.expander("New share link", expanded=not svc.list_share_links(me, gpt.id), icon="➕"):
        with st.form(f"share-form-{gpt.id}", clear_on_submit=True, border=False):
            label = st.text_input("Label (who is it for?)", max_chars=120, placeholder="e.g. Acme Ltd — Jane")
            policy = st.radio("Who can open it", list(POLICIES), format_func=POLICIES.get,
                              index=0 if signin_ready else 1)
            a, b = st.columns(2)
            emails = a.text_area("Allowed e-mails (one per line)", height=90, placeholder="jane@client.example")
            domains = b.text_area("Allowed e-mail domains (one per line)", height=90, placeholder="client.example")
            c, d = st.columns(2)
            expires_on = c.date_input("Expires on (optional)", value=None, min_value=date.today(),
                                      max_value=date.today() + timedelta(days=3650), format="YYYY-MM-DD")
            quota = d.number_input("Message limit (optional)", min_value=0, max_value=1_000_000, value=0, step=50,
                                   help="0 means no limit. Each question a client asks counts once.")
            submitted = st.form_submit_button("Create link", type="primary", icon="🔗")
        if policy == "signin" and not signin_ready:
            st.caption(":orange[Sign-in is not configured on this server, so sign-in links cannot be opened yet — "
                       "see docs/sign-in.md.]")
        if submitted:
            with glue.friendly_errors():
                link, token = svc.create_share_link(
                    me, gpt.id, label=label, public=policy == "public", emails=_lines(emails),
                    domains=_lines(domains), expires=expires_on, quota=int(quota) or None)
                st.session_state[f"share-new-{gpt.id}"] = (link.label, svc.share_url(token, base_url()))
                st.rerun()


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _rules(link) -> str:
    if link.public:
        who = "anyone with the link"
    elif link.allowed_emails or link.allowed_domains:
        who = "signed-in " + ", ".join(link.allowed_emails + [f"@{d}" for d in link.allowed_domains])
    else:
        who = "anyone who signs in with a verified e-mail"
    bits = [who]
    if link.expires_at:
        bits.append(f"until {link.expires_at:%Y-%m-%d}")
    if link.message_quota:
        bits.append(f"{link.messages_used}/{link.message_quota} messages")
    return " · ".join(bits)


def _links(svc, me, gpt) -> None:
    links = svc.list_share_links(me, gpt.id)
    if not links:
        st.info("No share links yet.", icon="🔗")
        return
    status_badge = {"active": ":green[active]", "revoked": ":red[revoked]", "expired": ":orange[expired]"}
    for link in links:
        with st.container(border=True, key=f"share-link-{link.id}"):
            c = st.columns([5, 1.2, 1.2])
            c[0].markdown(f"**{link.label or 'Untitled link'}** · {status_badge.get(link.status, link.status)}  \n"
                          f"{_rules(link)}")
            last = glue.when(link.last_used_at) if link.last_used_at else "never"
            c[0].caption(f"{_count(link.opens, 'open')} · {_count(link.conversations, 'conversation')} · last used {last}")
            live = link.status == "active"
            if c[1].button("Rotate", key=f"share-rot-{link.id}", disabled=not live, width="stretch",
                           help="A new URL with the same rules; the old one stops working."):
                st.session_state[f"share-ask-{gpt.id}"] = ("rotate", link.id)
                st.rerun()
            if c[2].button("Revoke", key=f"share-rev-{link.id}", disabled=not live, width="stretch"):
                st.session_state[f"share-ask-{gpt.id}"] = ("revoke", link.id)
                st.rerun()
    ask = st.session_state.get(f"share-ask-{gpt.id}")
    if ask:
        action, link_id = ask
        st.warning("Revoke this link? Anyone using it is cut off at their next message." if action == "revoke"
                   else "Make a new URL for this link? The old URL stops working at once.")
        yes, no = st.columns(2)
        if yes.button("Revoke link" if action == "revoke" else "Rotate link", type="primary", key="share-ask-yes"):
            st.session_state.pop(f"share-ask-{gpt.id}", None)

            def act() -> None:
                if action == "revoke":
                    svc.revoke_share_link(me, link_id)
                else:
                    link, token = svc.rotate_share_link(me, link_id)
                    st.session_state[f"share-new-{gpt.id}"] = (link.label, svc.share_url(token, base_url()))

            if glue.succeeded(act):
                st.rerun()
        if no.button("Cancel", key="share-ask-no"):
            st.session_state.pop(f"share-ask-{gpt.id}", None)
            st.rerun()
