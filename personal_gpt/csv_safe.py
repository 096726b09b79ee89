"""CSV export that spreadsheets cannot turn into formulas (CWE-1236, "CSV injection").

Owns ``neutralise`` (one cell) and ``to_csv_bytes`` (a whole DataFrame as UTF-8
with BOM). It must not read the database or import streamlit; callers pass
plain values or a DataFrame and get plain values or bytes back.

Rule (OWASP "CSV Injection" and ASVS 5.0 requirement 1.2.10): a *text* cell whose
first character is ``=``, ``+``, ``-``, ``@``, tab, carriage return or NUL gets a
leading single quote, which Excel, LibreOffice Calc and Google Sheets read as
"this is text". Every text field is also wrapped in double quotes with embedded
quotes doubled (RFC 4180), so a comma or newline inside a message stays in one
cell. Numbers stay numbers: a numeric ``-5`` is written as ``-5``; the *string*
``"-5"`` (for example a message someone typed) is text and becomes ``'-5``,
because we cannot tell a typed "-5" from the start of a formula like ``-2+3``.
"""

from __future__ import annotations

import csv
from typing import Any

# Characters that make a spreadsheet treat a cell as a formula when they come first.
DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r", "\0")


def neutralise(value: Any) -> Any:
    """Return ``value`` with a leading ``'`` when it is a string a spreadsheet would run.

    Non-strings (numbers, dates, None, booleans) are returned unchanged.
    """
    if isinstance(value, str) and value and value[0] in DANGEROUS_FIRST:
        return "'" + value
    return value


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def safe_frame(df):
    """A copy of ``df`` with every string cell and every column name neutralised."""
    out = df.copy()
    for col in out.columns:
        if _is_numeric(out[col]) or str(out[col].dtype).startswith("datetime"):
            continue
        out[col] = out[col].astype(object).map(neutralise)
    out.columns = [neutralise(str(c)) for c in out.columns]
    return out


def to_csv_bytes(df) -> bytes:
    """``df`` as CSV bytes: UTF-8 with BOM (so Excel reads accents), text quoted and neutralised.

    The index is not written; pass a frame whose columns are what the reader should see.
    """
    safe = safe_frame(df)
    text = safe.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    return text.encode("utf-8-sig")
