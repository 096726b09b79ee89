"""Streamlit pieces for GPT bundles: the builder's "Export" section (download the GPT as one
.zip, save it as a template) and My GPTs' "Import a GPT" uploader (what came in, what was
skipped, the new share links, a button to open the new GPT).

UI only: exporting, importing and templates are ``services`` methods; text that came from a
bundle is shown through ``markdown_safe.plain`` or ``st.text``/``st.code``, never as HTML.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import streamlit as st

from personal_gpt.markdown_safe import plain
from personal_gpt.web import glue


def _file_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "gpt"
    return f"{stem}.zip"


def render_export(svc, p, gpt_id: str) -> None:
    """The builder's export section for one GPT (``p`` is the acting creator)."""
    st.subheader("Export", anchor=False)
    st.caption("Download this GPT as one file to back it up or move it to another Personal GPTs: its instructions "
               "and every version, knowledge files, fine-tuning data and adapters, share and widget settings. "
               "Conversations, share-link addresses and API keys are not included.")
    try:
        gpt = svc.get_gpt(p, gpt_id)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    ready = st.session_state.get(f"bundle-export-{gpt_id}")
    if st.button("Prepare the export file", key=f"bundle-prepare-{gpt_id}", icon="📦"):
        def prepare() -> None:
            with tempfile.TemporaryDirectory(prefix="pgpt-export-") as tmp:
                path = svc.export_gpt(p, gpt_id, Path(tmp) / "bundle.zip")
                st.session_state[f"bundle-export-{gpt_id}"] = path.read_bytes()

        with st.spinner("Packing this GPT into one file…"):
            prepared = glue.succeeded(prepare)
        if prepared:
            ready = st.session_state.get(f"bundle-export-{gpt_id}")
    if ready:
        st.download_button(f"Download {_file_name(gpt.name)} ({len(ready) / 2**20:.1f} MB)", data=ready,
                           file_name=_file_name(gpt.name), mime="application/zip", icon="⬇️", type="primary",
                           key=f"bundle-download-{gpt_id}", on_click="ignore")
    _template_form(svc, p, gpt_id, gpt)


def _template_form(svc, p, gpt_id: str, gpt) -> None:
    st.subheader("Save as template", anchor=False)
    st.caption("Turn this GPT into a template others on this app can start from (instructions, starters and "
               "model settings; blanks are kept when the GPT still matches the template it came from).")
    saved = st.session_state.pop(f"bundle-template-saved-{gpt_id}", None)
    if saved:
        st.success(f"Saved the template **{plain(saved)}**: it is now in the template gallery.", icon="✅")
    with st.form(f"bundle-template-{gpt_id}", border=False):
        key = st.text_input("Template key", max_chars=64, placeholder="e.g. my-shop-helper",
                            help="Lowercase letters, digits and hyphens; it is also the file name.")
        title = st.text_input("Template name", value=gpt.name, max_chars=80)
        description = st.text_input("One-sentence description", value=gpt.spec.description, max_chars=500)
        submitted = st.form_submit_button("Save as template", icon="🧩")
    if submitted:
        def save() -> None:
            svc.save_as_template(p, gpt_id, key=key, title=title, description=description)
            st.session_state[f"bundle-template-saved-{gpt_id}"] = key.strip()

        if glue.succeeded(save):
            st.rerun()


def render_import(svc, p) -> None:
    """My GPTs' import section: upload a bundle, import it as a NEW GPT, show the outcome."""
    st.subheader("Import a GPT", anchor=False)
    st.caption("Upload a bundle (.zip) exported from Personal GPTs. It always becomes a new GPT; nothing of yours "
               "is replaced. Its knowledge files are read and indexed again.")
    upload = st.file_uploader("Bundle file (.zip)", type=["zip"], key="bundle-import-upload")
    if upload is not None and st.button("Import", type="primary", icon="📥", key="bundle-import-go"):
        def run_import() -> None:
            with tempfile.TemporaryDirectory(prefix="pgpt-import-") as tmp:
                path = Path(tmp) / "upload.zip"
                path.write_bytes(upload.getvalue())
                result = svc.import_gpt(p, path)
            st.session_state["bundle-import-result"] = result

        with st.spinner("Checking and importing the bundle…"):
            glue.succeeded(run_import)
    result = st.session_state.get("bundle-import-result")
    if result is not None:
        _show_result(svc, result)


def _show_result(svc, result) -> None:
    parts = [f"{result.versions} version{'s' if result.versions != 1 else ''}"]
    if result.published_version:
        parts.append(f"version {result.published_version} published")
    queued = sum(k["status"] == "queued" for k in result.knowledge)
    if queued:
        parts.append(f"{queued} knowledge file{'s' if queued != 1 else ''} being indexed")
    if result.adapters:
        parts.append(f"{len(result.adapters)} adapter version{'s' if len(result.adapters) != 1 else ''}"
                     + (f" (version {result.active_adapter} active)" if result.active_adapter else ""))
    if result.finetune_datasets:
        parts.append(f"{result.finetune_datasets} fine-tuning data set{'s' if result.finetune_datasets != 1 else ''}")
    st.success(f"Imported **{plain(result.name)}**: " + ", ".join(parts) + ".", icon="✅")
    if result.share_links:
        from personal_gpt.web.share_tab import base_url

        st.warning("Share links were recreated with **new addresses**; copy them now (they are not shown again) "
                   "and send them to your clients.", icon="🔗")
        for link in result.share_links:
            st.text(link.label or "Share link")
            st.code(svc.share_url(link.token, base_url()), language=None)
    for line in result.skipped:
        st.warning(plain(line), icon="⏭️")
    for line in result.notes:
        st.info(plain(line), icon="ℹ️")
    if st.button("Open the new GPT", type="primary", icon="➡️", key="bundle-import-open"):
        st.session_state.pop("bundle-import-result", None)
        st.switch_page("pages/builder.py", query_params={"gpt": result.gpt_id})
