"""Training examples for fine-tuning: load them from an upload (formats does the
reading), check them (counts, token lengths, duplicates, a seeded train/eval
split), show them as an editable table and store the normalised JSONL a job
trains on. Plain data in and out: no model, no Streamlit; pandas only inside
the table functions.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from personal_gpt.errors import InvalidInput
from personal_gpt.finetune import formats
from personal_gpt.finetune.formats import numbered

TABLE_COLUMNS = ["system", "prompt", "response", "context", "line"]
FEW_EXAMPLES = 10


@dataclass(frozen=True)
class Example:
    """One conversation to learn from; the last message is the assistant answer.
    ``line`` is the line, row or item number in the uploaded file (None when new)."""

    messages: tuple[dict, ...]
    line: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "messages", tuple(
            {"role": m["role"], "content": m["content"]} for m in self.messages))

    @classmethod
    def single(cls, prompt: str, response: str, system: str = "", line: int | None = None) -> "Example":
        head = ({"role": "system", "content": system},) if system else ()
        return cls(head + ({"role": "user", "content": prompt}, {"role": "assistant", "content": response}), line)

    def _last(self, role: str) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == role), "")

    @property
    def prompt(self) -> str:
        """The text of the last user turn."""
        return self._last("user")

    @property
    def response(self) -> str:
        """The text of the last assistant turn: the answer to learn."""
        return self._last("assistant")

    @property
    def system(self) -> str:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else ""

    def to_json(self) -> dict:
        return {"messages": [dict(m) for m in self.messages]}

    def key(self) -> str:
        """Identical for exact duplicates (same messages, whatever the line)."""
        return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)


@dataclass
class Loaded:
    """What an upload held. ``problems`` are per-row notes (each names its line or
    row); ``skipped`` counts the rows left out for an empty prompt or response."""

    format: str  # openai-chat, alpaca, sharegpt, table
    examples: list[Example]
    columns: list[str] = field(default_factory=list)  # tables only
    problems: list[str] = field(default_factory=list)
    skipped: int = 0


def load_examples(data: bytes, filename: str, *, prompt_column: str | None = None,
                  response_column: str | None = None, system_column: str | None = None) -> Loaded:
    """Read an upload in any supported format (decided from its content). Raises
    InvalidInput with sentences a creator understands for a file that cannot be used."""
    parsed = formats.parse(data, filename, prompt_column=prompt_column,
                           response_column=response_column, system_column=system_column)
    examples = [Example(tuple(messages), number) for messages, number in parsed.records]
    return Loaded(parsed.format, examples, parsed.columns, parsed.problems, parsed.skipped)


# --- checking ------------------------------------------------------------------

@dataclass
class Report:
    """What training on these examples would look like. ``errors`` block training;
    ``warnings`` are worth reading first. ``to_dict()`` is JSON-ready."""

    total: int
    usable: int
    train: int
    eval: int
    tokens_min: int
    tokens_median: float
    tokens_max: int
    max_length: int
    truncated: int
    duplicates: int
    empty: int
    eval_share: float
    seed: int
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _train: list[Example] = field(default_factory=list, repr=False, compare=False)
    _eval: list[Example] = field(default_factory=list, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def split(self) -> tuple[list[Example], list[Example]]:
        """The usable examples as (train, eval), each in the original order."""
        return list(self._train), list(self._eval)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out["warnings"], out["errors"], out["ok"] = list(self.warnings), list(self.errors), self.ok
        return out


def _lines_note(examples: list[Example]) -> str:
    lines = [ex.line for ex in examples if ex.line is not None]
    return f" ({numbered('line', lines)})" if lines else ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def validate(examples: list[Example], count_tokens: Callable[[list[dict]], int], *, max_length: int,
             eval_share: float, seed: int = 0) -> Report:
    """Count, measure and split ``examples``. ``count_tokens`` gives the length of a
    messages list as the model will see it (its chat template). Empty examples and
    exact duplicates (all but the first) are left out; the split is seeded."""
    if not 0 <= eval_share < 1:
        raise InvalidInput("The share kept for evaluation must be at least 0 and below 1 (for example 0.1).")
    if int(max_length) < 1:
        raise InvalidInput("The maximum length must be at least 1 token.")
    empty, duplicates, usable, seen = [], [], [], set()
    for ex in examples:
        if formats.empty_part(ex.messages):
            empty.append(ex)
        elif ex.key() in seen:
            duplicates.append(ex)
        else:
            seen.add(ex.key())
            usable.append(ex)
    lengths = [int(count_tokens([dict(m) for m in ex.messages])) for ex in usable]
    truncated = sum(1 for n in lengths if n > max_length)

    n_eval = round(len(usable) * eval_share)
    if len(usable) >= 2 and eval_share > 0:
        n_eval = min(max(n_eval, 1), len(usable) - 1)
    else:
        n_eval = 0
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])

    warnings, errors = [], []
    if empty:
        warnings.append(f"{_plural(len(empty), 'example')} {'has' if len(empty) == 1 else 'have'} an empty prompt "
                        f"or response and will be skipped{_lines_note(empty)}.")
    if duplicates:
        warnings.append(f"{_plural(len(duplicates), 'duplicate example')} will be left out{_lines_note(duplicates)}.")
    if truncated:
        warnings.append(f"{_plural(truncated, 'example')} {'is' if truncated == 1 else 'are'} longer than the "
                        f"maximum length ({max_length} tokens) and will be cut.")
    if not usable:
        errors.append("There are no usable examples: add at least one example with both a prompt and a response.")
    elif len(usable) < FEW_EXAMPLES:
        warnings.append(f"Only {_plural(len(usable), 'example')}: fine-tuning works best with at least "
                        f"{FEW_EXAMPLES}, ideally 50+.")
    return Report(
        total=len(examples), usable=len(usable), train=len(usable) - n_eval, eval=n_eval,
        tokens_min=min(lengths, default=0), tokens_median=statistics.median(lengths) if lengths else 0,
        tokens_max=max(lengths, default=0), max_length=int(max_length), truncated=truncated,
        duplicates=len(duplicates), empty=len(empty), eval_share=eval_share, seed=seed,
        warnings=warnings, errors=errors,
        _train=[ex for i, ex in enumerate(usable) if i not in held],
        _eval=[ex for i, ex in enumerate(usable) if i in held],
    )


# --- the editable table ----------------------------------------------------------

def _parts(ex: Example) -> tuple[str, list[dict], str, str]:
    """(system, earlier turns, prompt, response) of an example."""
    rest = list(ex.messages)
    system = rest.pop(0)["content"] if rest and rest[0]["role"] == "system" else ""
    response = rest.pop()["content"] if rest and rest[-1]["role"] == "assistant" else ""
    prompt = rest.pop()["content"] if rest and rest[-1]["role"] == "user" else ""
    return system, rest, prompt, response


def to_table(examples: list[Example]):
    """A DataFrame (system, prompt, response, context, line) for st.data_editor;
    ``context`` holds the earlier turns of a multi-turn example as JSON."""
    import pandas as pd

    rows = []
    for ex in examples:
        system, context, prompt, response = _parts(ex)
        rows.append({"system": system, "prompt": prompt, "response": response,
                     "context": json.dumps(context, ensure_ascii=False) if context else "", "line": ex.line})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["line"] = table["line"].astype("Int64")
    return table


def _cell(value) -> str:
    import pandas as pd

    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()


def _context(text: str, where: str) -> list[dict]:
    if not text:
        return []
    try:
        turns = json.loads(text)
    except json.JSONDecodeError:
        turns = None
    ok = isinstance(turns, list) and all(
        isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and isinstance(t.get("content"), str)
        for t in turns)
    if not ok:
        raise InvalidInput(f"The context of {where} was changed and is no longer a list of messages; "
                           "undo that edit or clear the cell.")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def from_table(table) -> list[Example]:
    """The examples an (edited) table holds, in its order. Blank rows are dropped;
    rows with an empty prompt or response are kept so that ``validate`` reports
    them; rows without a line number are new single-turn examples."""
    missing = [c for c in ("prompt", "response") if c not in table.columns]
    if missing:
        raise InvalidInput(f"The table has no {' or '.join(missing)} column.")
    examples = []
    for position, row in enumerate(table.to_dict("records"), 1):
        system, prompt, response, context = (_cell(row.get(c)) for c in ("system", "prompt", "response", "context"))
        if not (system or prompt or response or context):
            continue
        try:
            line = int(float(_cell(row.get("line")))) if _cell(row.get("line")) else None
        except ValueError:  # a line number typed over: it is a new example now
            line = None
        turns = _context(context, f"line {line}" if line is not None else f"table row {position}")
        head = [{"role": "system", "content": system}] if system else []
        tail = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        examples.append(Example(tuple(head + turns + tail), line))
    return examples


# --- the normalised dataset ------------------------------------------------------

def write_jsonl(examples: list[Example], path: str | os.PathLike) -> Path:
    """Write one ``{"messages": [...]}`` per line, atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """The examples ``write_jsonl`` wrote; ``line`` is the line in that file."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                examples.append(Example(tuple(messages), number))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvalidInput(f"The training data file is damaged at line {number}; "
                                   "prepare the data again.") from None
    return examples
