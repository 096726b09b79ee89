"""Test questions for a GPT: load them (JSON lines), ask each through the real
chat path, and score the answers: containment of an expected answer, abstention
on questions the files do not cover, false abstention, citation accuracy.

Owns the question format, the scoring rules and the report. It goes through
``Services`` like every caller (each question in its own "test" conversation)
and never imports streamlit or a model library.
"""

from __future__ import annotations

import json
import re
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from personal_gpt.errors import InvalidInput

MAX_QUESTIONS = 500
MAX_LINE_CHARS = 10_000
TEST_SOURCE = "test"


@dataclass
class EvalQuestion:
    question: str
    answers: list[str] = field(default_factory=list)
    unanswerable: bool = False
    file: str | None = None  # the knowledge file that should be cited (optional)


@dataclass
class ItemResult:
    question: str
    answer: str
    abstained: bool
    unanswerable: bool
    answers: list[str]
    contained: bool | None  # None: no expected answers given (or abstained on an unanswerable)
    cited_ok: bool | None  # None: nothing to check (no answers / no file, or no citation expected)
    citations: list[dict]
    seconds: float

    @property
    def verdict(self) -> str:
        if self.unanswerable:
            return "abstained (right)" if self.abstained else "answered (should abstain)"
        if self.abstained:
            return "abstained (wrong)"
        if self.contained is None:
            return "answered"
        return "right" if self.contained else "wrong"


@dataclass
class Report:
    items: list[ItemResult]
    answerable: int
    unanswerable: int
    containment: float | None  # answerable questions with expected answers whose answer contains one
    abstention: float | None  # unanswerable questions the GPT declined
    false_abstention: float | None  # answerable questions the GPT declined
    citation_accuracy: float | None  # answered questions whose first citation holds the expected answer / file
    seconds_per_answer: float | None

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("items")
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "items": [{**asdict(i), "verdict": i.verdict} for i in self.items]}


def parse_questions(lines: Iterable[str]) -> list[EvalQuestion]:
    """JSON lines of ``{"question": ..., "answers": [...], "unanswerable": true, "file": ...}``
    (only ``question`` required; ``answers`` may be one string). Blank lines and lines
    starting with # are skipped; a bad line is refused with its number."""
    out: list[EvalQuestion] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE_CHARS:
            raise InvalidInput(f"Line {number} is too long (over {MAX_LINE_CHARS:,} characters).")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidInput(f"Line {number} is not valid JSON: write one {{\"question\": ...}} object per line.")
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise InvalidInput(f"Line {number} needs a \"question\" with some text.")
        unknown = set(row) - {"question", "answers", "unanswerable", "file", "id"}
        if unknown:
            raise InvalidInput(f"Line {number} has keys this command does not know: {', '.join(sorted(unknown))}.")
        answers = row.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise InvalidInput(f"Line {number}: \"answers\" must be a list of strings.")
        unanswerable = row.get("unanswerable", False)
        if not isinstance(unanswerable, bool):
            raise InvalidInput(f"Line {number}: \"unanswerable\" must be true or false.")
        if unanswerable and answers:
            raise InvalidInput(f"Line {number} is marked unanswerable but also gives answers.")
        file = row.get("file")
        if file is not None and not isinstance(file, str):
            raise InvalidInput(f"Line {number}: \"file\" must be a file name.")
        out.append(EvalQuestion(row["question"].strip(), [a for a in answers if a.strip()], unanswerable, file))
        if len(out) > MAX_QUESTIONS:
            raise InvalidInput(f"Use at most {MAX_QUESTIONS} questions per run.")
    if not out:
        raise InvalidInput("There are no questions in that file.")
    return out


def load_questions(path: str | Path) -> list[EvalQuestion]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise InvalidInput(f"Could not read the questions file {path}: it must be UTF-8 text, one JSON object a line.")
    return parse_questions(text.splitlines())


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’–—"})


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def contains_answer(text: str, answers: list[str]) -> bool:
    norm = f" {normalize(text)} "
    return any(f" {normalize(a)} " in norm for a in answers if normalize(a))


def is_abstention(text: str, grounding: dict | None, refusal: str) -> bool:
    """The GPT declined: the grounding check refused, the text is the refusal, or the
    model itself said it does not know."""
    from personal_gpt.knowledge.grounding import model_abstained

    if grounding and grounding.get("action") == "refuse":
        return True
    return text.strip() == refusal.strip() or model_abstained(text)


def citation_ok(q: EvalQuestion, citations: list[dict]) -> bool | None:
    """Whether the first citation points at the right place: the named file when the
    question names one, else a cited evidence sentence or passage holding an answer."""
    if q.unanswerable or (not q.answers and not q.file):
        return None
    if not citations:
        return False
    first = citations[0]
    if q.file:
        return first.get("file") == q.file
    return contains_answer(first.get("passage") or first.get("text", ""), q.answers)


def score(items: list[ItemResult]) -> Report:
    ans = [i for i in items if not i.unanswerable]
    una = [i for i in items if i.unanswerable]
    with_gold = [i for i in ans if i.answers]
    cited = [i for i in items if i.cited_ok is not None and not i.abstained]

    def share(part, whole):
        return round(len(part) / len(whole), 4) if whole else None

    return Report(
        items=items,
        answerable=len(ans),
        unanswerable=len(una),
        containment=share([i for i in with_gold if i.contained], with_gold),
        abstention=share([i for i in una if i.abstained], una),
        false_abstention=share([i for i in ans if i.abstained], ans),
        citation_accuracy=share([i for i in cited if i.cited_ok], cited),
        seconds_per_answer=round(sum(i.seconds for i in items) / len(items), 3) if items else None,
    )


def judge(q: EvalQuestion, text: str, grounding: dict | None, citations: list[dict], refusal: str,
          seconds: float) -> ItemResult:
    abstained = is_abstention(text, grounding, refusal)
    contained = None if (q.unanswerable or not q.answers) else (not abstained and contains_answer(text, q.answers))
    return ItemResult(q.question, text, abstained, q.unanswerable, q.answers, contained,
                      None if abstained else citation_ok(q, citations), citations, round(seconds, 3))


def run_eval(svc, p, gpt_id: str, questions: list[EvalQuestion], spec=None,
             progress: Callable[[int, int], None] | None = None) -> Report:
    """Ask each question in its own "test" conversation (the published version, or
    ``spec`` — the builder's draft) and score the answers."""
    from personal_gpt.gpts import refusal_message
    from personal_gpt.services_knowledge import I_DONT_KNOW

    if spec is None:
        spec, _ = svc.published_spec(p, gpt_id)
    refusal = refusal_message(spec, I_DONT_KNOW)
    items = []
    for i, q in enumerate(questions):
        conv = svc.start_conversation(p, gpt_id, source=TEST_SOURCE)
        started = time.perf_counter()
        reply = svc.send(p, conv, q.question, spec=spec)
        text = "".join(reply.pieces)
        items.append(judge(q, text, reply.grounding, reply.citations, refusal, time.perf_counter() - started))
        if progress is not None:
            progress(i + 1, len(questions))
    return score(items)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def format_report(report: Report) -> str:
    """The report as plain text: one line per question, then the four figures."""
    lines = []
    for n, i in enumerate(report.items, 1):
        answer = " ".join(i.answer.split())
        lines.append(f"{n:>3}. [{i.verdict}] {i.question}\n     -> {answer[:200]}")
    lines.append("")
    lines.append(f"questions: {report.answerable} answerable, {report.unanswerable} unanswerable")
    lines.append(f"answer containment:           {_pct(report.containment)}")
    lines.append(f"abstention on unanswerables:  {_pct(report.abstention)}")
    lines.append(f"false abstention:             {_pct(report.false_abstention)}")
    lines.append(f"citation accuracy:            {_pct(report.citation_accuracy)}")
    if report.seconds_per_answer is not None:
        lines.append(f"seconds per answer:           {report.seconds_per_answer:.2f}")
    return "\n".join(lines)
