"""CSV export is neutralised against spreadsheet formula injection and keeps numbers as numbers."""

from __future__ import annotations

import csv
import io

import pandas as pd
import pytest

from personal_gpt.csv_safe import neutralise, to_csv_bytes

HOSTILE = [
    '=HYPERLINK("http://x","y")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1)",
    "\t=1+1",
    "\r=1+1",
    "-5",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_get_a_leading_quote(text):
    assert neutralise(text) == "'" + text


@pytest.mark.parametrize("value", ["hello", "", "a=b", " =1", "'already", "é = ok", "5"])
def test_harmless_strings_unchanged(value):
    assert neutralise(value) == value


@pytest.mark.parametrize("value", [-5, -2.5, 0, None, True, 3])
def test_non_strings_unchanged(value):
    assert neutralise(value) is value


def _read(data: bytes) -> list[list[str]]:
    assert data.startswith(b"\xef\xbb\xbf"), "UTF-8 BOM so Excel reads accents"
    return list(csv.reader(io.StringIO(data[3:].decode("utf-8"), newline="")))


def test_to_csv_bytes_neutralises_every_text_cell_and_header():
    df = pd.DataFrame(
        {
            "=cmd": HOSTILE,
            "number": [-5, -1, 0, 1, 2, 3, 4],
            "note": ["café, \"quoted\"\nline 2", "ok", None, "@x", "-", "+", "="],
        }
    )
    rows = _read(to_csv_bytes(df))
    assert rows[0] == ["'=cmd", "number", "note"]
    assert [r[0] for r in rows[1:]] == ["'" + t for t in HOSTILE]
    # numeric -5 stays a number (no quote added); the typed string "-5" is text and is neutralised
    assert [r[1] for r in rows[1:]] == ["-5", "-1", "0", "1", "2", "3", "4"]
    assert rows[7][0] == "'-5"
    # commas, quotes and newlines stay inside one cell; accents survive
    assert rows[1][2] == 'café, "quoted"\nline 2'
    assert [r[2] for r in rows[3:]] == ["", "'@x", "'-", "'+", "'="]
    # no cell anywhere starts with a formula character
    for row in rows:
        for cell in row:
            if cell and not cell.lstrip("-").replace(".", "", 1).isdigit():
                assert cell[0] not in "=+-@\t\r", cell


def test_numbers_are_written_unquoted():
    data = to_csv_bytes(pd.DataFrame({"n": [-5], "t": ["-5"]}))
    body = data[3:].decode("utf-8").splitlines()
    assert body[1] == "-5,\"'-5\""


def test_empty_frame_keeps_header():
    rows = _read(to_csv_bytes(pd.DataFrame(columns=["when", "+total"])))
    assert rows == [["when", "'+total"]]
