"""Settings: model providers (any OpenAI-compatible endpoint) and where data lives."""

import streamlit as st

from personal_gpt.web import glue

svc = glue.services()
me = glue.principal()

st.title("Settings")
st.subheader("Model providers")
st.caption(
    "The bundled SmolLM2-135M-Instruct runs on this computer with no set-up. Add any OpenAI-compatible server — "
    "Ollama (http://localhost:11434/v1), vLLM, a llama.cpp server, OpenAI — and pick it per GPT in the builder. "
    "API keys are stored encrypted."
)

with glue.friendly_errors():
    providers = svc.list_providers(me)
    if not providers:
        st.info("No providers yet: your GPTs use the bundled model.", icon="🧩")
    for prov in providers:
        with st.container(border=True):
            c = st.columns([5, 1.6, 1.2])
            key_note = "API key saved" if prov.has_api_key else "no API key"
            c[0].markdown(f"**{prov.name}** — `{prov.model}`  \n{prov.base_url} · {key_note} · "
                          f"{prov.context_window:,}-token context")
            if c[1].button("Test connection", key=f"test-{prov.id}", width="stretch"):
                try:
                    with st.spinner("Calling the server…"):
                        ids = svc.test_provider(me, prov.id)
                    shown = ", ".join(ids[:8]) + (" …" if len(ids) > 8 else "")
                    st.success(f"Connected. The server offers: {shown or '(no models listed)'}", icon="✅")
                except glue.PersonalGptError as exc:
                    st.error(str(exc), icon="⚠️")
            if c[2].button("Remove", key=f"del-{prov.id}", width="stretch"):
                st.session_state["confirm-del"] = prov.id
            if st.session_state.get("confirm-del") == prov.id:
                st.warning(f"Remove **{prov.name}**? GPTs that use it fall back to an error until you pick another model.")
                d1, d2 = st.columns(2)
                if d1.button("Remove provider", key=f"yes-{prov.id}", type="primary"):
                    svc.delete_provider(me, prov.id)
                    st.session_state.pop("confirm-del", None)
                    st.rerun()
                if d2.button("Cancel", key=f"no-{prov.id}"):
                    st.session_state.pop("confirm-del", None)
                    st.rerun()

with st.expander("Add a provider", expanded=not providers), st.form("add-provider", clear_on_submit=True):
    name = st.text_input("Name", placeholder="My Ollama")
    base_url = st.text_input("Base URL", placeholder="http://localhost:11434/v1")
    model = st.text_input("Model", placeholder="llama3.2")
    api_key = st.text_input("API key (if the server needs one)", type="password")
    context_window = st.number_input("Context window (tokens)", min_value=256, max_value=2_000_000, value=8192, step=1024)
    if st.form_submit_button("Add provider", type="primary"):
        with glue.friendly_errors():
            prov = svc.add_provider(me, name=name, base_url=base_url, model=model, api_key=api_key,
                                    context_window=int(context_window))
            st.toast(f"Added {prov.name}. Use “Test connection” to check it.", icon="✅")
            st.rerun()

st.subheader("Where your data lives")
st.markdown(f"- Home folder: `{svc.settings.home}`\n- Database: `{svc.store.url.split('@')[-1]}`")
