"""Builder: edit a GPT (name, avatar, instructions, starters, model) with a live
preview chat beside the form; save drafts, publish, browse and restore versions."""

import base64

import streamlit as st

from personal_gpt.web import glue

svc = glue.services()
me = glue.principal()
gpt_id = glue.selected_gpt_id()

MAX_AVATAR_BYTES = 300_000
IMAGE_TYPES = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "gif": "gif", "webp": "webp"}


if not gpt_id:
    glue.pick_gpt("Builder", svc.list_gpts(me), "Which GPT do you want to edit?",
                  "You have no GPTs yet: start one from a template on **My GPTs**.", "👋")

try:
    gpt = svc.get_gpt(me, gpt_id)
except glue.PersonalGptError as exc:
    glue.not_found("Builder", exc)

spec = gpt.spec
k = f"{gpt.id}-{gpt.revision}"  # widget keys: a saved/restored revision re-reads the stored values

head = st.columns([6, 2, 2, 2])
head[0].title(f"{spec.avatar if not spec.avatar.startswith('data:') else '🖼️'} {spec.name}")
if gpt.published_version:
    status = f"Published v{gpt.published_version}"
    if gpt.published_version != gpt.latest_version:
        status += f" · latest draft v{gpt.latest_version} is not published"
    head[0].caption(f":green[●] {status}")
else:
    head[0].caption(f":orange[●] Draft v{gpt.latest_version} — not published yet")
if gpt.published_version and head[1].button("Open chat", icon="💬", width="stretch"):
    st.switch_page("pages/chat.py", query_params={"gpt": gpt.id})
head[2].page_link("pages/conversations.py", label="Conversations", icon="🗂️", query_params={"gpt": gpt.id})
head[3].page_link("pages/analytics.py", label="Analytics", icon="📊", query_params={"gpt": gpt.id})

configure, knowledge_tab, test_tab, finetune_tab, share_tab, privacy_tab, versions_tab, export_tab = st.tabs(
    ["Configure", "Knowledge", "Test", "Fine-tune", "Share", "Privacy", "Versions", "Export"]
)

with configure:
    form_col, preview_col = st.columns([3, 2], gap="large")

    with form_col:
        name = st.text_input("Name", value=spec.name, max_chars=80, key=f"name-{k}")
        description = st.text_input(
            "Description", value=spec.description, max_chars=500, key=f"desc-{k}",
            placeholder="One sentence your clients see, e.g. 'Answers questions about our courses'",
        )
        a1, a2 = st.columns([1, 3])
        current_image = spec.avatar if spec.avatar.startswith("data:") else ""
        emoji = a1.text_input("Avatar (emoji)", value="" if current_image else spec.avatar, max_chars=8, key=f"emoji-{k}")
        upload = a2.file_uploader("…or upload an image (PNG, JPEG, GIF, WebP, max 300 KB)",
                                  type=list(IMAGE_TYPES), key=f"avatar-{k}")
        avatar = emoji.strip() or current_image or "🤖"
        avatar_error = None
        if upload is not None:
            data = upload.getvalue()
            ext = upload.name.rsplit(".", 1)[-1].lower()
            if len(data) > MAX_AVATAR_BYTES:
                avatar_error = "That image is larger than 300 KB; pick a smaller one."
            else:
                avatar = f"data:image/{IMAGE_TYPES.get(ext, 'png')};base64,{base64.b64encode(data).decode()}"
        if avatar.startswith("data:"):
            a1.image(avatar, width=48)
        if avatar_error:
            st.error(avatar_error)

        instructions = st.text_area(
            "Instructions", value=spec.instructions, height=280, key=f"instr-{k}",
            help="What your GPT does, how it talks, what it must never do. Short bullet rules work best.",
        )
        starters_text = st.text_area(
            "Conversation starters (one per line)", value="\n".join(spec.starters), height=110, key=f"starters-{k}"
        )
        choices = svc.model_choices(me)
        refs = [c[0] for c in choices]
        current_ref = spec.model if spec.model in refs else ""
        model_ref = st.selectbox(
            "Model", refs, index=refs.index(current_ref), format_func=dict(choices).get, key=f"model-{k}",
            help="Add Ollama, vLLM, llama.cpp server or OpenAI endpoints in Settings.",
        )
        with st.expander("Answer settings"):
            g = spec.generation
            temperature = st.slider("Creativity (temperature)", 0.0, 2.0, float(g.temperature), 0.05, key=f"temp-{k}",
                                    help="0 = always the same answer; higher = more varied.")
            max_new_tokens = st.slider("Longest answer (tokens)", 16, 2048, int(g.max_new_tokens), 16, key=f"len-{k}")
            top_p = st.slider("Top-p", 0.05, 1.0, float(g.top_p), 0.05, key=f"topp-{k}")
            repetition_penalty = st.slider("Repetition penalty", 1.0, 2.0, float(g.repetition_penalty), 0.05, key=f"rep-{k}")

        draft = {
            "name": name, "description": description, "avatar": avatar, "instructions": instructions,
            "starters": [s for s in starters_text.splitlines() if s.strip()], "model": model_ref,
            "generation": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                           "repetition_penalty": repetition_penalty, "seed": g.seed},
            "template_id": spec.template_id, "blanks": spec.blanks,
            "knowledge_only": st.session_state.get(f"konly-{k}", spec.knowledge_only),
            "strictness": st.session_state.get(f"strict-{k}", spec.strictness),
            "refusal": st.session_state.get(f"refusal-{k}", spec.refusal),
            "show_sources": st.session_state.get(f"showsrc-{k}", spec.show_sources),
        }
        draft_spec, draft_error = None, None
        try:
            from personal_gpt.services import make_spec

            draft_spec = make_spec(draft)
            count = svc.count_instruction_tokens(me, draft_spec)
            share = min(1.0, (count.tokens + draft_spec.generation.max_new_tokens) / count.context_window)
            st.progress(share, text=f"Instructions: {'' if count.exact else '≈'}{count.tokens:,} tokens "
                                    f"+ {draft_spec.generation.max_new_tokens:,} for the answer, of the model's "
                                    f"{count.context_window:,}-token context window")
        except glue.PersonalGptError as exc:
            draft_error = str(exc)
            st.error(draft_error, icon="⚠️")

        b = st.columns(4)
        save = b[0].button("Save draft", icon="💾", width="stretch", disabled=draft_spec is None)
        publish = b[1].button("Publish", icon="🚀", type="primary", width="stretch", disabled=draft_spec is None)
        duplicate = b[2].button("Duplicate", icon="📄", width="stretch")
        delete = b[3].button("Delete", icon="🗑️", width="stretch")

        if save or publish:
            with glue.friendly_errors():
                saved = svc.save_draft(me, gpt.id, draft_spec, gpt.revision)
                if publish:
                    saved = svc.publish(me, gpt.id)
                    st.toast(f"Published v{saved.published_version}: clients now chat with this version.", icon="🚀")
                else:
                    st.toast(f"Saved as v{saved.latest_version}.", icon="💾")
                st.rerun()
        if duplicate:
            with glue.friendly_errors():
                copy = svc.duplicate(me, gpt.id)
                st.switch_page("pages/builder.py", query_params={"gpt": copy.id})

        def close_delete() -> None:
            st.session_state.pop(f"delete-{gpt.id}", None)

        @st.dialog("Delete this GPT?", on_dismiss=close_delete)
        def confirm_delete() -> None:
            st.write(f"**{spec.name}**, all its versions and all its conversations will be deleted. This cannot be undone.")
            c1, c2 = st.columns(2)
            if c1.button("Delete forever", type="primary", width="stretch"):
                with glue.friendly_errors():
                    svc.delete_gpt(me, gpt.id)
                    st.session_state.pop(f"preview-{gpt.id}", None)
                    close_delete()
                    st.switch_page("pages/my_gpts.py")
            if c2.button("Keep it", width="stretch"):
                close_delete()
                st.rerun()

        if delete:
            st.session_state[f"delete-{gpt.id}"] = True
        if st.session_state.get(f"delete-{gpt.id}"):
            confirm_delete()

    with preview_col:
        top = st.columns([3, 2])
        top[0].subheader("Preview")
        if top[1].button("Restart", icon="🔄", width="stretch", help="Start a fresh preview conversation"):
            st.session_state.pop(f"preview-{gpt.id}", None)
        st.caption("Chats with the draft as it is in the form now, saved or not.")
        conv_key = f"preview-{gpt.id}"
        box = st.container(height=480, border=True)
        with box:
            conv_id = st.session_state.get(conv_key)
            if conv_id:
                with glue.friendly_errors():
                    glue.show_messages(svc.messages(me, conv_id), avatar, feedback=svc.answer_feedback(me, conv_id),
                                       on_rate=lambda mid, r, c: svc.rate_answer(me, conv_id, mid, r, c),
                                       key=f"pfb-{conv_id}")
            elif draft_spec and draft_spec.starters:
                st.caption("Try a starter:")
                for i, s in enumerate(draft_spec.starters):
                    if st.button(glue.plain(s), key=f"pstarter-{k}-{i}"):
                        st.session_state[f"pending-{gpt.id}"] = s
        prompt = st.chat_input("Message the preview", key=f"pinput-{gpt.id}", disabled=draft_spec is None,
                               submit_mode="stop")
        prompt = prompt or st.session_state.pop(f"pending-{gpt.id}", None)
        if prompt and draft_spec is not None:
            with box:
                if not st.session_state.get(conv_key):
                    st.session_state[conv_key] = svc.start_conversation(me, gpt.id, source="preview")
                cid = st.session_state[conv_key]
                glue.stream_turn(lambda m: svc.send(me, cid, m, spec=draft_spec), prompt, avatar)

with knowledge_tab:
    from personal_gpt.knowledge.sniff import EXTENSIONS

    st.caption("Add your handbook, price list, slides or FAQ: your GPT answers from them and shows the file and "
               "page each answer came from.")
    st.toggle("Answer only from my knowledge (say \"I don't know\" when the files don't cover a question)",
              value=spec.knowledge_only, key=f"konly-{k}",
              help="Takes effect when you save or publish.")
    if st.session_state.get(f"konly-{k}", spec.knowledge_only):
        from personal_gpt.gpts import STRICTNESS_LEVELS, refusal_message
        from personal_gpt.services import I_DONT_KNOW

        st.radio("How sure must an answer be of its files?", STRICTNESS_LEVELS, horizontal=True,
                 index=STRICTNESS_LEVELS.index(spec.strictness), key=f"strict-{k}",
                 format_func=lambda x: {"lenient": "Lenient (answers more)", "balanced": "Balanced",
                                        "strict": "Strict (says \"I don't know\" more)"}.get(x, x),
                 help="Stricter GPTs refuse more often rather than risk an answer the files do not support.")
        st.text_input("What it says when the files don't cover a question", value=spec.refusal,
                      max_chars=300, key=f"refusal-{k}", placeholder=refusal_message(spec.model_copy(
                          update={"refusal": ""}), I_DONT_KNOW),
                      help="Leave empty for the default. {business_name} and your template's other blanks are "
                           "filled in.")
    st.toggle("Show clients where answers come from (file, page and sentence)", value=spec.show_sources,
              key=f"showsrc-{k}",
              help="On share links, the website widget and the API. Off: sources stay with you; clients see "
                   "only the answer. File names are never downloadable.")
    upload_key = f"kupload-{gpt.id}-{st.session_state.get(f'kupload-n-{gpt.id}', 0)}"
    uploads = st.file_uploader("Add files", accept_multiple_files=True, key=upload_key,
                               type=sorted(EXTENSIONS),
                               help=f"Up to {svc.settings.max_upload_mb} MB per file.")
    if uploads and st.button("Add to knowledge", type="primary", icon="📥"):
        with glue.friendly_errors():
            result = svc.add_knowledge(me, gpt.id, [(u.name, u.getvalue()) for u in uploads])
            st.session_state[f"kupload-n-{gpt.id}"] = st.session_state.get(f"kupload-n-{gpt.id}", 0) + 1
            st.session_state[f"kresult-{gpt.id}"] = [(a.name, a.status, a.message) for a in result.files]
            st.rerun()
    for name, status, message in st.session_state.pop(f"kresult-{gpt.id}", []):
        if status == "rejected":
            st.error(f"{glue.plain(name)}: {glue.plain(message)}", icon="⚠️")
        elif status == "duplicate":
            st.info(f"{glue.plain(name)}: {glue.plain(message)}", icon="ℹ️")

    def is_busy(files) -> bool:
        return any(f.status in ("queued", "parsing", "embedding") for f in files)

    polling = is_busy(svc.list_knowledge(me, gpt.id))

    @st.fragment(run_every=1.0 if polling else None)  # refresh progress only while files are being read
    def knowledge_status() -> None:
        files = svc.list_knowledge(me, gpt.id)
        busy = is_busy(files)
        if polling and not busy:
            st.rerun(scope="app")  # done: show the final state and stop polling
        if busy:
            jobs = svc.knowledge_jobs(me, gpt.id, limit=1)
            job = jobs[0] if jobs else None
            st.progress(job.progress if job else 0.0, text=job.message if job else "Waiting…")
        if not files:
            st.info("No knowledge files yet.", icon="📚")
            return
        labels = {"queued": "⏳ waiting", "parsing": "📖 reading", "embedding": "🧮 indexing", "ready": "✅ ready",
                  "failed": "⚠️ failed"}
        for f in files:
            c = st.columns([5, 2, 3, 1.2])
            c[0].markdown(f"**{glue.plain(f.display_name)}**")
            c[1].write(labels.get(f.status, f.status))
            if f.status == "failed":
                c[2].caption(glue.plain(f.error))
            elif f.status == "ready":
                c[2].caption(f"{f.chunk_count} passages" + (f" · {f.pages} pages" if f.pages else ""))
            if c[3].button("Remove", key=f"krm-{f.id}"):
                st.session_state[f"kconfirm-{gpt.id}"] = f.id
                st.rerun(scope="app")

    knowledge_status()
    confirm_id = st.session_state.get(f"kconfirm-{gpt.id}")
    if confirm_id:
        st.warning("Remove this file and everything your GPT learned from it?")
        y, n = st.columns(2)
        if y.button("Remove file", type="primary", key="kconfirm-yes"):
            with glue.friendly_errors():
                svc.remove_knowledge(me, gpt.id, confirm_id)
            st.session_state.pop(f"kconfirm-{gpt.id}", None)
            st.rerun()
        if n.button("Keep it", key="kconfirm-no"):
            st.session_state.pop(f"kconfirm-{gpt.id}", None)
            st.rerun()
    query = st.text_input("Try a search", placeholder="e.g. How much is delivery?", key=f"ksearch-{gpt.id}")
    if query:
        with glue.friendly_errors():
            hits = svc.search_knowledge(me, gpt.id, query, k=5)
            if not hits:
                st.caption("Nothing found.")
            for h in hits:
                where = h.file + (f", page {h.page}" if h.page else "")
                st.caption(f"[{h.n}] {glue.plain(where)} · score {h.score:.3f}")
                st.text(h.text)

with test_tab:
    from personal_gpt.web.test_tab import render_test_tab

    render_test_tab(svc, me, gpt.id)

with finetune_tab:
    from personal_gpt.web import finetune_tab as finetune_ui

    finetune_ui.render(svc, me, gpt)

with share_tab:
    from personal_gpt.web import share_tab as share_ui

    share_ui.render(svc, me, gpt)

with privacy_tab:
    from personal_gpt.web import privacy_tab as privacy_ui

    privacy_ui.render_privacy(svc, me, gpt.id)

with export_tab:
    from personal_gpt.web import bundle_ui

    bundle_ui.render_export(svc, me, gpt.id)

with versions_tab:
    versions = svc.versions(me, gpt.id)
    st.caption("Every save is a version. Clients chat with the published one; restoring copies an old version "
               "into a new draft, so nothing is ever lost.")
    for v in versions:
        with st.container(border=True):
            c = st.columns([4, 1.3, 1.3])
            badge = " · :green[published]" if v.number == gpt.published_version else ""
            c[0].markdown(f"**v{v.number}** — {v.note}{badge}  \n{glue.when(v.created_at)}")
            if c[1].button("Restore", key=f"restore-{v.number}", disabled=v.number == gpt.latest_version, width="stretch"):
                with glue.friendly_errors():
                    svc.restore_version(me, gpt.id, v.number)
                    st.toast(f"Restored v{v.number} as a new draft.", icon="↩️")
                    st.rerun()
            if c[2].button("Publish", key=f"pub-{v.number}", disabled=v.number == gpt.published_version, width="stretch"):
                with glue.friendly_errors():
                    svc.publish(me, gpt.id, v.number)
                    st.rerun()
            with c[0].expander("Instructions"):
                st.text(v.spec.get("instructions", ""))
