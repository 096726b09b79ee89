"""Plain data shared by the knowledge stages: what a parser yields and what a
chunk carries. No behaviour, no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field

from personal_gpt.errors import InvalidInput


class InvalidUpload(InvalidInput):
    """A knowledge file that cannot be used; the message says why in one sentence."""

    code = "invalid_upload"


class QuotaExceeded(InvalidInput):
    status = 413
    code = "quota_exceeded"


@dataclass
class Element:
    """One piece of a parsed document, in reading order."""

    text: str
    kind: str  # unstructured's category: Title, NarrativeText, ListItem, Table, ...
    page: int | None = None  # 1-based page (PDF, PPTX slide, XLSX sheet index) when the format has pages
    section: str | None = None  # the nearest title above this element, when known


@dataclass
class ParsedDocument:
    elements: list[Element]
    filetype: str  # canonical type: pdf, docx, pptx, xlsx, csv, html, md, txt, eml, epub, odt, rtf, doc
    pages: int | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    """A passage ready to embed: text plus where it came from."""

    text: str
    ordinal: int  # position within the file
    page: int | None = None
    section: str | None = None
