"""The builder's Fine-tune tab: training data (upload or pairs from knowledge) with
its validation report and an editable preview, settings, the running job (progress,
ETA, live loss chart, cancel) and the adapter versions (compare, switch, export).

UI only: every decision is made by ``services``; nothing here trains or parses.
"""

from __future__ import annotations

import io
import zipfile

import streamlit as st

from personal_gpt.web import glue

DATA_TYPES = ["jsonl", "json", "csv", "tsv", "xlsx", "txt"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUTO = "(automatic)"
CORRECTIONS = "Corrected answers from conversations"
EARLIER = "Data from an earlier fine-tune or import"


def render(svc, me, gpt) -> None:
    st.caption("Teach your GPT your voice or your house format from examples of questions and the answers you "
               "would give. Training runs in the background; afterwards you compare before and after and switch "
               "the tuned version on.")
    jobs = svc.finetune_jobs(me, gpt.id, limit=5)
    running = next((j for j in jobs if j.active), None)
    if running is not None:
        _job_progress(svc, me, gpt.id, running.id)
    elif jobs:
        _last_job(svc, me, gpt.id, jobs[0])
    _adapters(svc, me, gpt)
    if running is None:
        _new_finetune(svc, me, gpt)


# -- the running job ------------------------------------------------------------------

def _eta(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f" · about {seconds // 60} min {seconds % 60:02d} s left" if seconds >= 60 else f" · about {seconds} s left"


def _loss_chart(history: list[dict]) -> None:
    import pandas as pd

    rows = [{"step": h.get("step"), "training loss": h.get("train_loss", h.get("loss")),
             "evaluation loss": h.get("eval_loss")} for h in history if h.get("step") is not None]
    if not rows:
        return
    frame = pd.DataFrame(rows).set_index("step")
    frame = frame.dropna(axis=1, how="all")
    if not frame.empty:
        st.line_chart(frame, x_label="step", y_label="loss", height=220)


def _job_progress(svc, me, gpt_id: str, job_id: str) -> None:
    @st.fragment(run_every=2.0)
    def live() -> None:
        job = svc.finetune_job(me, gpt_id, job_id)
        if not job.active:
            st.rerun(scope="app")  # finished: show the result and the new version
        label = {"queued": "Waiting for the training worker…", "cancelling": "Stopping…"}.get(job.status, job.message)
        with st.container(border=True):
            st.markdown("**Fine-tuning in progress**")
            st.progress(min(max(job.progress, 0.0), 1.0), text=(label or "Training…") + _eta(job.eta_s))
            if job.resumed_from:
                st.caption(f"Resumed from step {job.resumed_from} after an interruption.")
            _loss_chart(job.history)
            if job.status != "cancelling" and st.button("Cancel fine-tuning", icon="⏹️", key=f"ftcancel-{job.id}"):
                st.session_state[f"ftcancel-ask-{gpt_id}"] = job.id
                st.rerun(scope="app")

    live()
    if st.session_state.get(f"ftcancel-ask-{gpt_id}") == job_id:
        st.warning("Stop this fine-tune? The work done so far is thrown away; your GPT keeps its current version.")
        yes, no = st.columns(2)
        if yes.button("Stop it", type="primary", key="ftcancel-yes"):
            st.session_state.pop(f"ftcancel-ask-{gpt_id}", None)
            if glue.succeeded(lambda: svc.cancel_finetune(me, gpt_id, job_id)):
                st.rerun()
        if no.button("Keep training", key="ftcancel-no"):
            st.session_state.pop(f"ftcancel-ask-{gpt_id}", None)
            st.rerun()


def _last_job(svc, me, gpt_id: str, job) -> None:
    if job.status == "failed":
        st.error(f"The last fine-tune failed: {job.message}", icon="⚠️")
    elif job.status == "cancelled":
        st.info("The last fine-tune was cancelled.", icon="⏹️")
    elif job.status == "done" and job.adapter_number:
        m = job.metrics or {}
        before, after = m.get("eval_loss_before"), m.get("eval_loss_after")
        score = f": evaluation loss {before:.3f} → {after:.3f}" if before is not None and after is not None else ""
        st.success(f"Version {job.adapter_number} is ready{score}. Compare it below and switch it on.", icon="✅")


# -- adapter versions -----------------------------------------------------------------

def _zip_dir(path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(path).as_posix())
    return buf.getvalue()


def _adapters(svc, me, gpt) -> None:
    versions = svc.list_adapters(me, gpt.id)
    if not versions:
        return
    st.subheader("Tuned versions")
    active = next((v for v in versions if v.is_active), None)
    st.caption(f"Your GPT now answers with **tuned version {active.number}**." if active
               else "Your GPT now answers with the **base model** (no tuned version switched on).")
    if active and st.button("Switch back to the base model", key="ft-off"):
        with glue.friendly_errors():
            svc.activate_adapter(me, gpt.id, None)
            st.rerun()
    for v in reversed(versions):
        m = v.metrics or {}
        with st.container(border=True):
            c = st.columns([4, 1.3, 1.3, 1.3])
            badge = " · :green[in use]" if v.is_active else ""
            data = v.data_summary or {}
            c[0].markdown(f"**Version {v.number}**{badge}  \n{glue.when(v.created_at)} · "
                          f"{data.get('train', '?')} training examples · {v.settings.get('epochs', '?')} epochs · "
                          f"rank {v.settings.get('rank', '?')}")
            before, after = m.get("eval_loss_before"), m.get("eval_loss_after")
            if before is not None and after is not None:
                ppl = ""
                if m.get("perplexity_before") and m.get("perplexity_after"):
                    ppl = f" · perplexity {m['perplexity_before']:.1f} → {m['perplexity_after']:.1f}"
                c[0].caption(f"Evaluation loss {before:.3f} → {after:.3f}{ppl}")
            if not v.is_active and c[1].button("Switch on", key=f"ft-on-{v.number}", type="primary", width="stretch"):
                with glue.friendly_errors():
                    svc.activate_adapter(me, gpt.id, v.number)
                    st.toast(f"Your GPT now uses tuned version {v.number}.", icon="✅")
                    st.rerun()
            if c[3].button("Delete", key=f"ft-del-{v.number}", width="stretch"):
                st.session_state[f"ft-del-ask-{gpt.id}"] = v.number
                st.rerun()
            if v.samples:
                with st.expander("Compare answers: base model vs tuned"):
                    for s in v.samples:
                        prompt = s.get("prompt")
                        if isinstance(prompt, list):
                            prompt = next((x["content"] for x in reversed(prompt) if x.get("role") == "user"), "")
                        st.markdown(f"**Q:** {glue.for_streamlit(prompt or '')}")
                        a, b = st.columns(2)
                        a.caption("Base model")
                        a.markdown(glue.for_streamlit(s.get("base", "")))
                        b.caption(f"Tuned version {v.number}")
                        b.markdown(glue.for_streamlit(s.get("tuned", "")))
                        st.divider()
            if c[2].button("Export", key=f"ft-exp-{v.number}", width="stretch"):
                st.session_state[f"ft-exp-{gpt.id}"] = v.number
            if st.session_state.get(f"ft-exp-{gpt.id}") == v.number and v.path.is_dir():
                st.download_button("Download adapter (peft format, .zip)", _zip_dir(v.path),
                                   file_name=f"{gpt.id}-adapter-v{v.number}.zip", mime="application/zip",
                                   key=f"ft-dl-{v.number}")
    ask = st.session_state.get(f"ft-del-ask-{gpt.id}")
    if ask:
        st.warning(f"Delete tuned version {ask}? Its trained weights are removed for good.")
        yes, no = st.columns(2)
        if yes.button("Delete version", type="primary", key="ft-del-yes"):
            st.session_state.pop(f"ft-del-ask-{gpt.id}", None)
            if glue.succeeded(lambda: svc.delete_adapter(me, gpt.id, ask)):
                st.rerun()
        if no.button("Keep it", key="ft-del-no"):
            st.session_state.pop(f"ft-del-ask-{gpt.id}", None)
            st.rerun()


# -- a new fine-tune ------------------------------------------------------------------

def _settings_form(key: str) -> dict:
    settings: dict = {}
    with st.expander("Advanced settings"):
        a, b, c = st.columns(3)
        settings["epochs"] = a.number_input("Epochs (passes over the data)", 1, 20, 3, key=f"{key}-ep")
        settings["learning_rate"] = b.number_input("Learning rate", 1e-6, 1e-2, 2e-4, format="%.6f", key=f"{key}-lr")
        settings["max_length"] = c.number_input("Maximum length (tokens)", 32, 4096, 512, step=32, key=f"{key}-ml")
        a, b, c = st.columns(3)
        settings["rank"] = a.number_input("LoRA rank", 1, 256, 16, key=f"{key}-r")
        settings["alpha"] = b.number_input("LoRA alpha", 1, 1024, 32, key=f"{key}-al")
        settings["dropout"] = c.number_input("LoRA dropout", 0.0, 0.5, 0.05, step=0.01, key=f"{key}-dr")
        a, b = st.columns([2, 1])
        targets = a.multiselect("Layers to adapt", ["all linear layers"] + TARGETS, default=["all linear layers"],
                                key=f"{key}-tm")
        settings["eval_share"] = b.number_input("Share kept for evaluation", 0.0, 0.5, 0.1, step=0.05,
                                                key=f"{key}-es")
        picked = [t for t in targets if t != "all linear layers"]
        settings["target_modules"] = "all-linear" if not picked or "all linear layers" in targets else picked
    return settings


def _report(report) -> None:
    c = st.columns(5)
    c[0].metric("Examples", report.usable)
    c[1].metric("Training", report.train)
    c[2].metric("Evaluation", report.eval)
    c[3].metric("Too long (cut)", report.truncated)
    c[4].metric("Duplicates dropped", report.duplicates)
    if report.tokens_max:
        st.caption(f"Length in tokens: shortest {report.tokens_min}, median {report.tokens_median}, "
                   f"longest {report.tokens_max} (maximum {report.max_length}).")
    for w in report.warnings:
        st.warning(w, icon="⚠️")
    for e in report.errors:
        st.error(e, icon="⛔")


def _from_corrections(fixes) -> list:
    """The corrected answers sent to fine-tuning, as single-turn examples (newest first)."""
    from personal_gpt.finetune.data import Example

    return [Example.single(f.question, f.answer) for f in fixes]


def _new_finetune(svc, me, gpt) -> None:
    from personal_gpt.finetune.data import from_table, to_table

    st.subheader("New fine-tune")
    fixes = svc.list_corrections(me, gpt.id, target="finetune")
    saved_sets = svc.training_sets(me, gpt.id)
    source = st.radio("Training data", ["Upload examples", "Make pairs from my knowledge files", CORRECTIONS, EARLIER],
                      horizontal=True, key=f"ft-src-{gpt.id}",
                      format_func=lambda s: f"{s} ({len(fixes)})" if s == CORRECTIONS
                      else f"{s} ({len(saved_sets)})" if s == EARLIER else s)
    examples_key = f"ft-examples-{gpt.id}"
    problems: list[str] = []
    if source == "Upload examples":
        upload = st.file_uploader(
            "Examples file: OpenAI chat JSONL, Alpaca or ShareGPT JSON/JSONL, or a CSV/Excel sheet with a question "
            "and an answer column", type=DATA_TYPES, key=f"ft-up-{gpt.id}")
        if upload is None:
            st.session_state.pop(examples_key, None)
            st.info("Upload a file of examples to see what will be trained on.", icon="📄")
            return
        cols = st.session_state.get(f"ft-cols-{gpt.id}") or []
        prompt_col = response_col = None
        if cols:
            a, b = st.columns(2)
            prompt_col = a.selectbox("Question column", [AUTO] + cols, key=f"ft-pc-{gpt.id}")
            response_col = b.selectbox("Answer column", [AUTO] + cols, key=f"ft-rc-{gpt.id}")
        try:
            loaded, _ = svc.preview_training_data(
                me, gpt.id, upload.getvalue(), upload.name,
                prompt_column=None if prompt_col in (None, AUTO) else prompt_col,
                response_column=None if response_col in (None, AUTO) else response_col)
        except glue.PersonalGptError as exc:
            st.error(str(exc), icon="⚠️")
            return
        if loaded.columns and loaded.columns != cols:
            st.session_state[f"ft-cols-{gpt.id}"] = loaded.columns
            st.rerun()
        examples = loaded.examples
        problems = loaded.problems
    elif source == CORRECTIONS:
        if not fixes:
            st.info("No corrected answers yet: on the Conversations page, use “Fix this answer” and choose "
                    "“Add to fine-tuning data”.", icon="🛠️")
            return
        examples = _from_corrections(fixes)
    elif source == EARLIER:
        if not saved_sets:
            st.info("No saved training data yet: every fine-tune keeps the data it used, and an imported GPT "
                    "brings its own.", icon="🗂️")
            return
        labels = {t.name: t.label for t in saved_sets}
        name = st.selectbox("Which data", list(labels), format_func=labels.get, key=f"ft-set-{gpt.id}")
        try:
            examples = svc.load_training_set(me, gpt.id, name)
        except glue.PersonalGptError as exc:
            st.error(str(exc), icon="⚠️")
            return
    else:
        n = st.number_input("How many pairs", 5, 500, 50, step=5, key=f"ft-npairs-{gpt.id}")
        if st.button("Make training pairs", icon="🪄", key=f"ft-mkpairs-{gpt.id}"):
            with glue.friendly_errors():
                st.session_state[examples_key] = svc.training_pairs_from_knowledge(me, gpt.id, limit=int(n))
        examples = st.session_state.get(examples_key)
        if not examples:
            st.info("Pairs are drafted from your knowledge files; review and fix them below before training.",
                    icon="🪄")
            return

    if source != CORRECTIONS and fixes and st.checkbox(
            f"Also add the {len(fixes)} corrected answer(s) from conversations", key=f"ft-addfix-{gpt.id}"):
        examples = list(examples) + _from_corrections(fixes)
    if problems:
        with st.expander(f"{len(problems)} row(s) need attention"):
            for p in problems[:200]:
                st.caption(p)
    st.markdown("**What will be trained on** — fix a cell or delete a row before training.")
    edited = st.data_editor(
        to_table(examples), num_rows="dynamic", width="stretch", height=280, key=f"ft-table-{gpt.id}",
        column_config={"line": st.column_config.NumberColumn("line", disabled=True, width="small"),
                       "context": None},
    )
    settings = _settings_form(f"ft-set-{gpt.id}")
    try:
        final = from_table(edited)
        report = svc.check_training_examples(me, gpt.id, final, settings)
    except glue.PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return
    _report(report)
    if st.button("Start fine-tuning", type="primary", icon="🚀", disabled=not report.ok, key=f"ft-go-{gpt.id}"):
        with glue.friendly_errors():
            svc.start_finetune(me, gpt.id, final, settings)
            st.session_state.pop(examples_key, None)
            st.toast("Fine-tuning started: it runs in the background, you can leave this page.", icon="🚀")
            st.rerun()
