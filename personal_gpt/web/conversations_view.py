"""The Conversations page's body: filters, the table of a GPT's conversations, one
conversation with its sources and feedback, "Fix this answer", and the corrected answers.

UI only: every query and decision is the services'; user and model text is shown through
``markdown_safe`` (or as plain text), never as HTML.
"""

from __future__ import annotations

import streamlit as st

from personal_gpt.web import glue

SOURCE_LABELS = {
    "preview": "Builder preview", "chat": "Chat", "cli": "Command line", "share": "Share link", "embed": "Widget",
    "api": "API", "test": "Test",
}
ANY = "Any"
TARGET_LABELS = {"knowledge": "Add to knowledge", "finetune": "Add to fine-tuning data"}


def where(c) -> str:
    """Where a conversation came from, in words."""
    if c.source == "share":
        return f"Link “{c.link_label}”" if c.link_label else ("Share link" if c.share_link_id else "Share link (deleted)")
    if c.source == "embed":
        return c.site or "Widget"
    if c.source == "api":
        return f"Key “{c.key_name}”" if c.key_name else "API key"
    return SOURCE_LABELS.get(c.source, c.source)


def _filters(svc, me, gpt_id: str) -> dict:
    choices = svc.conversation_filters(me, gpt_id)
    k = f"cv-{gpt_id}"
    with st.container(border=True):
        top = st.columns([3, 2, 2])
        text = top[0].text_input("Search the messages", key=f"{k}-text", placeholder="Words in a question or answer")
        dates = top[1].date_input("Dates", value=(), key=f"{k}-dates", format="YYYY-MM-DD")
        people = [ANY, "You", "Anonymous visitors"] + choices.people
        person = top[2].selectbox("Person", people, key=f"{k}-person")
        row = st.columns(4)
        source = row[0].selectbox("Source", [ANY] + list(SOURCE_LABELS),
                                  format_func=lambda s: SOURCE_LABELS.get(s, s), key=f"{k}-source")
        links = dict([(ANY, ANY)] + [(lid, label or f"Link {lid[-6:]}") for lid, label in choices.links])
        link = row[1].selectbox("Share link", list(links), format_func=lambda x: links[x], key=f"{k}-link")
        site = row[2].selectbox("Site", [ANY] + choices.sites, key=f"{k}-site")
        keys = dict([(ANY, ANY)] + [(kid, name or f"Key {kid[-6:]}") for kid, name in choices.keys])
        key = row[3].selectbox("API key", list(keys), format_func=lambda x: keys[x], key=f"{k}-key")
    since = until = None
    if isinstance(dates, (tuple, list)) and dates:
        since, until = dates[0], dates[-1]
    elif dates and not isinstance(dates, (tuple, list)):
        since = until = dates
    who = {ANY: None, "You": "you", "Anonymous visitors": "anonymous visitor"}.get(person, person)
    return {
        "source": None if source == ANY else source, "link_id": None if link == ANY else link,
        "site": None if site == ANY else site, "key_id": None if key == ANY else key, "person": who,
        "since": since, "until": until, "text": text.strip() or None,
    }


def _table(rows):
    import pandas as pd

    return pd.DataFrame([{
        "When": r.created_at.astimezone().replace(tzinfo=None) if r.created_at else None,
        "Source": SOURCE_LABELS.get(r.source, r.source), "Where": where(r), "Person": r.person,
        "Messages": r.messages, "Title": r.title or "(no title)",
        "👍": r.thumbs_up, "👎": r.thumbs_down,
    } for r in rows], columns=["When", "Source", "Where", "Person", "Messages", "Title", "👍", "👎"])


def _csv(svc, me, gpt_id: str, rows) -> bytes:
    """Every listed conversation, one row per message (unrecorded text stays empty)."""
    import pandas as pd

    from personal_gpt.csv_safe import to_csv_bytes

    out = []
    for r in rows:
        detail = svc.creator_conversation(me, r.id)
        for t in detail.turns:
            out.append({
                "conversation": r.id, "started": r.created_at.isoformat() if r.created_at else "",
                "source": r.source, "where": where(r), "person": r.person, "role": t.role,
                "time": t.created_at.isoformat() if t.created_at else "", "text": t.content if t.recorded else "",
                "recorded": t.recorded, "rating": t.rating if t.rating is not None else "", "comment": t.comment,
            })
    return to_csv_bytes(pd.DataFrame(out, columns=["conversation", "started", "source", "where", "person", "role",
                                                   "time", "text", "recorded", "rating", "comment"]))


def _fix_form(svc, me, gpt_id: str, turn) -> None:
    with st.expander("Fix this answer", icon="🛠️"):
        with st.form(f"fix-{turn.id}", clear_on_submit=True):
            answer = st.text_area("The right answer", key=f"fix-a-{turn.id}", max_chars=8000,
                                  placeholder="Write the answer your GPT should have given.")
            target = st.radio("Where should it go?", list(TARGET_LABELS), format_func=TARGET_LABELS.get,
                              horizontal=True, key=f"fix-t-{turn.id}",
                              help="Knowledge: a small Q&A file your GPT looks up next time. Fine-tuning data: "
                                   "an example offered in the builder's Fine-tune tab.")
            if st.form_submit_button("Save the right answer", type="primary"):
                try:
                    svc.fix_answer(me, turn.id, answer, target)
                except glue.PersonalGptError as exc:
                    st.error(str(exc), icon="⚠️")
                else:
                    st.toast("Added to the knowledge: your GPT will find it once the file is ready."
                             if target == "knowledge" else "Added to the fine-tuning data (see the Fine-tune tab).",
                             icon="✅")


def _conversation(svc, me, gpt_id: str, conv_id: str, avatar: str) -> None:
    try:
        detail = svc.creator_conversation(me, conv_id)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    c = detail.summary
    st.subheader(glue.plain(c.title) if c.title else "Conversation")
    st.caption(f"{glue.when(c.created_at)} · {SOURCE_LABELS.get(c.source, c.source)} · {glue.plain(where(c))} · "
               f"{glue.plain(c.person)} · {c.messages} messages")
    for t in detail.turns:
        with st.chat_message(t.role, avatar=glue.avatar_for(avatar) if t.role == "assistant" else None):
            if not t.recorded:
                st.caption("Not recorded (privacy setting)")
            else:
                st.markdown(glue.for_streamlit(t.content))
            if t.role != "assistant":
                continue
            if t.stopped:
                st.caption("Stopped.")
            glue.show_sources(t.citations)
            if t.rating is not None:
                thumb = "👍 Helpful" if t.rating == 1 else "👎 Not helpful"
                st.caption(thumb + (" — " if t.comment else ""))
                if t.comment:
                    st.text(t.comment)
            if t.recorded:
                _fix_form(svc, me, gpt_id, t)


def _corrections(svc, me, gpt_id: str) -> None:
    items = svc.list_corrections(me, gpt_id)
    st.subheader("Corrected answers")
    if not items:
        st.caption("None yet. Open a conversation and use “Fix this answer” under an answer.")
        return
    for fix in items:
        with st.container(border=True):
            cols = st.columns([6, 1])
            cols[0].markdown(f"**Q:** {glue.for_streamlit(fix.question)}")
            cols[0].markdown(glue.for_streamlit(fix.answer))
            if fix.target == "knowledge":
                status = fix.knowledge_file_status or "removed"
                cols[0].caption(f"In the knowledge as “{glue.plain(fix.knowledge_file_name) or 'a removed file'}” "
                                f"({status}) · {glue.when(fix.created_at)}")
            else:
                cols[0].caption(f"In the fine-tuning data · {glue.when(fix.created_at)}")
            if cols[1].button("Delete", key=f"fix-del-{fix.id}", help="Forget this corrected answer"
                              + (" and remove its knowledge file" if fix.knowledge_file_id else "")):
                if glue.succeeded(lambda: svc.delete_correction(me, fix.id)):
                    st.toast("Corrected answer deleted.", icon="🗑️")
                    st.rerun()


def render(svc, me, gpt_id: str) -> None:
    """The whole page for one GPT (the caller has picked ``gpt_id``)."""
    try:
        gpt = svc.get_gpt(me, gpt_id)
    except glue.PersonalGptError as exc:
        glue.not_found("Conversations", exc)
        return
    st.title(f"Conversations · {glue.plain(gpt.name)}")
    st.caption("Every conversation with this GPT: your builder preview and chats, share links, the widget and "
               "the API. Open one to read it with its sources, see the feedback and fix answers.")
    try:
        filters = _filters(svc, me, gpt_id)
        rows = svc.creator_conversations(me, gpt_id, **filters)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        rows, filters = [], {}
    if not rows:
        if any(v for v in filters.values()):
            st.info("No conversation matches these filters.", icon="🔎")
        else:
            st.info("No conversations yet. They appear here when you chat in the builder preview or when people "
                    "use your share links, widget or API.", icon="💬")
    else:
        st.dataframe(_table(rows), hide_index=True, width="stretch", height=min(38 * (len(rows) + 1), 360),
                     column_config={"When": st.column_config.DatetimeColumn("When", format="D MMM YYYY, HH:mm"),
                                    "Title": st.column_config.TextColumn("Title", width="medium"),
                                    "Messages": st.column_config.NumberColumn("Messages", width="small"),
                                    "👍": st.column_config.NumberColumn("👍", width="small"),
                                    "👎": st.column_config.NumberColumn("👎", width="small")})
        label = {r.id: f"{glue.when(r.created_at)} · {where(r)} · {r.title or '(no title)'}"[:120] for r in rows}
        pick = st.selectbox("Open a conversation", [r.id for r in rows], index=None, format_func=label.get,
                            key=f"cv-open-{gpt_id}", placeholder="Choose one to read it")
        listed = tuple(r.id for r in rows)
        if st.button("Prepare CSV download", icon="⬇️", key=f"cv-csv-{gpt_id}",
                     help="All conversations in the list, one row per message"):
            st.session_state[f"cv-csv-data-{gpt_id}"] = (listed, _csv(svc, me, gpt_id, rows))
        ready_for, data = st.session_state.get(f"cv-csv-data-{gpt_id}") or ((), b"")
        if data and ready_for == listed:  # made for the list as it is now
            st.download_button("Download conversations (CSV)", data, file_name=f"{gpt_id}-conversations.csv",
                               mime="text/csv", key=f"cv-dl-{gpt_id}")
        if pick:
            _conversation(svc, me, gpt_id, pick, gpt.spec.avatar)
    _corrections(svc, me, gpt_id)
