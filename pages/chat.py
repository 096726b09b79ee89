"""Chat: talk to a GPT's published version; starters, streamed answers, stop,
regenerate, new chat and past conversations."""

import streamlit as st

from personal_gpt.web import glue

svc = glue.services()
me = glue.principal()
gpt_id = glue.selected_gpt_id()

if not gpt_id:
    glue.pick_gpt("Chat", [g for g in svc.list_gpts(me) if g.is_published], "Chat with",
                  "Publish a GPT in the builder and it shows up here.", "💬")

try:
    spec, version = svc.published_spec(me, gpt_id)
except glue.PersonalGptError as exc:
    glue.not_found("Chat", exc)

conv_key = f"chat-{gpt_id}"

with st.sidebar:
    if st.button("New chat", icon="➕", width="stretch"):
        st.session_state.pop(conv_key, None)
        st.rerun()
    past = svc.list_conversations(me, gpt_id, source="chat")
    if past:
        st.caption("Past conversations")
        for conv in past[:30]:
            label = conv.title or "(empty)"
            current = st.session_state.get(conv_key) == conv.id
            if st.button(glue.plain(label[:40]), key=f"conv-{conv.id}", width="stretch", type="primary" if current else "secondary",
                         help=glue.when(conv.updated_at)):
                st.session_state[conv_key] = conv.id
                st.rerun()

glue.gpt_header(spec.avatar, spec.name, spec.description)

conv_id = st.session_state.get(conv_key)
regen_key = f"regen-{gpt_id}"
regenerating = bool(st.session_state.pop(regen_key, False)) and bool(conv_id)
messages, rated = [], {}
if conv_id:
    with glue.friendly_errors():
        messages = svc.messages(me, conv_id)
        rated = svc.answer_feedback(me, conv_id)
if regenerating and messages and messages[-1].role == "assistant":
    messages = messages[:-1]  # the old answer is replaced below
glue.show_messages(messages, spec.avatar, feedback=rated, key=f"fb-{conv_id}",
                   on_rate=lambda mid, rating, comment: svc.rate_answer(me, conv_id, mid, rating, comment))

pending = None
if not messages and spec.starters:
    cols = st.columns(min(len(spec.starters), 4))
    for i, s in enumerate(spec.starters):
        if cols[i % len(cols)].button(glue.plain(s), key=f"starter-{i}", width="stretch"):
            pending = s

if not regenerating and messages and messages[-1].role == "assistant":
    if st.button("Regenerate", icon="🔁", help="Answer the last message again"):
        st.session_state[regen_key] = True
        st.rerun()

prompt = st.chat_input(f"Message {spec.name}", submit_mode="stop") or pending

if regenerating:
    try:
        with st.spinner("Answering again…"):
            reply = svc.regenerate(me, conv_id)
        with st.chat_message("assistant", avatar=glue.avatar_for(spec.avatar)):
            glue.stream_markdown(reply.pieces)
        st.rerun()
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
elif prompt:
    if not st.session_state.get(conv_key):
        st.session_state[conv_key] = svc.start_conversation(me, gpt_id, source="chat")
    cid = st.session_state[conv_key]
    if glue.stream_turn(lambda m: svc.send(me, cid, m), prompt, spec.avatar):
        st.rerun()  # show the saved turn with its actions (regenerate)
