"""What an uploaded file really is, decided from its bytes and checked against
its extension, and the safe name it is shown under.

``detect`` reads magic bytes, ZIP member names (through the bounded reader in
``archive``) and text heuristics; ``sniff`` also matches the extension and says
in one sentence why a file is refused. Nothing here parses a document or
imports a parser library.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from personal_gpt.knowledge import archive
from personal_gpt.knowledge.types import InvalidUpload

SUPPORTED = ("pdf", "docx", "pptx", "xlsx", "csv", "html", "md", "txt", "eml", "epub", "odt", "rtf", "doc")
ZIP_TYPES = ("docx", "pptx", "xlsx", "epub", "odt")

EXTENSIONS = {
    "pdf": "pdf", "docx": "docx", "pptx": "pptx", "xlsx": "xlsx", "csv": "csv",
    "html": "html", "htm": "html", "xhtml": "html", "md": "md", "markdown": "md",
    "txt": "txt", "text": "txt", "eml": "eml", "epub": "epub", "odt": "odt", "rtf": "rtf", "doc": "doc",
}

EMPTY = "The file is empty."
UNSUPPORTED_LIST = ("PDF, Word (.docx), PowerPoint (.pptx), Excel (.xlsx), CSV, HTML, Markdown, "
                    "text, email (.eml), EPUB, OpenDocument text (.odt) or RTF")
ENCRYPTED_OFFICE = "The file is password-protected; remove the password and upload it again."

# What a content kind is called in a sentence.
DESCRIPTIONS = {
    "pdf": "a PDF", "docx": "a Word document (DOCX)", "pptx": "a PowerPoint presentation (PPTX)",
    "xlsx": "an Excel workbook (XLSX)", "epub": "an EPUB book", "odt": "an OpenDocument text (ODT)",
    "ods": "an OpenDocument spreadsheet", "odp": "an OpenDocument presentation",
    "zip": "a ZIP archive", "ole": "an old-format Office file", "ooxml-encrypted": "a password-protected Office file",
    "html": "HTML", "rtf": "RTF", "eml": "an email", "text": "plain text", "binary": "binary data",
    "png": "a PNG image", "jpeg": "a JPEG image", "gif": "a GIF image", "bmp": "a BMP image",
    "tiff": "a TIFF image", "webp": "a WebP image", "heic": "a HEIC image", "exe": "a Windows program",
    "elf": "a Linux program", "macho": "a macOS program", "gzip": "a gzip archive", "7z": "a 7-Zip archive",
    "rar": "a RAR archive", "bzip2": "a bzip2 archive", "xz": "an xz archive", "sqlite": "an SQLite database",
    "mp3": "an MP3 audio file", "mp4": "a video or audio file (MP4)", "ogg": "an Ogg audio file",
    "wav": "a WAV audio file", "avi": "an AVI video", "flac": "a FLAC audio file", "wasm": "a WebAssembly program",
    "java-class": "a Java program", "ps": "a PostScript file",
}

_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"MZ", "exe"), (b"\x7fELF", "elf"),
    (b"\xcf\xfa\xed\xfe", "macho"), (b"\xce\xfa\xed\xfe", "macho"), (b"\xca\xfe\xba\xbe", "java-class"),
    (b"\x1f\x8b", "gzip"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"), (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"), (b"SQLite format 3\x00", "sqlite"), (b"ID3", "mp3"), (b"OggS", "ogg"),
    (b"fLaC", "flac"), (b"\x00asm", "wasm"), (b"%!PS", "ps"),
]
_TEXTLIKE_MAGIC = (b"BM", b"MZ", b"BZh", b"ID3", b"%!PS")
_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ODF_MIMETYPES = {
    "application/epub+zip": "epub",
    "application/vnd.oasis.opendocument.text": "odt",
    "application/vnd.oasis.opendocument.spreadsheet": "ods",
    "application/vnd.oasis.opendocument.presentation": "odp",
}
_EMAIL_HEADERS = {
    "from", "to", "cc", "subject", "date", "message-id", "mime-version", "received", "return-path",
    "delivered-to", "reply-to", "content-type", "in-reply-to", "references", "sender",
}
_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]?.*$")
_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Detected:
    """The content's kind (a SUPPORTED type or one of DESCRIPTIONS' keys) and its
    container: ``zip`` for ZIP-based files, ``None`` otherwise."""

    kind: str
    container: str | None = None


# --- content ------------------------------------------------------------------

def _zip_kind(path: Path) -> str:
    try:
        entries = archive.list_entries(path, limit=5000)
    except (ValueError, OSError):
        return "zip"  # not readable: the archive check says it is damaged
    names = [e.name for e in entries]
    for entry in entries[:3]:
        if entry.name == "mimetype":
            mime = archive.read_small_member(path, entry).decode("ascii", "replace").strip()
            if mime in _ODF_MIMETYPES:
                return _ODF_MIMETYPES[mime]
    if "[Content_Types].xml" in names or any(n.startswith(("word/", "ppt/", "xl/")) for n in names):
        if any(n.startswith("word/") for n in names):
            return "docx"
        if any(n.startswith("ppt/") for n in names):
            return "pptx"
        if any(n.startswith("xl/") for n in names):
            return "xlsx"
    if "META-INF/container.xml" in names:
        return "epub"
    if "content.xml" in names and "META-INF/manifest.xml" in names:
        return "odt"
    return "zip"


def _decode_text(head: bytes) -> str | None:
    """The head as text, or None when it looks binary."""
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            return head[len(bom):].decode(enc, "replace")
    if b"\x00" in head:
        return None
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    if controls > max(8, len(head) // 100):
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 4:  # a character cut by the head's end
            return head[:exc.start].decode("utf-8", "replace")
        return head.decode("cp1252", "replace")  # legacy 8-bit text


def _text_kind(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("{\\rtf"):
        return "rtf"
    probe = stripped[:4096].lower()
    while probe.startswith(("<?xml", "<!--")):  # skip an XML declaration and comments
        end = probe.find("?>" if probe.startswith("<?") else "-->")
        if end < 0:
            break
        probe = probe[end + (2 if probe.startswith("<?") else 3):].lstrip()
    if probe.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "html"
    if _looks_like_email(text):
        return "eml"
    return "text"


def _looks_like_email(text: str) -> bool:
    lines = text.splitlines()[:60]
    if not lines or not _HEADER_LINE.match(lines[0]):
        return False
    known: set[str] = set()
    for line in lines:
        if not line.strip():
            break
        if line[:1] in " \t":  # a folded header continues
            continue
        m = _HEADER_LINE.match(line)
        if not m:
            return False
        if m.group(1).lower() in _EMAIL_HEADERS:
            known.add(m.group(1).lower())
    return len(known) >= 2 and bool(known & {"from", "to", "subject", "date", "message-id", "received"})


def detect(path: Path) -> Detected:
    """What the bytes are, whatever the name says. Raises InvalidUpload only for
    an empty file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if not head:
        raise InvalidUpload(EMPTY)
    pdf_at = head.find(b"%PDF-", 0, 1024)  # readers accept a little junk before the header
    if pdf_at == 0 or (pdf_at > 0 and _decode_text(head) is None):
        return Detected("pdf")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return Detected(_zip_kind(path), "zip")
    if head.startswith(_OLE):
        # Password-protected DOCX/XLSX/PPTX are OLE files with an EncryptedPackage stream.
        if "EncryptedPackage".encode("utf-16-le") in head:
            return Detected("ooxml-encrypted")
        return Detected("ole")
    if head.startswith(b"RIFF") and len(head) >= 12:
        return Detected({b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}.get(head[8:12], "binary"))
    if head[4:8] == b"ftyp":
        return Detected("heic" if head[8:12] in (b"heic", b"heix", b"mif1") else "mp4")
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if magic in _TEXTLIKE_MAGIC and _decode_text(head) is not None:
                break  # plain text that happens to start with "MZ", "BM", ...
            return Detected(kind)
    text = _decode_text(head)
    if text is None:
        return Detected("binary")
    if not text.strip():
        raise InvalidUpload(EMPTY)
    return Detected(_text_kind(text))


# --- content against the name -------------------------------------------------

def extension(filename: str) -> str:
    name = re.split(r"[\\/]", filename or "")[-1]
    suffix = PurePosixPath(name).suffix
    return suffix[1:].lower() if suffix else ""


def unsupported(ext: str, detected: Detected | None = None) -> str:
    what = f" (.{ext})" if ext else (f" ({DESCRIPTIONS.get(detected.kind, detected.kind)})" if detected else "")
    return f"This file type{what} is not supported; upload {UNSUPPORTED_LIST}."


def mismatch(ext: str, detected: Detected) -> str:
    what = DESCRIPTIONS.get(detected.kind, detected.kind)
    return (f"This file says .{ext} but contains {what}; "
            "rename it with the right extension or upload the original file.")


def match(detected: Detected, filename: str) -> str:
    """The canonical type when the content fits the name; else InvalidUpload."""
    ext = extension(filename)
    claimed = EXTENSIONS.get(ext)
    kind = detected.kind
    if ext and claimed is None:
        raise InvalidUpload(unsupported(ext))
    if kind == "ooxml-encrypted" and claimed in ("docx", "pptx", "xlsx", None):
        raise InvalidUpload(ENCRYPTED_OFFICE)
    if not ext:  # no extension: go by the content alone
        if kind in SUPPORTED:
            return kind
        if kind in ("ole", "text"):
            return "doc" if kind == "ole" else "txt"
        raise InvalidUpload(unsupported("", detected))
    if kind in ("pdf", *ZIP_TYPES):
        if claimed == kind:
            return kind
        raise InvalidUpload(mismatch(ext, detected))
    if kind == "ole":
        if claimed == "doc":
            return "doc"
        raise InvalidUpload(mismatch(ext, detected))
    if kind in ("text", "html", "rtf", "eml"):
        allowed = {
            "txt": {"text", "eml"}, "md": {"text", "eml"}, "csv": {"text"},
            "html": {"html", "text"}, "rtf": {"rtf"}, "eml": {"eml"},
        }.get(claimed, set())
        if kind in allowed:
            return claimed
        raise InvalidUpload(mismatch(ext, detected))
    raise InvalidUpload(mismatch(ext, detected))  # images, programs, other archives, binary data


def sniff(path: Path, filename: str) -> str:
    """The canonical type of an upload (one of SUPPORTED), decided from its content
    and checked against the extension of ``filename``. Raises InvalidUpload with
    one sentence for an empty file, an unsupported type or a content/extension
    mismatch. ZIP-based files are not unpacked here: run ``archive.check_archive``
    before handing them to a parser."""
    return match(detect(path), filename)


# --- display names ------------------------------------------------------------

_BIDI = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"))
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
MAX_NAME_BYTES = 200


def safe_display_name(filename: str) -> str:
    """A name safe to show and to offer in a download: the last path part only,
    without control or bidi-override characters, NFC-normalised, Windows-reserved
    names prefixed with ``_``, at most 200 UTF-8 bytes (keeping the extension);
    ``file`` when nothing is left. Never used as a path: blobs have generated names."""
    name = unicodedata.normalize("NFC", str(filename or ""))
    name = "".join(c for c in name if unicodedata.category(c) != "Cc").translate(_BIDI)
    name = re.split(r"[\\/]", name)[-1]
    name = _WINDOWS_FORBIDDEN.sub("_", name).strip().rstrip(". ")
    if not name.strip("."):
        return "file"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16 or not ext.isalnum():
        stem, ext = name, ""
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    suffix = f".{ext}" if ext else ""
    budget = MAX_NAME_BYTES - len(suffix.encode())
    if len(stem.encode()) > budget:
        stem = stem.encode()[:budget].decode("utf-8", "ignore")
    stem = stem.rstrip(". ") or "file"
    return unicodedata.normalize("NFC", stem + suffix)
