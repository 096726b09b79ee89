"""My GPTs: the creator's GPTs as cards, and the template gallery to start a new one."""

import streamlit as st

from personal_gpt.web import glue

svc = glue.services()
me = glue.principal()

st.title("My GPTs")


def close_dialog() -> None:
    st.session_state.pop("new-gpt-dialog", None)


@st.dialog("Start from a template", width="large", on_dismiss=close_dialog)
def start_from_template(template_id: str) -> None:
    tpl = next(t for t in svc.templates() if t.id == template_id)
    st.markdown(f"### {tpl.icon} {tpl.name}")
    st.caption(tpl.description)
    with st.form(f"new-{tpl.id}", border=False):
        name = st.text_input("Name your GPT", value=tpl.name, max_chars=80)
        values = {}
        for blank in tpl.blanks:
            label = blank.label + ("" if blank.required else " (optional)")
            values[blank.key] = st.text_input(
                label, value=blank.default, placeholder=blank.example, help=blank.help or None, key=f"blank-{tpl.id}-{blank.key}"
            )
        if tpl.suggested_knowledge:
            st.caption("Knowledge that helps: " + "; ".join(tpl.suggested_knowledge))
        submitted = st.form_submit_button("Create GPT", type="primary")
    if submitted:
        with glue.friendly_errors():
            gpt = svc.create_gpt(me, template_id=tpl.id, name=name, blanks=values)
            close_dialog()
            st.switch_page("pages/builder.py", query_params={"gpt": gpt.id})


@st.dialog("Start from scratch", on_dismiss=close_dialog)
def start_blank() -> None:
    with st.form("new-blank", border=False):
        name = st.text_input("Name your GPT", max_chars=80, placeholder="e.g. Ask Maria")
        submitted = st.form_submit_button("Create GPT", type="primary")
    if submitted:
        with glue.friendly_errors():
            gpt = svc.create_gpt(me, name=name)
            close_dialog()
            st.switch_page("pages/builder.py", query_params={"gpt": gpt.id})


with glue.friendly_errors():
    gpts = svc.list_gpts(me)

    if not gpts:
        st.info(
            "You have no GPTs yet. Pick a template below: fill in a few blanks (your business name, your tone) "
            "and you can chat with your GPT a minute later.",
            icon="👋",
        )
    else:
        cols = st.columns(3)
        for i, g in enumerate(gpts):
            with cols[i % 3].container(border=True):
                head = st.columns([1, 5])
                if g.avatar.startswith("data:"):
                    head[0].image(g.avatar, width=40)
                else:
                    head[0].markdown(f"## {g.avatar}")
                head[1].markdown(f"**{glue.plain(g.name)}**")
                if g.is_published:
                    state = f"Published v{g.published_version}"
                    if g.has_unpublished_changes:
                        state += f" · draft v{g.latest_version} not published"
                    head[1].caption(f":green[●] {state}")
                else:
                    head[1].caption(f":orange[●] Draft v{g.latest_version} — not published")
                st.caption(glue.for_streamlit(g.description) or "No description yet.")
                b1, b2 = st.columns(2)
                if b1.button("Edit", key=f"edit-{g.id}", icon="🛠️", width="stretch"):
                    st.switch_page("pages/builder.py", query_params={"gpt": g.id})
                if b2.button("Chat", key=f"chat-{g.id}", icon="💬", width="stretch", disabled=not g.is_published,
                             help=None if g.is_published else "Publish it in the builder first."):
                    st.switch_page("pages/chat.py", query_params={"gpt": g.id})
                l1, l2 = st.columns(2)
                l1.page_link("pages/conversations.py", label="Conversations", icon="🗂️", query_params={"gpt": g.id})
                l2.page_link("pages/analytics.py", label="Analytics", icon="📊", query_params={"gpt": g.id})

    st.subheader("Start a new GPT")
    with st.expander("Import a GPT from a bundle file (.zip)", icon="📦"):
        from personal_gpt.web import bundle_ui

        bundle_ui.render_import(svc, me)
    templates = svc.templates()
    cols = st.columns(4)
    for i, tpl in enumerate(templates):
        with cols[i % 4].container(border=True):
            st.markdown(f"#### {tpl.icon} {tpl.name}")
            st.caption(tpl.description)
            if st.button("Use template", key=f"tpl-{tpl.id}", width="stretch"):
                st.session_state["new-gpt-dialog"] = tpl.id
    with cols[len(templates) % 4].container(border=True):
        st.markdown("#### ✨ From scratch")
        st.caption("An empty GPT: write its instructions yourself.")
        if st.button("Start blank", key="tpl-blank", width="stretch"):
            st.session_state["new-gpt-dialog"] = ""
    # the open dialog is remembered across reruns until it is dismissed or done
    if "new-gpt-dialog" in st.session_state:
        if st.session_state["new-gpt-dialog"]:
            start_from_template(st.session_state["new-gpt-dialog"])
        else:
            start_blank()
    for problem in svc.template_problems():
        st.warning(f"Template file {problem.file.name} was skipped: {problem.message}")
