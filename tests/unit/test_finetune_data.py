"""Fine-tuning data: every upload format, every refused file (with the sentence
a creator sees), the validation report, the editable table, the stored JSONL
and training pairs drafted from knowledge passages.

Uploads are real files written to ``tmp_path`` (an XLSX by pandas/openpyxl, a
CSV with a UTF-8 byte-order mark); token counts use a whitespace counter, and
one test the bundled model's real tokenizer.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from personal_gpt.errors import InvalidInput
from personal_gpt.finetune import formats
from personal_gpt.finetune.data import (
    Example,
    from_table,
    load_examples,
    read_jsonl,
    to_table,
    validate,
    write_jsonl,
)
from personal_gpt.finetune.pairs import pairs_from_passages

ROOT = Path(__file__).resolve().parents[2]
STYLE_TRAIN = ROOT / "bench" / "data" / "finetune-style-train.jsonl"


def words(messages: list[dict]) -> int:
    """A known token counter: whitespace-separated words over all messages."""
    return sum(len(m["content"].split()) for m in messages)


def upload(tmp_path: Path, name: str, content: str | bytes, encoding: str = "utf-8"):
    """Write the file as a creator would have it, and read it back as an upload."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path.read_bytes(), name


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def chat(prompt: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def refused(data: bytes, name: str, **columns) -> str:
    with pytest.raises(InvalidInput) as caught:
        load_examples(data, name, **columns)
    return str(caught.value)


# --- formats -----------------------------------------------------------------------

def test_openai_chat_jsonl(tmp_path):
    multi = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Opening hours?"}]},
        {"role": "assistant", "content": "  7 to 5.  "},
        {"role": "user", "content": "Thanks"},  # after the last answer: left out, noted
    ]}
    text = jsonl(chat("What is 2+2?", "4"), "", multi).replace("\n", "\r\n")
    loaded = load_examples(*upload(tmp_path, "train.jsonl", text))
    assert loaded.format == "openai-chat"
    assert [ex.line for ex in loaded.examples] == [1, 3]
    first, second = loaded.examples
    assert (first.prompt, first.response, first.system) == ("What is 2+2?", "4", "")
    assert second.system == "Be brief."
    assert (second.prompt, second.response) == ("Opening hours?", "7 to 5.")
    assert len(second.messages) == 5 and second.messages[-1] == {"role": "assistant", "content": "7 to 5."}
    assert loaded.problems == ["Line 3 goes on after its last answer; the messages after it are left out."]
    assert loaded.skipped == 0
    assert first.to_json() == chat("What is 2+2?", "4")


def test_alpaca_json_array_and_jsonl(tmp_path):
    records = [
        {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour", "input": "", "output": "Blue"},
        {"instruction": "Say nothing", "output": ""},
    ]
    loaded = load_examples(*upload(tmp_path, "alpaca.json", json.dumps(records, indent=2)))
    assert loaded.format == "alpaca"
    assert [ex.prompt for ex in loaded.examples] == ["Translate to French\n\nGood morning", "Name a colour"]
    assert [ex.line for ex in loaded.examples] == [1, 2]
    assert loaded.problems == ["Item 3 has an empty response and will be skipped."]
    assert loaded.skipped == 1

    lines = load_examples(*upload(tmp_path, "alpaca.jsonl", jsonl(*records)))
    assert lines.format == "alpaca"
    assert [ex.to_json() for ex in lines.examples] == [ex.to_json() for ex in loaded.examples]
    assert lines.problems == ["Line 3 has an empty response and will be skipped."]


def test_sharegpt_json_and_jsonl(tmp_path):
    record = {"conversations": [
        {"from": "system", "value": "You are Poppy."},
        {"from": "human", "value": "Do you sell rye?"},
        {"from": "gpt", "value": "Yes, every Friday."},
    ]}
    loaded = load_examples(*upload(tmp_path, "share.json", json.dumps([record, record | {"id": 2}])))
    assert loaded.format == "sharegpt"
    ex = loaded.examples[0]
    assert ex.messages == ({"role": "system", "content": "You are Poppy."},
                           {"role": "user", "content": "Do you sell rye?"},
                           {"role": "assistant", "content": "Yes, every Friday."})
    lines = load_examples(*upload(tmp_path, "share.jsonl", jsonl(record)))
    assert lines.format == "sharegpt" and lines.examples[0].messages == ex.messages


def test_csv_with_bom_guesses_columns_and_reports_empty_rows(tmp_path):
    text = ('Question,Answer\n'
            '"Do you deliver, and where?","Yes, within 10 km."\n'
            'Gluten-free?,\n'
            '\n'
            '"A two-line\nquestion",Sure.\n')
    loaded = load_examples(*upload(tmp_path, "faq.csv", "\ufeff" + text))
    assert loaded.format == "table"
    assert loaded.columns == ["Question", "Answer"]
    assert [(ex.prompt, ex.response) for ex in loaded.examples] == [
        ("Do you deliver, and where?", "Yes, within 10 km."), ("A two-line\nquestion", "Sure.")]
    assert [ex.line for ex in loaded.examples] == [2, 5]
    assert loaded.problems == ["Row 3 has an empty response and will be skipped."]
    assert loaded.skipped == 1


def test_semicolon_csv_with_system_column_and_alpaca_columns(tmp_path):
    loaded = load_examples(*upload(tmp_path, "eu.csv", "system;prompt;response\nBe kind.;Hi;Hello\n"))
    assert loaded.examples[0].messages[0] == {"role": "system", "content": "Be kind."}
    table = load_examples(*upload(tmp_path, "a.csv", "instruction,input,output\nSum,2 and 3,5\nHi,,Hello\n"))
    assert [ex.prompt for ex in table.examples] == ["Sum\n\n2 and 3", "Hi"]


def test_xlsx_written_by_pandas(tmp_path):
    path = tmp_path / "examples.xlsx"
    pd.DataFrame({
        "Id": [1, 2, 3],
        "Customer asks": ["When do you open?", "", "Vegan options?"],
        "We reply": ["At 7.", "Orphan answer", "Oat-milk buns."],
    }).to_excel(path, index=False)
    data = path.read_bytes()
    loaded = load_examples(data, "examples.xlsx", prompt_column="customer asks", response_column="We reply")
    assert loaded.format == "table"
    assert loaded.columns == ["Id", "Customer asks", "We reply"]
    assert [(ex.prompt, ex.response, ex.line) for ex in loaded.examples] == [
        ("When do you open?", "At 7.", 2), ("Vegan options?", "Oat-milk buns.", 4)]
    assert loaded.problems == ["Row 3 has an empty prompt and will be skipped."]
    # the same workbook under a misleading name is still read as a workbook
    assert len(load_examples(data, "examples.csv", prompt_column="Customer asks",
                             response_column="We reply").examples) == 2

    message = refused(data, "examples.xlsx")
    assert "Could not tell which columns hold the prompts and the answers" in message
    assert "'Id', 'Customer asks', 'We reply'" in message
    message = refused(data, "examples.xlsx", prompt_column="Prompt", response_column="We reply")
    assert message == "There is no column called 'Prompt'; the columns are 'Id', 'Customer asks', 'We reply'."


def test_flat_json_records_are_a_table(tmp_path):
    text = jsonl({"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": "See you"})
    loaded = load_examples(*upload(tmp_path, "legacy.jsonl", text))
    assert loaded.format == "table" and loaded.columns == ["prompt", "completion"]
    assert [ex.response for ex in loaded.examples] == ["Hello", "See you"]
    wrapped = load_examples(*upload(tmp_path, "wrapped.json", json.dumps({"data": [chat("Q", "A")]})))
    assert wrapped.format == "openai-chat" and wrapped.examples[0].line == 1


def test_style_training_set_loads_cleanly():
    loaded = load_examples(STYLE_TRAIN.read_bytes(), STYLE_TRAIN.name)
    assert loaded.format == "openai-chat"
    assert len(loaded.examples) == 200
    assert loaded.problems == [] and loaded.skipped == 0
    assert all(ex.prompt and ex.response for ex in loaded.examples)


# --- refused files ---------------------------------------------------------------------

def test_empty_files(tmp_path):
    for content in (b"", b"  \n\n", "\ufeff\n".encode()):
        assert "The file is empty" in refused(*upload(tmp_path, "e.jsonl", content))
    assert refused(*upload(tmp_path, "e.json", "[]")) == formats.NO_EXAMPLES
    assert refused(*upload(tmp_path, "h.csv", "prompt,response\n")) == formats.NO_EXAMPLES
    message = refused(*upload(tmp_path, "blank.csv", "prompt,response\n,Only an answer\nOnly a prompt,\n"))
    assert message == ("No example in the file has both a prompt and a response: "
                       "Row 2 has an empty prompt and will be skipped.")


def test_malformed_json_lines_name_their_lines(tmp_path):
    good = json.dumps(chat("Q", "A"))
    lines = [good] * 12
    for n in (3, 7, 12):
        lines[n - 1] = '{"messages": [}'
    message = refused(*upload(tmp_path, "bad.jsonl", "\n".join(lines)))
    assert message.startswith("Lines 3, 7 and 12 are not valid JSON: line 3 says")
    assert "fix them and upload the file again" in message

    one = refused(*upload(tmp_path, "one.jsonl", good + "\n" + good[:-5] + "\n"))
    assert one.startswith("Line 2 is not valid JSON: line 2 says")

    many = refused(*upload(tmp_path, "many.jsonl", good + "\n" + "not json\n" * 14))
    assert many.startswith("Lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 4 more are not valid JSON")

    pretty = refused(*upload(tmp_path, "pretty.json", '{\n  "messages": [\n    {"role": "user"\n  ]\n}\n'))
    assert pretty.startswith("The file is not valid JSON:") and "on line 4" in pretty
    array = refused(*upload(tmp_path, "array.json", '[\n {"instruction": "a", "output": "b"},\n]'))
    assert array.startswith("The file is not valid JSON:") and "on line 3" in array


def test_non_utf8_text(tmp_path):
    data, name = upload(tmp_path, "latin.csv", "prompt,response\nCafé?,Oui, à 7h.\n", encoding="cp1252")
    message = refused(data, name)
    assert message.startswith("The file is not UTF-8 text")
    assert "on line 2" in message and "Save it as UTF-8" in message
    # UTF-16 with a byte-order mark (Excel's "Unicode text") is unambiguous and read
    data, name = upload(tmp_path, "u16.csv", "prompt,response\nCafé?,Oui\n", encoding="utf-16")
    assert load_examples(data, name).examples[0].prompt == "Café?"


def test_files_of_the_wrong_kind(tmp_path):
    pdf = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"
    assert refused(pdf, "train.jsonl").startswith("This file is a PDF, not training data. Upload a JSONL")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    assert refused(png, "train.csv").startswith("This file is a PNG image, not training data.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("notes.txt", "prompt,response\nhi,hello\n")
    assert refused(buffer.getvalue(), "train.xlsx").startswith("This file is a ZIP archive, not training data.")
    assert refused(*upload(tmp_path, "page.csv", "<!DOCTYPE html><html><body>hi</body></html>")).startswith(
        "This file is HTML, not training data.")
    assert refused(*upload(tmp_path, "notes.md", "# Notes\n\nJust prose.\n")).startswith(
        "This file (.md) is not training data.")
    message = refused(*upload(tmp_path, "odd.jsonl", jsonl({"title": "x", "body": "y"})))
    assert message == formats.NOT_A_FORMAT + " The fields found are 'title', 'body'."
    assert refused(*upload(tmp_path, "nums.json", "[1, 2, 3]")) == formats.NOT_A_FORMAT


def test_file_over_the_size_cap():
    data = b"a" * (formats.MAX_BYTES + 1)
    assert refused(data, "big.jsonl") == ("The file is 50.0 MB; training data can be at most 50 MB. "
                                          "Split it or remove examples and upload it again.")


def test_records_missing_required_fields(tmp_path):
    ok = {"instruction": "Q", "output": "A"}
    text = jsonl(ok, {"instruction": "Q"}, ok, {"instruction": "Q", "response": "A"}, [1, 2])
    assert refused(*upload(tmp_path, "a.jsonl", text)) == (
        'Lines 2 and 4 have no "output" field. Line 5 is not a JSON object. Fix them and upload the file again.')

    text = jsonl(chat("Q", "A"), {"messages": []}, {"messages": [{"role": "user", "content": "Q"}]},
                 {"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "A"}]},
                 {"messages": [{"role": "user"}]})
    assert refused(*upload(tmp_path, "c.jsonl", text)) == (
        'Line 2 has no "messages" list. Line 3 has no assistant message (the answer to learn). '
        "Line 4 uses the role 'tool' (only system, user and assistant can be used). "
        'Line 5 has a message without "role" and "content". Fix them and upload the file again.')

    text = json.dumps([{"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
                       {"conversations": [{"from": "human", "value": "Q"}, {"value": "A"}]}])
    assert refused(*upload(tmp_path, "s.json", text)) == (
        "Item 1 has the speaker 'bot' (use human, gpt or system). "
        'Item 2 has a turn without "from" and "value". Fix them and upload the file again.')


def test_ragged_csv_names_the_line(tmp_path):
    message = refused(*upload(tmp_path, "r.csv", "prompt,response\nHi,Hello\nOne,two,three\n"))
    assert message.startswith("Line 3 of the CSV file has 3 cells but the header has 2;")


# --- validation ------------------------------------------------------------------------

def numbered_examples(n: int, words_each: int = 3) -> list[Example]:
    return [Example.single(f"Question {i}?", " ".join(["word"] * words_each) + f" {i}", line=i + 1)
            for i in range(n)]


def test_report_counts_truncation_duplicates_and_empty_rows():
    examples = numbered_examples(12)
    examples[3] = Example.single("Long question here?", "a b c d e f g", line=4)  # 3 + 7 = 10 words
    examples[8] = Example.single("Also long?", "one two three four five", line=9)  # 2 + 5 = 7 words
    examples.append(Example(examples[0].messages, line=99))  # duplicate of line 1
    examples.append(Example.single("No answer?", "", line=100))
    report = validate(examples, words, max_length=6, eval_share=0.25, seed=0)
    assert (report.total, report.usable, report.duplicates, report.empty) == (14, 12, 1, 1)
    assert report.truncated == 2
    assert (report.tokens_min, report.tokens_median, report.tokens_max) == (6, 6, 10)
    assert report.warnings == [
        "1 example has an empty prompt or response and will be skipped (line 100).",
        "1 duplicate example will be left out (line 99).",
        "2 examples are longer than the maximum length (6 tokens) and will be cut.",
    ]
    assert report.ok and report.errors == []
    assert (report.train, report.eval) == (9, 3)
    train, held = report.split()
    assert len(train) == 9 and len(held) == 3
    lines = sorted(ex.line for ex in train + held)
    assert lines == list(range(1, 13))  # the first of the duplicates is kept, the empty one dropped
    assert json.loads(json.dumps(report.to_dict()))["truncated"] == 2


def test_split_is_seeded_and_sized():
    examples = numbered_examples(50)
    a, b = validate(examples, words, max_length=100, eval_share=0.2), validate(examples, words, max_length=100,
                                                                               eval_share=0.2)
    assert (a.train, a.eval) == (40, 10)
    assert a.split() == b.split()
    other = validate(examples, words, max_length=100, eval_share=0.2, seed=1)
    assert {ex.line for ex in other.split()[1]} != {ex.line for ex in a.split()[1]}
    train, held = a.split()
    assert [ex.line for ex in train] == sorted(ex.line for ex in train)  # original order kept
    assert not {ex.line for ex in train} & {ex.line for ex in held}

    two = validate(numbered_examples(2), words, max_length=100, eval_share=0.1)
    assert (two.train, two.eval) == (1, 1)
    assert validate(numbered_examples(5), words, max_length=100, eval_share=0.0).eval == 0
    assert validate(numbered_examples(1), words, max_length=100, eval_share=0.5).eval == 0
    with pytest.raises(InvalidInput, match="evaluation"):
        validate(examples, words, max_length=100, eval_share=1.0)


def test_few_and_no_usable_examples():
    report = validate(numbered_examples(4), words, max_length=100, eval_share=0.25)
    assert "Only 4 examples: fine-tuning works best with at least 10, ideally 50+." in report.warnings
    assert not any(w.startswith("Only") for w in validate(numbered_examples(10), words, max_length=100,
                                                          eval_share=0.1).warnings)
    empty = validate([Example.single("Q?", "  ")], words, max_length=100, eval_share=0.1)
    assert not empty.ok and empty.usable == 0
    assert empty.errors == ["There are no usable examples: add at least one example with both a prompt and a response."]
    assert empty.to_dict()["ok"] is False


@pytest.mark.slow
def test_style_set_with_the_real_tokenizer(model_cache):
    """Token lengths as the bundled SmolLM2 sees them (its ChatML template). Prepares
    the bundled model (once per test session) when the cache does not hold it yet."""
    path = model_cache / "smollm2-135m-instruct" / "tokenizer.json"
    if not path.exists():
        from personal_gpt.config import Settings
        from personal_gpt.models.bundled import ensure_bundled_model

        ensure_bundled_model(Settings.from_env())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))

    def chatml(messages: list[dict]) -> int:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return len(tokenizer.encode(text).ids)

    examples = load_examples(STYLE_TRAIN.read_bytes(), STYLE_TRAIN.name).examples
    report = validate(examples, chatml, max_length=2048, eval_share=0.1)
    assert report.ok and report.truncated == 0
    assert report.usable + report.duplicates == 200 and report.eval == round(report.usable * 0.1)
    # the template's special tokens count: more tokens than words in every example
    assert report.tokens_min > min(words(list(ex.messages)) for ex in examples)
    cut = validate(examples, chatml, max_length=int(report.tokens_median), eval_share=0.1)
    assert 0 < cut.truncated < cut.usable
    assert cut.truncated == sum(chatml(list(ex.messages)) > report.tokens_median for ex in cut.split()[0] + cut.split()[1])


# --- the editable table and the stored JSONL ---------------------------------------------

def mixed_examples() -> list[Example]:
    multi = Example(({"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "7 to 5."}), line=2)
    return [Example.single("What is rye?", "A grain.", line=1), multi,
            Example.single("New one?", "Yes.", system="You are Poppy.")]


def test_table_round_trip_is_lossless():
    examples = mixed_examples()
    table = to_table(examples)
    assert list(table.columns) == ["system", "prompt", "response", "context", "line"]
    assert json.loads(table.loc[1, "context"]) == [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello!"}]
    assert from_table(table) == examples


def test_table_edits_change_the_examples():
    table = to_table(mixed_examples())
    table.loc[0, "response"] = "A cereal grass."  # edited cell
    table = table.drop(index=2)  # deleted row
    added = pd.DataFrame([
        {"system": None, "prompt": "Open Sundays?", "response": "No.", "context": None, "line": pd.NA},
        {"system": None, "prompt": None, "response": None, "context": None, "line": pd.NA},  # blank: dropped
        {"system": "", "prompt": "Only a prompt", "response": "", "context": "", "line": pd.NA},
    ])
    edited = pd.concat([table, added], ignore_index=True)
    examples = from_table(edited)
    assert [ex.response for ex in examples] == ["A cereal grass.", "7 to 5.", "No.", ""]
    assert examples[2] == Example.single("Open Sundays?", "No.")
    report = validate(examples, words, max_length=100, eval_share=0.0)
    assert (report.usable, report.empty) == (3, 1)
    assert report.warnings[0] == "1 example has an empty prompt or response and will be skipped."

    broken = to_table(mixed_examples())
    broken.loc[1, "context"] = "[{oops"
    with pytest.raises(InvalidInput, match="The context of line 2 was changed"):
        from_table(broken)


def test_jsonl_written_atomically_and_read_back(tmp_path):
    examples = mixed_examples()
    path = write_jsonl(examples, tmp_path / "dataset" / "train.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left behind
    back = read_jsonl(path)
    assert [ex.messages for ex in back] == [ex.messages for ex in examples]
    assert [ex.line for ex in back] == [1, 2, 3]
    assert load_examples(path.read_bytes(), "train.jsonl").examples == back
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(InvalidInput, match="damaged at line 4"):
        read_jsonl(path)


# --- pairs from knowledge passages -------------------------------------------------------

PASSAGES = [
    {"text": "The return window is the period of 30 days after delivery in which you can send any item back "
             "for a full refund.", "file": "Shop Policies.pdf", "page": 3, "section": None},
    {"text": "Sunny Buns Bakery opens at 7 every weekday morning. Our ovens start at 5, so the first loaves "
             "are out of the oven by 7.", "file": "about.docx", "page": None, "section": "Opening hours"},
    {"text": "Too short to teach anything.", "file": "x.txt", "page": None, "section": None},
    {"text": "12.50 14.00 16.75 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 12 | 13 | 14 | 15 | 16 | 17 | 18 "
             "| 19 | 20 | 21 | 22 | 23 | 24 | 25", "file": "prices.xlsx", "page": 1, "section": None},
    {"text": "Orders placed before noon ship on the same day from our warehouse in Leeds, and all later orders "
             "ship on the following working day.", "file": "faq.md", "page": None, "section": None},
    {"text": "our loaves are baked fresh every morning and sold until they run out, usually by the middle of "
             "the afternoon on busy days.", "file": "notes.pdf", "page": 4, "section": None},
    {"text": "our loaves are baked fresh every morning and sold until they run out, usually by the middle of "
             "the afternoon on busy days.", "file": "notes.txt", "page": None, "section": None},
    {"text": "Sunny Buns Bakery also runs weekend baking classes for children and adults; places are limited "
             "and must be booked a week ahead.", "file": "about.docx", "page": None, "section": "Opening hours"},
]


def test_pairs_from_passages():
    pairs = pairs_from_passages(PASSAGES)
    assert [(ex.line, ex.prompt) for ex in pairs] == [
        (1, "What is the return window?"),
        (2, 'What does "about" say about Opening hours?'),
        (5, 'What does "faq" say about Leeds?'),
        (6, 'Summarise what "notes" says on page 4.'),
        (7, 'What does "notes" say in the part that begins "our loaves are baked fresh every..."?'),
        (8, 'What does "about" say about Sunny Buns Bakery?'),  # the section's question is taken
    ]
    assert pairs[0].response == PASSAGES[0]["text"]
    assert len({ex.prompt for ex in pairs}) == len(pairs)
    assert from_table(to_table(pairs)) == pairs  # reviewed in the same editable table


def test_pairs_clean_cap_sample_and_repeat():
    sentence = "Sourdough starter is a living culture of flour and water that makes bread rise slowly."
    long = {"text": "  " + "\n".join([sentence] * 40) + "\x00", "file": "baking.pdf", "page": 2, "section": None}
    (pair,) = pairs_from_passages([long])
    assert pair.prompt == "What is Sourdough starter?"
    assert len(pair.response) <= 1200
    assert pair.response.endswith("slowly.") and "\x00" not in pair.response and "\n" not in pair.response

    many = [{"text": f"Topic {i} covers the many details that a careful reader needs to know about item "
                     f"number {i} in our catalogue.", "file": "catalogue.pdf", "page": i + 1, "section": None}
            for i in range(30)]
    sample = pairs_from_passages(many, limit=10, seed=3)
    assert len(sample) == 10
    assert sample == pairs_from_passages(many, limit=10, seed=3)
    assert [ex.line for ex in sample] == sorted(ex.line for ex in sample)
    assert sample != pairs_from_passages(many, limit=10, seed=4)
    assert len(pairs_from_passages(many)) == 30
