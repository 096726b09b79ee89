"""The API keys section of the builder's Share tab: create a named key (shown once),
see each key's use, revoke with a confirmation, and copy a "how to call it" snippet.

UI only: keys are made, listed and revoked by ``services``; the store keeps only hashes.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from personal_gpt.markdown_safe import plain
from personal_gpt.web import glue


def _base_url() -> str:
    from personal_gpt.web.share_tab import base_url  # lazily: share_tab calls this module

    return base_url()


def render_api_keys(svc, p, gpt_id: str) -> None:
    """The whole section for one GPT (``p`` is the acting creator)."""
    st.subheader("API keys", anchor=False)
    st.caption("Let other programs call this GPT over HTTP: Zapier, Make, n8n, Bubble, or any OpenAI client. "
               "A key works for this GPT only; revoke it any time.")
    try:
        gpt = svc.get_gpt(p, gpt_id)
        keys = svc.list_api_keys(p, gpt_id)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    if not gpt.published_version:
        st.warning("Programs call the published version, and this GPT is not published yet: until you publish "
                   "it, calls get “not available”.", icon="📣")
    fresh = st.session_state.pop(f"apikey-new-{gpt_id}", None)
    if fresh:
        name, key = fresh
        st.warning(f"Your new key{f' **{plain(name)}**' if name else ''} — copy it now: **it will not be shown again** "
                   "(only its last four characters are kept on show).", icon="🔑")
        st.code(key, language=None)
    _create_form(svc, p, gpt_id)
    _table(keys)
    _revoke(svc, p, gpt_id, [k for k in keys if k.active])
    _how_to_call(gpt_id)
    if keys:
        _recent_calls(svc, p, gpt_id, gpt.spec.avatar)


def _create_form(svc, p, gpt_id: str) -> None:
    with st.form(f"apikey-form-{gpt_id}", clear_on_submit=True, border=False):
        a, b = st.columns([3, 1], vertical_alignment="bottom")
        name = a.text_input("Key name (what will use it?)", max_chars=100, placeholder="e.g. Zapier — new leads",
                            key=f"apikey-name-{gpt_id}")
        submitted = b.form_submit_button("Create key", type="primary", icon="🔑", width="stretch")
    if submitted:
        made = {}

        def create() -> None:
            key, secret = svc.create_api_key(p, gpt_id, name=name)
            made["value"] = (key.name, secret)

        if glue.succeeded(create):
            st.session_state[f"apikey-new-{gpt_id}"] = made["value"]
            st.rerun()


def _table(keys) -> None:
    if not keys:
        st.info("No API keys yet.", icon="🔑")
        return
    rows = [{
        "Name": k.name or "Untitled key",
        "Key": k.masked,
        "Created": glue.when(k.created_at),
        "Last used": glue.when(k.last_used_at) if k.last_used_at else "never",
        "Uses": k.uses,
        "Status": "active" if k.active else "revoked",
    } for k in keys]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _revoke(svc, p, gpt_id: str, active) -> None:
    ask_key = f"apikey-ask-{gpt_id}"
    if not active:
        st.session_state.pop(ask_key, None)
        return
    labels = {k.id: f"{k.name or 'Untitled key'} ({k.masked})" for k in active}
    asking = st.session_state.get(ask_key)
    if asking not in labels:
        a, b = st.columns([3, 1], vertical_alignment="bottom")
        choice = a.selectbox("Revoke a key", list(labels), format_func=labels.get, index=None,
                             placeholder="Choose a key to revoke", key=f"apikey-pick-{gpt_id}")
        if b.button("Revoke…", key=f"apikey-revoke-{gpt_id}", disabled=choice is None, width="stretch"):
            st.session_state[ask_key] = choice
            st.rerun()
        return
    st.warning(f"Revoke **{plain(labels[asking])}**? Programs using it get “invalid API key” from their next call; "
               "this cannot be undone.", icon="⚠️")
    yes, no = st.columns(2)
    if yes.button("Revoke key", type="primary", key=f"apikey-yes-{gpt_id}"):
        st.session_state.pop(ask_key, None)
        if glue.succeeded(lambda: svc.revoke_api_key(p, asking)):
            st.rerun()
    if no.button("Cancel", key=f"apikey-no-{gpt_id}"):
        st.session_state.pop(ask_key, None)
        st.rerun()


def curl_snippet(base: str, gpt_id: str) -> str:
    return (
        f"curl {base}/v1/chat/completions \\\n"
        '  -H "Authorization: Bearer $PERSONAL_GPT_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d '{{\"model\": \"{gpt_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
    )


def python_snippet(base: str, gpt_id: str) -> str:
    return (
        "from openai import OpenAI  # pip install openai\n\n"
        f'client = OpenAI(base_url="{base}/v1", api_key="pgk_...")  # your key\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{gpt_id}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        ")\n"
        "print(reply.choices[0].message.content)"
    )


def _how_to_call(gpt_id: str) -> None:
    base = _base_url()
    with st.expander("How to call it", icon="📎"):
        st.markdown(f"OpenAI-compatible: base URL **`{base}/v1`**, model **`{gpt_id}`**, your key as the API key. "
                    "Guides for Zapier, Make, n8n and Bubble are in docs/integrations.md.")
        st.caption("curl (set PERSONAL_GPT_KEY to your key first)")
        st.code(curl_snippet(base, gpt_id), language="bash")
        st.caption("Python, with the openai library")
        st.code(python_snippet(base, gpt_id), language="python")


def _recent_calls(svc, p, gpt_id: str, avatar: str) -> None:
    with st.expander("Recent API calls", icon="🧾"):
        try:
            calls = svc.api_conversations(p, gpt_id, limit=50)
        except glue.PersonalGptError as exc:
            st.error(str(exc), icon="⚠️")
            return
        if not calls:
            st.caption("No calls yet.")
            return
        st.dataframe(pd.DataFrame([{
            "When": glue.when(c.created_at), "Key": c.key_name or ("Untitled key" if c.key_id else "deleted key"),
            "End user": c.end_user, "Question": c.title, "Messages": c.message_count,
        } for c in calls]), hide_index=True, width="stretch")
        labels = {c.id: f"{glue.when(c.created_at)} — {c.title[:60]}" for c in calls}
        chosen = st.selectbox("Read a call", list(labels), format_func=labels.get, index=None,
                              placeholder="Choose a call to read", key=f"apikey-call-{gpt_id}")
        if chosen:
            with glue.friendly_errors():
                glue.show_messages(svc.api_conversation_messages(p, gpt_id, chosen), avatar)
