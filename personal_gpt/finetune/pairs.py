"""Draft training pairs from a GPT's knowledge passages, without a model, for
the creator to review in the same editable table as uploaded examples.

The heuristic, per passage (a dict with text, file, page, section):

* skip it when, cleaned, it is shorter than 80 characters or 12 words, or when
  fewer than 60% of its visible characters are letters (tables of numbers,
  contents pages, code, garbage from a scan);
* the answer is the cleaned text (whitespace collapsed, list items kept on their
  own lines), cut at a sentence end near 1,200 characters;
* the question is the first of these that no earlier pair already asks:
  1. a section heading:   What does "<file>" say about <section>?
  2. a definition in the first sentence ("X is a/an/the ...", "X means ..."):
                          What is X?  (are/was/were/does X mean as the verb says)
  3. the longest run of capitalised words in the first sentence (a name, a
     product, a place), not just the sentence's first word:
                          What does "<file>" say about <phrase>?
  4. a page number:       Summarise what "<file>" says on page N.
  5. otherwise:           What does "<file>" say in the part that begins "<first words>..."?
  A passage whose every question is taken is skipped (it repeats another).
* with more than ``limit`` pairs, a seeded sample of ``limit`` is kept, in the
  passages' order. Same input and seed, same pairs.
"""

from __future__ import annotations

import random
import re

from personal_gpt.finetune.data import Example

MIN_CHARS = 80
MIN_WORDS = 12
MIN_LETTER_SHARE = 0.6
MAX_ANSWER = 1200
_BULLET = re.compile(r"^(?:[-*•▪‣◦]|\d{1,3}[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
_DEFINITION = re.compile(
    r"^(?P<subject>(?:(?:the|a|an)\s+)?[^\s,;:.!?()]+(?:\s+[^\s,;:.!?()]+){0,4}?)\s+"
    r"(?:(?P<be>is|are|was|were)\s+(?:a|an|the)\s|(?P<means>means|refers to)\s)", re.I)
_NOT_SUBJECTS = {"it", "this", "that", "these", "those", "they", "we", "you", "i", "he", "she", "there", "here",
                 "which", "what", "who", "our", "your", "their", "its", "his", "her", "each", "all", "some"}
_CAPITAL_RUN = re.compile(r"\b(?:[A-Z][\w'’&-]*)(?:\s+(?:of|and|for|the|de|&)?\s*[A-Z][\w'’&-]*)*")
_ARTICLES = {"the", "a", "an"}


def clean_text(text: str) -> str:
    """Whitespace collapsed, control characters gone, list items on their own lines."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", text or "")
    out: list[str] = []
    for raw in text.split("\n"):
        line = " ".join(raw.split())
        if not line:
            continue
        if out and not _BULLET.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def _mostly_text(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    words = [w for w in text.split() if sum(c.isalpha() for c in w) >= 2]
    letters = sum(c.isalpha() for c in visible)
    return len(text) >= MIN_CHARS and len(words) >= MIN_WORDS and letters >= MIN_LETTER_SHARE * len(visible)


def _cap(text: str, limit: int = MAX_ANSWER) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
    if ends and ends[-1] >= limit // 2:
        return head[:ends[-1]]
    return head.rsplit(" ", 1)[0].rstrip(",;:") + "…"


def _display(file: str) -> str:
    name = re.split(r"[\\/]", file or "")[-1].strip()
    stem = re.sub(r"\.[A-Za-z0-9]{2,5}$", "", name)
    return stem or name or "the document"


def _first_sentence(text: str) -> str:
    first = _SENTENCE_END.split(text.replace("\n", " "), maxsplit=1)[0]
    return first[:300]


def _definition(sentence: str) -> str | None:
    m = _DEFINITION.match(sentence)
    if not m:
        return None
    words = m["subject"].split()
    if words[0].lower() in _NOT_SUBJECTS or not any(c.isalpha() for c in m["subject"]):
        return None
    if words[0].lower() in _ARTICLES:
        words[0] = words[0].lower()
    subject = " ".join(words)
    if m["means"]:
        return f"What does {subject} mean?"
    return f"What {m['be'].lower()} {subject}?"


def _capitalised(sentence: str) -> str | None:
    best = None
    for m in _CAPITAL_RUN.finditer(sentence):
        phrase = re.sub(r"^(?:The|A|An)\s+", "", m.group(0)).strip(" -&")
        single = len(phrase.split()) == 1
        if not phrase or (m.start() == 0 and single and not phrase.isupper()) or phrase in ("I", "A"):
            continue
        if best is None or len(phrase.split()) > len(best.split()):
            best = phrase
    return best


def _section(section: str | None, name: str) -> str | None:
    section = " ".join((section or "").split()).rstrip(":").strip()
    letters = sum(c.isalpha() for c in section)
    if letters < 2 or len(section) > 80 or section.casefold() == name.casefold():
        return None
    return section


def _questions(text: str, name: str, page, section: str | None):
    """Candidate questions for one passage, best first."""
    if heading := _section(section, name):
        yield f'What does "{name}" say about {heading}?'
    sentence = _first_sentence(text)
    if question := _definition(sentence):
        yield question
    if phrase := _capitalised(sentence):
        yield f'What does "{name}" say about {phrase}?'
    if isinstance(page, int) and page > 0:
        yield f'Summarise what "{name}" says on page {page}.'
    opening = " ".join(text.split()[:6]).rstrip(".,;:")
    yield f'What does "{name}" say in the part that begins "{opening}..."?'


def pairs_from_passages(passages: list[dict], *, limit: int = 200, seed: int = 0) -> list[Example]:
    """One question/answer Example per usable passage (see the module docstring);
    ``line`` is the passage's 1-based position in ``passages``."""
    asked: set[str] = set()
    pairs: list[Example] = []
    for position, passage in enumerate(passages, 1):
        text = clean_text(str(passage.get("text") or ""))
        if not _mostly_text(text):
            continue
        name = _display(str(passage.get("file") or ""))
        for question in _questions(text, name, passage.get("page"), passage.get("section")):
            if question.casefold() not in asked:
                asked.add(question.casefold())
                pairs.append(Example.single(question, _cap(text), line=position))
                break
    if len(pairs) > limit:
        keep = sorted(random.Random(seed).sample(range(len(pairs)), max(limit, 0)))
        pairs = [pairs[i] for i in keep]
    return pairs
