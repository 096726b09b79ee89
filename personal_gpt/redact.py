"""Hiding e-mail addresses and phone numbers in text that is about to be stored.

``redact(text)`` replaces e-mail addresses with ``[email]`` and phone numbers with
``[phone]``; dates, times, prices, years, IP addresses, version numbers and short
order numbers stay. Pure text in, text out: it decides nothing about when to redact.

Why a regular expression and not the ``phonenumbers`` package: that library needs a
home region for national numbers and, in its lenient mode, takes dates, years, prices
and order numbers for phone numbers (or, in its strict mode, drops fictional 555
numbers and many real UK mobiles); it is also ~48 MB installed. See docs/privacy.md.
"""

from __future__ import annotations

import re

EMAIL_MARK = "[email]"
PHONE_MARK = "[phone]"

_EMAIL = re.compile(
    r"(?<![\w.%+-])"  # not the middle of a longer token
    r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}"
    r"(?![\w-])"
)

# Spans that look numeric but are not phone numbers; they are masked before the phone search.
_NOT_PHONES = [
    re.compile(r"(?<![\d.\-/])\d{4}([-/.])\d{1,2}\1\d{1,2}(?!\d|[.\-/]\d)"),  # 2026-11-26, 2026.11.26
    re.compile(r"(?<![\d.\-/])\d{1,2}([-/.])\d{1,2}\1(?:\d{4}|\d{2})(?!\d|[.\-/]\d)"),  # 26.11.2026, 11-26-26
    re.compile(r"(?<![\d:])\d{1,2}:\d{2}(?::\d{2})?(?![\d:])"),  # 10:30, 10:30:15
    re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])"),  # 192.168.1.10
    re.compile(r"(?<!\d)(?:19|20)\d{2}\s?[-–]\s?(?:19|20)?\d{2}(?!\d)"),  # 1999-2005, 2024–25
    re.compile(r"[$€£¥]\s?\d[\d,. \u00a0]*"),  # $1,234.56, € 1 234
    re.compile(r"\d[\d,. \u00a0]*?\s?(?:€|(?:EUR|USD|GBP|dollars?|euros?|pounds?)\b)", re.IGNORECASE),  # 1 234 €
]

_SEP = r"[ \u00a0.\-]"
_PHONE = re.compile(
    r"(?<![\w.+\-/])"  # not glued to a word, a version, an id or a path
    r"(?:\+\s?\d{1,3}" + _SEP + r"?)?"  # +44
    r"(?:\(\s?\d{1,5}\s?\)" + _SEP + r"?)?"  # (555) or (0)
    r"\d{1,15}(?:" + _SEP + r"\d{1,6}){0,6}"  # 20 7946 0958 / 555-123-4567 / 07700 900123 / 5551234567
    r"(?!\w|[.\-/]\d)"
)
_YEAR = re.compile(r"(?:19|20)\d{2}")


def _looks_like_phone(candidate: str) -> bool:
    digits = sum(ch.isdigit() for ch in candidate)
    if not 7 <= digits <= 15:  # E.164 allows at most 15 digits; fewer than 7 is a code or a count
        return False
    if candidate.startswith("+") or "(" in candidate:
        return digits >= 8 or "(" in candidate
    groups = re.findall(r"\d+", candidate)
    if len(groups) == 1:  # an unbroken run: only as long as a full number with its area code
        return digits >= 10
    if all(_YEAR.fullmatch(g) for g in groups):  # "2024 2025 2026"
        return False
    # "10 20 30 40" is a list of numbers; "01 23 45 67 89" (a national number in pairs) is a phone
    return max(len(g) for g in groups) >= 3 or (candidate.startswith("0") and digits >= 9)


def _mask(text: str) -> str:
    """``text`` with the not-a-phone spans overwritten by letters (same length, so
    positions still match) so the phone search neither matches nor touches them."""
    chars = list(text)
    for pattern in _NOT_PHONES:
        for m in pattern.finditer(text):
            chars[m.start():m.end()] = "x" * (m.end() - m.start())
    return "".join(chars)


def redact_emails(text: str) -> str:
    return _EMAIL.sub(EMAIL_MARK, text)


def redact_phones(text: str) -> str:
    masked = _mask(text)
    out, last = [], 0
    for m in _PHONE.finditer(masked):
        if _looks_like_phone(m.group()):
            out.append(text[last:m.start()])
            out.append(PHONE_MARK)
            last = m.end()
    out.append(text[last:])
    return "".join(out)


def redact(text: str) -> str:
    """E-mail addresses -> ``[email]``, phone numbers -> ``[phone]``; everything else as it was."""
    if not text:
        return text or ""
    return redact_phones(redact_emails(text))
