"""The client's view of a shared GPT (reached through /s/<token>): the GPT's name,
avatar and starters, the client's own conversations on this link, sign-in when the
link needs it, and a friendly page that says why when access is refused."""

import streamlit as st

from personal_gpt.web import glue

svc = glue.services()
link_id, visitor = glue.share_visitor()


def stop_with(message: str, icon: str = "🔒", sign_in: bool = False) -> None:
    st.title("Personal GPTs")
    st.info(message, icon=icon)
    if sign_in:
        glue.sign_in_links("")
    if visitor.principal is not None:
        glue.sign_out_link(f"Signed in as {visitor.principal.email or visitor.principal.subject}")
    st.stop()


if link_id is None:
    stop_with("Open the link you were sent to start chatting.", icon="🔗")
if not link_id:
    from personal_gpt.sharing import NOT_AVAILABLE

    stop_with(NOT_AVAILABLE)

try:
    view = svc.shared_access(link_id, visitor)
except glue.PersonalGptError as exc:
    stop_with(str(exc))

decision = view.decision
if decision.outcome == "sign_in":
    stop_with(decision.message, sign_in=True)
if decision.outcome != "allow":
    stop_with(decision.message)

conv_key = f"shared-{link_id}"

with st.sidebar:
    if visitor.principal is not None:
        glue.sign_out_link(visitor.principal.email or "Signed in")
    if st.button("New chat", icon="➕", width="stretch"):
        st.session_state.pop(conv_key, None)
        st.rerun()
    with glue.friendly_errors():
        past = svc.shared_conversations(link_id, visitor)
        if past:
            st.caption("Your conversations")
            for conv in past[:30]:
                current = st.session_state.get(conv_key) == conv.id
                if st.button(glue.plain((conv.title or "(empty)")[:40]), key=f"sconv-{conv.id}", width="stretch",
                             type="primary" if current else "secondary", help=glue.when(conv.updated_at)):
                    st.session_state[conv_key] = conv.id
                    st.rerun()

glue.gpt_header(view.avatar, view.name, view.description)

conv_id = st.session_state.get(conv_key)
messages, rated = [], {}
if conv_id:
    with glue.friendly_errors():
        messages = svc.shared_messages(link_id, visitor, conv_id)
        rated = svc.shared_answer_feedback(link_id, visitor, conv_id)
for m in messages:
    with st.chat_message(m.role, avatar=glue.avatar_for(view.avatar) if m.role == "assistant" else None):
        st.markdown(glue.for_streamlit(m.content))  # no raw HTML, no unsafe link, no remote image
        if m.role == "assistant" and m.stopped:
            st.caption("Stopped.")
        if m.role == "assistant":
            glue.show_sources(getattr(m, "citations", None) or [])  # only when the creator shows sources
            if getattr(m, "id", None):
                glue.feedback_box(m.id, rated.get(m.id), key=f"sfb-{conv_id}", on_rate=lambda mid, rating, comment:
                                  svc.rate_shared_answer(link_id, visitor, conv_id, mid, rating, comment))

pending = None
if not messages and view.starters:
    cols = st.columns(min(len(view.starters), 4))
    for i, s in enumerate(view.starters):
        if cols[i % len(cols)].button(glue.plain(s), key=f"sstarter-{i}", width="stretch"):
            pending = s

prompt = st.chat_input(f"Message {view.name}", submit_mode="stop") or pending
if prompt:
    try:
        if not st.session_state.get(conv_key):
            st.session_state[conv_key] = svc.start_shared_conversation(link_id, visitor)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        st.stop()
    cid = st.session_state[conv_key]
    if glue.stream_turn(lambda m: svc.send_shared(link_id, visitor, cid, m), prompt, view.avatar):
        st.rerun()
