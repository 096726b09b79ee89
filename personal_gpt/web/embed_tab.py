"""The builder's Share tab, embed part: the sites allowed to show the chat widget
(empty = off), who may chat, theme and limits; the script and iframe snippets to
copy; a live preview; the "test from this domain" check; visitors' widget
conversations, labelled with their site.

UI only: checks and rules live in ``embed_sites.py``, ``limits.py`` and the services.
"""

from __future__ import annotations

import html
from urllib.parse import quote

import streamlit as st

from personal_gpt.web import glue

POLICIES = {"public": "Anyone on these sites (no sign-in)",
            "signin": "People who sign in (in a pop-up; optionally only the e-mails or domains you list)"}
POSITIONS = {"bottom-right": "Bottom right", "bottom-left": "Bottom left"}
LIMIT_FIELDS = [
    ("per_visitor_minute", "Messages per visitor per minute", 1, 1_000),
    ("per_visitor_day", "Messages per visitor per day", 1, 100_000),
    ("per_gpt_day", "Messages per day, all visitors together", 1, 10_000_000),
    ("max_message_chars", "Longest message (characters)", 20, 8_000),
    ("max_conversation_messages", "Messages in one conversation", 2, 10_000),
]


def _base_url() -> str:
    from personal_gpt.web.share_tab import base_url  # lazily: share_tab calls this module

    return base_url()


def script_snippet(base: str, gpt_id: str) -> str:
    return f'<script src="{base}/embed.js" data-gpt="{gpt_id}" async></script>'


def iframe_snippet(base: str, gpt_id: str, site: str, title: str) -> str:
    src = f"{base}/embed/{gpt_id}?site={quote(site, safe=':/')}"
    return (f'<iframe src="{src}" title="{html.escape(title, quote=True)}" width="400" height="600" '
            'style="border:0;border-radius:12px;max-width:100%"></iframe>')


def _lines(items) -> str:
    return "\n".join(items)


def render_embed(svc, p, gpt_id: str) -> None:
    """The embed section of the Share tab for one of ``p``'s GPTs."""
    st.subheader("Embed on your website")
    st.caption("Paste one script tag into your site (Webflow, WordPress, Wix, Bubble or plain HTML) and a chat "
               "bubble appears. Only the sites you list can show it. See docs/embed.md for step-by-step guides.")
    try:
        gpt = svc.get_gpt(p, gpt_id)
        settings = svc.embed_settings(p, gpt_id)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    if not settings.enabled:
        st.info("The embed is off while the list of allowed sites is empty. Add your site below to turn it on.",
                icon="🔒")
    elif not gpt.published_version:
        st.warning("Visitors chat with the published version, and this GPT is not published yet: the widget says "
                   "it is not available until you publish.", icon="📣")
    _settings_form(svc, p, gpt, settings)
    settings = svc.embed_settings(p, gpt_id)
    if settings.enabled:
        _snippets(gpt, settings)
        if gpt.published_version:
            _preview(gpt)
    _site_check(svc, p, gpt_id)
    _conversations(svc, p, gpt)


def _settings_form(svc, p, gpt, settings) -> None:
    theme, limits = settings.theme, settings.limits
    with st.expander("Widget settings", expanded=not settings.enabled, icon="⚙️"):
        with st.form(f"embed-form-{gpt.id}", border=False):
            sites = st.text_area(
                "Allowed sites (one per line)", value=_lines(settings.sites), height=100,
                placeholder="https://www.example.com",
                help="Exact web addresses: https://www.example.com and https://example.com are different sites — "
                     "list both if your site answers on both. http:// is accepted only for localhost and "
                     "127.0.0.1 (testing). Leave empty to turn the embed off.")
            policy = st.radio("Who can chat", list(POLICIES), format_func=POLICIES.get,
                              index=list(POLICIES).index(settings.policy))
            a, b = st.columns(2)
            emails = a.text_area("Allowed e-mails (sign-in only)", value=_lines(settings.allowed_emails), height=80)
            domains = b.text_area("Allowed e-mail domains (sign-in only)", value=_lines(settings.allowed_domains),
                                  height=80)
            st.markdown("**Look**")
            c1, c2, c3 = st.columns([1, 2, 1])
            colour = c1.color_picker("Colour", value=theme["colour"])
            title = c2.text_input("Title", value=theme["title"], max_chars=60, placeholder=gpt.name)
            avatar = c3.text_input("Avatar (emoji)", value=theme["avatar"], max_chars=16, placeholder=gpt.spec.avatar)
            greeting = st.text_area("Greeting", value=theme["greeting"], max_chars=300, height=70,
                                    placeholder="Hi! Ask me anything about our shop.")
            d1, d2 = st.columns(2)
            position = d1.selectbox("Position", list(POSITIONS), format_func=POSITIONS.get,
                                    index=list(POSITIONS).index(theme["position"]))
            open_on_load = d2.checkbox("Open the chat when the page loads", value=theme["open_on_load"])
            st.markdown("**Limits** (protect yourself from abuse and cost)")
            cols = st.columns(len(LIMIT_FIELDS))
            values = {}
            for col, (name, label, low, high) in zip(cols, LIMIT_FIELDS):
                values[name] = col.number_input(label, min_value=low, max_value=high, value=getattr(limits, name),
                                                step=1)
            saved = st.form_submit_button("Save widget settings", type="primary", icon="💾")
        if saved:
            def save() -> None:
                svc.save_embed_settings(
                    p, gpt.id, sites=sites, policy=policy, emails=emails if policy == "signin" else "",
                    domains=domains if policy == "signin" else "",
                    theme={"colour": colour, "title": title, "greeting": greeting, "avatar": avatar,
                           "position": position, "open_on_load": bool(open_on_load)},
                    limits={k: int(v) for k, v in values.items()},
                )

            if glue.succeeded(save):
                st.session_state[f"embed-saved-{gpt.id}"] = True
                st.rerun()
    if st.session_state.pop(f"embed-saved-{gpt.id}", False):
        st.success("Widget settings saved.", icon="✅")
    if settings.policy == "signin" and not glue.sign_in_configured():
        st.caption(":orange[Sign-in is not configured on this server, so visitors cannot sign in yet — "
                   "see docs/sign-in.md.]")


def _snippets(gpt, settings) -> None:
    base = _base_url()
    st.markdown("**Add it to your site** — paste this before `</body>` (the copy button is at the top right):")
    st.code(script_snippet(base, gpt.id), language="html")
    st.markdown("Or show the chat inline, in a plain iframe:")
    st.code(iframe_snippet(base, gpt.id, settings.sites[0], settings.theme["title"] or gpt.name), language="html")


def _preview(gpt) -> None:
    with st.expander("Live preview", icon="👀"):
        st.caption("The chat exactly as visitors see it inside the bubble (conversations here are recorded with "
                   "this app's own address as their site).")
        st.iframe(f"/embed/{gpt.id}?site={quote(_base_url(), safe=':/')}", height=560)


def _site_check(svc, p, gpt_id: str) -> None:
    with st.form(f"embed-check-{gpt_id}", border=False):
        a, b = st.columns([4, 1], vertical_alignment="bottom")
        address = a.text_input("Test from this domain", placeholder="https://www.example.com/contact")
        checked = b.form_submit_button("Check", width="stretch")
    if checked:
        with glue.friendly_errors():
            ok, sentence = svc.check_embed_site(p, gpt_id, address)
            (st.success if ok else st.error)(sentence, icon="✅" if ok else "🚫")


def _conversations(svc, p, gpt) -> None:
    rows = svc.embed_conversations(p, gpt.id)
    st.markdown("**Widget conversations**")
    if not rows:
        st.info("No widget conversations yet.", icon="💬")
        return
    st.dataframe(
        [{"Site": r.site, "Started": glue.when(r.created_at), "Last message": glue.when(r.updated_at),
          "Messages": r.messages, "Visitor": r.visitor, "First message": r.title} for r in rows],
        hide_index=True, width="stretch",
    )
    labels = {r.id: f"{r.site} · {glue.when(r.created_at)} · {r.title or 'untitled'}" for r in rows}
    chosen = st.selectbox("Read a conversation", [None, *labels], format_func=lambda x: "—" if x is None else labels[x],
                          key=f"embed-read-{gpt.id}")
    if chosen:
        with glue.friendly_errors():
            glue.show_messages(svc.embed_conversation_messages(p, gpt.id, chosen), gpt.spec.avatar)
