"""The builder's Test tab: ask the draft the template's test questions and the
creator's own (with an expected answer, or marked "the files don't cover this"),
and show answer containment, abstention, false abstention and citation accuracy.

UI only: questions, the run and the scoring are ``qa_eval``'s; answers go
through the real chat path. The creator's own questions live in the session.
"""

from __future__ import annotations

import streamlit as st

from personal_gpt import qa_eval
from personal_gpt.errors import PersonalGptError

COLUMNS = {"question": "Question", "answer": "Expected answer (optional)",
           "unanswerable": "Files don't cover it"}


def template_questions(svc, spec) -> list[str]:
    """The test questions of the template this GPT was made from ([] when none)."""
    if not spec.template_id:
        return []
    for t in svc.templates():
        if t.id == spec.template_id:
            return list(t.test_questions)
    return []


def questions_from_rows(rows: list[dict]) -> list[qa_eval.EvalQuestion]:
    """The editor's rows as questions (rows without a question are skipped)."""
    out = []
    for row in rows:
        q = " ".join(str(row.get("question") or "").split())
        if not q:
            continue
        unanswerable = bool(row.get("unanswerable"))
        answer = " ".join(str(row.get("answer") or "").split())
        out.append(qa_eval.EvalQuestion(q, [] if unanswerable or not answer else [answer], unanswerable))
    return out


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def render_test_tab(svc, p, gpt_id: str) -> None:
    gpt = svc.get_gpt(p, gpt_id)
    spec = gpt.spec
    st.caption("Ask your GPT test questions and see how often it is right, and whether it says it doesn't know "
               "when your files don't cover a question. Tests use your latest saved draft.")
    if not spec.knowledge_only:
        st.info("“Answer only from my knowledge files” is off: the GPT may answer from general knowledge, so "
                "“I don't know” is only checked when that setting is on.", icon="ℹ️")

    key = f"test-rows-{gpt_id}"
    if key not in st.session_state:
        st.session_state[key] = [{"question": q, "answer": "", "unanswerable": False}
                                 for q in template_questions(svc, spec)] or [
            {"question": "", "answer": "", "unanswerable": False}]
    rows = st.data_editor(
        st.session_state[key], num_rows="dynamic", width="stretch", key=f"test-editor-{gpt_id}",
        column_config={
            "question": st.column_config.TextColumn(COLUMNS["question"], max_chars=500, width="large"),
            "answer": st.column_config.TextColumn(COLUMNS["answer"], max_chars=300,
                                                  help="Words the right answer must contain."),
            "unanswerable": st.column_config.CheckboxColumn(COLUMNS["unanswerable"],
                                                            help="Tick when the GPT should say it doesn't know."),
        },
    )
    questions = questions_from_rows(list(rows))
    if st.button(f"Run {len(questions)} test question{'s' if len(questions) != 1 else ''}", type="primary",
                 disabled=not questions, key=f"test-run-{gpt_id}"):
        bar = st.progress(0.0, text="Asking…")
        try:
            report = qa_eval.run_eval(svc, p, gpt_id, questions, spec=spec,
                                      progress=lambda d, t: bar.progress(d / t, text=f"Asked {d} of {t}"))
        except PersonalGptError as exc:
            bar.empty()
            st.error(str(exc), icon="⚠️")
            return
        bar.empty()
        st.session_state[f"test-report-{gpt_id}"] = report
    report = st.session_state.get(f"test-report-{gpt_id}")
    if report is not None:
        show_report(report)


def show_report(report: qa_eval.Report) -> None:
    cols = st.columns(4)
    cols[0].metric("Right answers", _pct(report.containment), help="Answers that contain the expected answer.")
    cols[1].metric("Said “I don't know” when it should", _pct(report.abstention))
    cols[2].metric("Said “I don't know” wrongly", _pct(report.false_abstention))
    cols[3].metric("Cited the right place", _pct(report.citation_accuracy))
    if report.seconds_per_answer is not None:
        st.caption(f"{report.answerable} answerable and {report.unanswerable} unanswerable questions, "
                   f"{report.seconds_per_answer:.1f} s per answer.")
    for item in report.items:
        with st.expander(f"{item.verdict} — {item.question}"):
            st.text(item.answer)
            for c in item.citations[:1]:
                where = c.get("file", "") + (f", page {c['page']}" if c.get("page") else "")
                st.caption(f"Source: {where}")
                st.text(c.get("text", ""))
