"""Reading uploaded training data: OpenAI chat JSONL, Alpaca and ShareGPT (JSON
or JSONL), and CSV/XLSX tables (or flat JSON records) with prompt and response
columns. Turns bytes into finished message lists with their line, item or row
numbers, or raises InvalidInput with sentences naming the lines at fault.
Knows nothing of tokens, splits or training (``data`` builds on it).
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from personal_gpt.errors import InvalidInput
from personal_gpt.knowledge import archive, sniff

MAX_BYTES = 50 * 1024 * 1024
MAX_NUMBERS = 10  # line numbers listed in one sentence
UPLOAD_THIS = "Upload a JSONL, JSON, CSV or Excel (.xlsx) file with your prompts and answers."
EMPTY = "The file is empty: there are no examples in it."
NO_EXAMPLES = "The file has no examples."
NOT_A_FORMAT = ('The file is JSON but not in a training-data format we know: each record needs "messages" '
                '(OpenAI chat), "instruction" and "output" (Alpaca), "conversations" (ShareGPT), '
                "or prompt and response fields.")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
PROMPT_NAMES = ("prompt", "question", "instruction", "input", "user", "query")
RESPONSE_NAMES = ("response", "answer", "output", "completion", "assistant", "reply")
SYSTEM_NAMES = ("system", "system prompt", "system message")
_LOOSE = {"prompt", "question", "instruction", "query", "response", "answer", "completion", "reply"}


@dataclass
class Parsed:
    """What a file held: finished message lists with their numbers, and notes."""

    format: str  # openai-chat, alpaca, sharegpt, table
    unit: str = "Line"  # how a record is named in a sentence: Line, Item, Row
    records: list[tuple[list[dict], int]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0


class _Bad(Exception):
    """A record that cannot be read: what is wrong, said of one record and of several."""

    def __init__(self, one: str, many: str):
        super().__init__(one)
        self.key = (one, many)


NOT_OBJECT = ("is not a JSON object", "are not JSON objects")
NOT_TEXT = ("has content that is not text", "have content that is not text")


def numbered(unit: str, numbers: list[int], limit: int = MAX_NUMBERS) -> str:
    """'Line 3', 'Lines 3 and 7', 'Lines 3, 7 and 12', 'Lines 1, 2, ..., 10 and 4 more'."""
    nums = sorted(set(numbers))
    if len(nums) == 1:
        return f"{unit} {nums[0]}"
    shown, rest = nums[:limit], len(nums) - limit
    if rest > 0:
        return f"{unit}s {', '.join(map(str, shown))} and {rest} more"
    return f"{unit}s {', '.join(map(str, shown[:-1]))} and {shown[-1]}"


def empty_part(messages: list[dict] | tuple[dict, ...]) -> str | None:
    """'prompt', 'response', 'prompt and response' when that is empty, else None.
    The prompt is the user message right before the final assistant message."""
    response = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
    prompt = messages[-2]["content"] if len(messages) >= 2 and messages[-2]["role"] == "user" else ""
    missing = [name for name, text in (("prompt", prompt), ("response", response)) if not text.strip()]
    return " and ".join(missing) or None


# --- the file as a whole -------------------------------------------------------

def parse(data: bytes, filename: str, *, prompt_column: str | None = None,
          response_column: str | None = None, system_column: str | None = None) -> Parsed:
    """Read ``data`` (an upload called ``filename``), whatever its extension says."""
    if len(data) > MAX_BYTES:
        raise InvalidInput(f"The file is {len(data) / 1024 / 1024:.1f} MB; training data can be at most "
                           f"{MAX_BYTES // 1024 // 1024} MB. Split it or remove examples and upload it again.")
    if not data.strip():
        raise InvalidInput(EMPTY)
    columns = {"prompt_column": prompt_column, "response_column": response_column, "system_column": system_column}
    ext = sniff.extension(filename)
    with tempfile.TemporaryDirectory(prefix="pgpt-train-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            kind = sniff.detect(path).kind
        except InvalidInput:  # only for an empty file
            raise InvalidInput(EMPTY) from None
        if kind == "xlsx":
            archive.check_archive(path, "XLSX")
            parsed = _xlsx(path, **columns)
            return _done(parsed)
    if kind != "text":
        what = sniff.DESCRIPTIONS.get(kind, kind)
        raise InvalidInput(f"This file is {what}, not training data. {UPLOAD_THIS}")
    text = _decode(data)
    if text.lstrip().startswith(("[", "{")) or ext in ("json", "jsonl", "ndjson"):
        return _done(_json(text, **columns))
    if ext not in ("csv", "tsv", "txt", ""):
        raise InvalidInput(f"This file (.{ext}) is not training data. {UPLOAD_THIS}")
    return _done(_csv(text, ext, **columns))


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")  # unambiguous with its byte-order mark
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(f"The file is not UTF-8 text (the first character that is not UTF-8 is on line {line}). "
                           "Save it as UTF-8 (in Excel: 'CSV UTF-8') and upload it again.") from None


def _done(parsed: Parsed) -> Parsed:
    if not parsed.records:
        if parsed.skipped:
            raise InvalidInput(f"No example in the file has both a prompt and a response: {parsed.problems[0]}")
        raise InvalidInput(NO_EXAMPLES)
    return parsed


# --- JSON and JSON Lines -------------------------------------------------------

def _json(text: str, **columns) -> Parsed:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"The file is not valid JSON: {exc.msg} on line {exc.lineno}, column {exc.colno}. "
                               "Fix it and upload the file again.") from None
        return _records(items, list(range(1, len(items) + 1)), "Item", **columns)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        first = stripped.split("\n", 1)[0].strip()
        if first == "{":  # one pretty-printed object, not JSON Lines
            raise InvalidInput(f"The file is not valid JSON: {exc.msg} on line {exc.lineno}, column {exc.colno}. "
                               "Fix it and upload the file again.") from None
        return _json_lines(text, **columns)
    if isinstance(whole, dict) and _record_format(whole) is None:
        lists = [v for v in whole.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1:  # a wrapper such as {"data": [...]}
            return _records(lists[0], list(range(1, len(lists[0]) + 1)), "Item", **columns)
    start = len(text) - len(stripped)
    return _records([whole], [text.count("\n", 0, start) + 1], "Line", **columns)


def _json_lines(text: str, **columns) -> Parsed:
    items, numbers, bad = [], [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
            numbers.append(number)
        except json.JSONDecodeError as exc:
            bad.append((number, exc))
    if bad:
        first, exc = bad[0]
        one = len(bad) == 1
        raise InvalidInput(
            f"{numbered('Line', [n for n, _ in bad])} {'is' if one else 'are'} not valid JSON: "
            f"line {first} says '{exc.msg}' at column {exc.colno}. Each line must hold one complete JSON "
            f"object; fix {'it' if one else 'them'} and upload the file again.")
    return _records(items, numbers, "Line", **columns)


def _record_format(item: dict) -> str | None:
    if "messages" in item:
        return "openai-chat"
    if "conversations" in item:
        return "sharegpt"
    if "instruction" in item and "output" in item:
        return "alpaca"
    return None


def _records(items: list, numbers: list[int], unit: str, **columns) -> Parsed:
    if not items:
        raise InvalidInput(NO_EXAMPLES)
    first = next((item for item in items if isinstance(item, dict)), None)
    if first is None:
        raise InvalidInput(NOT_A_FORMAT)
    fmt = _record_format(first)
    not_objects = [n for item, n in zip(items, numbers) if not isinstance(item, dict)]
    if fmt is None:  # flat records: a table whose columns are the keys
        if not_objects:
            raise InvalidInput(f"{numbered(unit, not_objects)} {NOT_OBJECT[len(not_objects) > 1]}. {UPLOAD_THIS}")
        keys = list(dict.fromkeys(key for item in items for key in item))
        return _rows(items, keys, numbers, unit, json_records=True, **columns)
    read = {"openai-chat": _openai, "alpaca": _alpaca, "sharegpt": _sharegpt}[fmt]
    parsed = Parsed(fmt, unit)
    errors: dict[tuple[str, str], list[int]] = {}
    for item, number in zip(items, numbers):
        try:
            if not isinstance(item, dict):
                raise _Bad(*NOT_OBJECT)
            messages = _finish(read(item), number, unit, parsed.problems)
        except _Bad as bad:
            errors.setdefault(bad.key, []).append(number)
            continue
        _keep(parsed, messages, number)
    if errors:
        sentences = [f"{numbered(unit, nums)} {key[len(nums) > 1]}." for key, nums in errors.items()]
        raise InvalidInput(" ".join(sentences) + " Fix them and upload the file again.")
    return parsed


def _text(value) -> str | None:
    """A message's text: strings as they are, numbers written out, OpenAI content
    parts joined; None for anything else (images, objects)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "" if isinstance(value, float) and math.isnan(value) else str(value)
    if isinstance(value, list):
        parts = [p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None for p in value]
        return None if any(not isinstance(p, str) for p in parts) else "\n".join(parts)
    return None


def _openai(item: dict) -> list[dict]:
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad('has no "messages" list', 'have no "messages" list')
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Bad('has a message without "role" and "content"', 'have messages without "role" and "content"')
        role = CHAT_ROLES.get(str(message["role"]).lower())
        if role is None:
            raise _Bad(f"uses the role '{message['role']}' (only system, user and assistant can be used)",
                       f"use the role '{message['role']}' (only system, user and assistant can be used)")
        content = _text(message["content"])
        if content is None:
            raise _Bad(*NOT_TEXT)
        out.append({"role": role, "content": content})
    return out


def _sharegpt(item: dict) -> list[dict]:
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Bad('has no "conversations" list', 'have no "conversations" list')
    out = []
    system = _text(item.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _Bad('has a turn without "from" and "value"', 'have turns without "from" and "value"')
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise _Bad(f"has the speaker '{turn['from']}' (use human, gpt or system)",
                       f"have the speaker '{turn['from']}' (use human, gpt or system)")
        content = _text(turn["value"])
        if content is None:
            raise _Bad(*NOT_TEXT)
        out.append({"role": role, "content": content})
    return out


def _alpaca(item: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in item:
            raise _Bad(f'has no "{key}" field', f'have no "{key}" field')
    texts = [_text(item.get(key)) for key in ("system", "instruction", "input", "output")]
    if any(t is None for t in texts):
        raise _Bad(*NOT_TEXT)
    system, instruction, extra, output = (t.strip() for t in texts)
    prompt = "\n\n".join(t for t in (instruction, extra) if t)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _finish(messages: list[dict], number: int, unit: str, problems: list[str]) -> list[dict]:
    """Strip texts, drop empty system messages and the turns after the last answer."""
    out = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    out = [m for m in out if m["role"] != "system" or m["content"]]
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _Bad("has no assistant message (the answer to learn)", "have no assistant message (the answer to learn)")
    if last < len(out) - 1:
        problems.append(f"{unit} {number} goes on after its last answer; the messages after it are left out.")
    return out[:last + 1]


def _keep(parsed: Parsed, messages: list[dict], number: int) -> None:
    part = empty_part(messages)
    if part:
        parsed.problems.append(f"{parsed.unit} {number} has an empty {part} and will be skipped.")
        parsed.skipped += 1
    else:
        parsed.records.append((messages, number))


# --- tables: CSV, XLSX, flat JSON records -----------------------------------------

def _csv(text: str, ext: str, **columns) -> Parsed:
    import pandas as pd

    header = text.split("\n", 1)[0]
    sep = "\t" if ext == "tsv" else max((",", ";", "\t"), key=header.count)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise InvalidInput(EMPTY) from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise InvalidInput(
                f"Line {m[2]} of the CSV file has {m[3]} cells but the header has {m[1]}; put quotes around "
                "text that contains the separator, or save the file from your spreadsheet program again.") from None
        raise InvalidInput("The CSV file could not be read; save it again from your spreadsheet program "
                           "as 'CSV UTF-8' and upload it again.") from None
    return _frame(frame, **columns)


def _xlsx(path: Path, **columns) -> Parsed:
    import pandas as pd

    try:
        frame = pd.read_excel(path, sheet_name=0, dtype=str, keep_default_na=False, engine="openpyxl")
    except Exception:  # openpyxl's many ways of failing on a damaged workbook
        raise InvalidInput("The Excel file could not be read; open it, save it again as an Excel workbook "
                           "(.xlsx) and upload it again.") from None
    return _frame(frame, **columns)


def _frame(frame, **columns) -> Parsed:
    """A spreadsheet's rows; numbered as the spreadsheet does (header = row 1)."""
    frame.columns = [str(c) for c in frame.columns]
    names = list(frame.columns)
    rows = frame.to_dict("records")
    return _rows(rows, names, list(range(2, len(rows) + 2)), "Row", **columns)


def _norm(name) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(name).lower()).split())


def _listing(columns: list[str]) -> str:
    shown = [f"'{c[:40]}'" for c in columns[:20]]
    more = f" and {len(columns) - 20} more" if len(columns) > 20 else ""
    return ", ".join(shown) + more


def _pick(columns: list[str], given: str) -> str:
    if given in columns:
        return given
    same = [c for c in columns if _norm(c) == _norm(given)]
    if same:
        return same[0]
    raise InvalidInput(f"There is no column called '{given}'; the columns are {_listing(columns)}.")


def _guess(columns: list[str], names: tuple[str, ...], taken: set[str]) -> str | None:
    free = [c for c in columns if c not in taken]
    for name in names:
        for c in free:
            if _norm(c) == name:
                return c
    for name in names:  # "Customer question", "Our answer"
        for c in free:
            if name in _LOOSE and name in _norm(c).split():
                return c
    return None


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


def _rows(rows: list[dict], names: list[str], numbers: list[int], unit: str, *, json_records: bool = False,
          prompt_column: str | None = None, response_column: str | None = None,
          system_column: str | None = None) -> Parsed:
    if not rows or not names:
        raise InvalidInput(NO_EXAMPLES)
    system = _pick(names, system_column) if system_column else None
    response = _pick(names, response_column) if response_column else None
    prompt = _pick(names, prompt_column) if prompt_column else None
    taken = {c for c in (system, response, prompt) if c}
    if system is None and (system := _guess(names, SYSTEM_NAMES, taken)):
        taken.add(system)
    if prompt is None and (prompt := _guess(names, PROMPT_NAMES, taken)):
        taken.add(prompt)
    if response is None and (response := _guess(names, RESPONSE_NAMES, taken)):
        taken.add(response)
    if prompt is None or response is None:
        if json_records:
            raise InvalidInput(f"{NOT_A_FORMAT} The fields found are {_listing(names)}.")
        raise InvalidInput(f"Could not tell which columns hold the prompts and the answers; the columns are "
                           f"{_listing(names)}. Call them 'prompt' and 'response', or choose the columns.")
    extra = None  # Alpaca as a table: instruction + input
    if not prompt_column and _norm(prompt) == "instruction":
        extra = next((c for c in names if c not in taken and _norm(c) == "input"), None)
    parsed = Parsed("table", unit, columns=names)
    for row, number in zip(rows, numbers):
        if not any(_cell(v) for v in row.values()):
            continue  # a blank row
        text = "\n\n".join(t for t in (_cell(row.get(prompt)), _cell(row.get(extra)) if extra else "") if t)
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": _cell(row.get(response))}]
        if system and _cell(row.get(system)):
            messages.insert(0, {"role": "system", "content": _cell(row.get(system))})
        _keep(parsed, messages, number)
    return parsed
