"""The builder's Privacy tab: how long conversations are kept, "do not record
conversations", hiding e-mail addresses and phone numbers in what is stored, and
deleting old conversations now (after a confirmation).

UI only: the rules (limits, what a turn stores, the clean-up) live in ``services_privacy``.
"""

from __future__ import annotations

import streamlit as st

from personal_gpt.web import glue

FOREVER = "Keep forever"
FOR_DAYS = "Delete after a number of days"


def render_privacy(svc, p, gpt_id: str) -> None:
    """The Privacy tab for one of ``p``'s GPTs."""
    st.subheader("Privacy")
    st.caption("These settings cover every conversation with this GPT: your preview, share links, the website "
               "widget and the API. They apply from the next message on; what is already stored stays as it is.")
    try:
        current = svc.privacy_settings(p, gpt_id)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    _settings(svc, p, gpt_id, current)
    st.divider()
    _delete_now(svc, p, gpt_id, current)


def _settings(svc, p, gpt_id: str, current) -> None:
    st.markdown("**How long to keep conversations**")
    keep = st.radio("How long to keep conversations", [FOREVER, FOR_DAYS], key=f"privacy-keep-{gpt_id}",
                    index=0 if current.retention_days is None else 1, horizontal=True,
                    label_visibility="collapsed")
    days = None
    if keep == FOR_DAYS:
        days = st.number_input("Days after a conversation's last message", min_value=1, max_value=3650, step=1,
                               value=int(current.retention_days or 30), key=f"privacy-days-{gpt_id}")
        st.caption("A conversation is deleted, with its feedback, once its last message is older than this. "
                   "The clean-up runs when the server starts and then every hour.")
    record = not st.toggle(
        "Do not record conversations", value=not current.record, key=f"privacy-norecord-{gpt_id}")
    st.caption("When on, messages are counted (for limits and analytics) but their words are not saved: you cannot "
               "read these conversations later. The GPT still remembers what was said during a conversation, but "
               "after the server restarts earlier messages show as “not kept”.")
    redact = st.toggle("Hide e-mail addresses and phone numbers in stored conversations", value=current.redact,
                       key=f"privacy-redact-{gpt_id}")
    st.caption("When on, they are saved as [email] and [phone] (in messages and conversation titles). The GPT still "
               "sees them while it answers.")
    if st.button("Save privacy settings", type="primary", key=f"privacy-save-{gpt_id}"):
        if glue.succeeded(lambda: svc.save_privacy_settings(
                p, gpt_id, retention_days=int(days) if days is not None else None, record=record, redact=redact)):
            st.toast("Privacy settings saved.", icon="🔒")


def _delete_now(svc, p, gpt_id: str, current) -> None:
    st.markdown("**Delete old conversations now**")
    ask_key = f"privacy-ask-{gpt_id}"
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    older = a.number_input("Delete conversations older than (days)", min_value=1, max_value=3650, step=1,
                           value=int(current.retention_days or 30), key=f"privacy-older-{gpt_id}")
    if b.button("Delete…", key=f"privacy-delete-{gpt_id}", width="stretch"):
        st.session_state[ask_key] = int(older)
    asking = st.session_state.get(ask_key)
    if not asking:
        return
    st.warning(f"Delete every conversation with this GPT whose last message is more than {asking:,} "
               f"day{'' if asking == 1 else 's'} old — yours and your visitors', with their feedback? "
               "This cannot be undone.", icon="⚠️")
    yes, no = st.columns(2)
    if yes.button("Delete conversations", type="primary", key=f"privacy-yes-{gpt_id}"):
        st.session_state.pop(ask_key, None)
        deleted = []
        if glue.succeeded(lambda: deleted.append(svc.delete_old_conversations(p, gpt_id, asking))):
            n = deleted[0]
            st.toast(f"Deleted {n:,} conversation{'' if n == 1 else 's'}.", icon="🗑️")
            st.success(f"Deleted {n:,} conversation{'' if n == 1 else 's'} older than {asking:,} "
                       f"day{'' if asking == 1 else 's'}.", icon="🗑️")
    if no.button("Cancel", key=f"privacy-no-{gpt_id}"):
        st.session_state.pop(ask_key, None)
        st.rerun()
