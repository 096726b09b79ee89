"""One knowledge file through the pipeline: parse -> chunk -> embed -> rows ready
for the ``chunks`` table. No database, no Streamlit: the job runner saves the
rows and the file's status in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from personal_gpt.knowledge.types import InvalidUpload

CHUNK_TOKENS = 170  # + a section title prepended for embedding stays inside MiniLM's 256 word pieces
CHUNK_OVERLAP = 30


@dataclass
class IngestResult:
    filetype: str
    pages: int | None
    rows: list[dict]


def embed_text(text: str, section: str | None) -> str:
    """What the embedder sees: the section title helps short passages match questions."""
    if section and section not in text:
        return f"{section}\n{text}"
    return text


def parse_upload(path: Path, display_name: str, *, max_bytes: int | None = None, session=None):
    """The parse step alone (a ParsedDocument): in ``session`` (a
    ``parse.ParseSession``, whose worker stays up between files) when given,
    else in a one-file worker. Safe to run in another thread than the embedding."""
    from personal_gpt.knowledge.parse import parse_file

    kwargs = {"max_bytes": max_bytes} if max_bytes else {}
    if session is not None:
        return session.parse(path, display_name, **kwargs)
    return parse_file(path, display_name, **kwargs)


def index_document(doc, embedder, stage: Callable[[str], None] = lambda s: None) -> IngestResult:
    """Chunk and embed a parsed document (the steps after parsing)."""
    from personal_gpt.knowledge.chunk import chunk_elements
    from personal_gpt.knowledge.index import serialize_vector

    chunks = chunk_elements(doc.elements, max_tokens=CHUNK_TOKENS, overlap_tokens=CHUNK_OVERLAP,
                            count_tokens=embedder.count_tokens)
    if not chunks:
        raise InvalidUpload("No text found: the file may be a scanned image; OCR is not supported yet.")
    stage("embedding")
    vectors = embedder.encode([embed_text(c.text, c.section) for c in chunks])
    rows = [
        {"ordinal": c.ordinal, "text": c.text, "page": c.page, "section": (c.section or None) and c.section[:300],
         "embedding": serialize_vector(v)}
        for c, v in zip(chunks, vectors)
    ]
    return IngestResult(doc.filetype, doc.pages, rows)


def ingest_file(path: Path, display_name: str, embedder, stage: Callable[[str], None] = lambda s: None,
                max_bytes: int | None = None, session=None) -> IngestResult:
    """parse -> chunk -> embed. Pass a ``parse.ParseSession`` as ``session`` to
    reuse its worker across files (one per job); without one each call starts
    and ends its own worker."""
    stage("parsing")
    doc = parse_upload(path, display_name, max_bytes=max_bytes, session=session)
    return index_document(doc, embedder, stage)
