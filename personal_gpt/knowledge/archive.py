"""Bounded reading of the ZIP containers behind DOCX, PPTX, XLSX, EPUB and ODT.

Counts the central directory's entries without building objects for them,
inflates every member with a hard cap on the bytes it *actually* produces
(declared sizes lie: SECURITY cases 4-6) and refuses XML that declares a
document type or entities (XXE and billion laughs: case 10). It never writes
anything to disk and never trusts a size field it has not measured.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from personal_gpt.knowledge.types import InvalidUpload

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_EOCD_MAX_COMMENT = 0xFFFF

_IN_CHUNK = 64 * 1024  # compressed bytes read at a time
_OUT_CHUNK = 256 * 1024  # most bytes one inflate step may produce

BOMB = "The file is too large when unpacked (a possible zip bomb)."
UNSAFE_XML = ("The file contains unsafe XML (document type or entity declarations); "
              "save it again from its original program and upload the new copy.")
PASSWORD = "The file is password-protected; remove the password and upload it again."


def too_many_parts(count: int) -> str:
    return f"The file has too many parts ({count:,})."


def damaged(label: str) -> str:
    return f"The file is damaged (not a valid {label} file)."


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps for one archive. The ratio cap applies to a member once it has
    produced more than ``ratio_min_bytes`` (small members may compress very well)."""

    max_total_bytes: int = 200 * 2**20
    max_entries: int = 10_000
    max_ratio: int = 200
    ratio_min_bytes: int = 16 * 2**20


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class CentralEntry:
    """One central-directory record, as declared (not to be trusted for sizes)."""

    name: str
    method: int
    flags: int
    compressed_size: int
    size: int
    header_offset: int


@dataclass(frozen=True)
class ArchiveSummary:
    entries: int
    unpacked_bytes: int


# --- the central directory, read without trusting it ------------------------

def _central_directory(mm: mmap.mmap) -> tuple[int, int]:
    """(start, size) of the central directory, corrected for data prepended to
    the archive the way zipfile does it. Raises ValueError when there is none."""
    tail_start = max(0, len(mm) - (22 + _EOCD_MAX_COMMENT))
    pos = mm.rfind(_EOCD, tail_start)
    if pos < 0 or pos + 22 > len(mm):
        raise ValueError("no end-of-central-directory record")
    _sig, _disk, _cd_disk, _n_disk, _n_total, cd_size, cd_offset, _comment = struct.unpack_from(
        "<4sHHHHIIH", mm, pos)
    end = pos
    loc = pos - 20
    if loc >= 0 and mm[loc:loc + 4] == _EOCD64_LOCATOR:
        (_sig, _disk, eocd64_offset, _disks) = struct.unpack_from("<4sIQI", mm, loc)
        rec = loc - 56  # where the zip64 record sits when nothing is prepended
        if rec < 0 or mm[rec:rec + 4] != _EOCD64:
            rec = eocd64_offset
        if rec < 0 or rec + 56 > len(mm) or mm[rec:rec + 4] != _EOCD64:
            raise ValueError("bad zip64 end-of-central-directory record")
        cd_size, cd_offset = struct.unpack_from("<QQ", mm, rec + 40)
        end = rec
    start = end - cd_size
    if start < 0 or cd_size > len(mm):
        raise ValueError("central directory out of range")
    return start, cd_size


def _decode_name(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8", "replace") if flags & 0x800 else raw.decode("cp437")


def _walk(mm: mmap.mmap, with_entries: bool) -> Iterator[CentralEntry | None]:
    start, size = _central_directory(mm)
    pos, end = start, start + size
    while pos < end:
        if pos + 46 > len(mm) or mm[pos:pos + 4] != _CENTRAL:
            raise ValueError("bad central directory record")
        (flags, method, csize, usize, n_name, n_extra, n_comment, offset) = struct.unpack_from(
            "<8xHH8xIIHHH8xI", mm, pos)
        if with_entries:
            name = _decode_name(mm[pos + 46:pos + 46 + n_name], flags)
            extra = mm[pos + 46 + n_name:pos + 46 + n_name + n_extra]
            usize, csize, offset = _zip64_values(extra, usize, csize, offset)
            yield CentralEntry(name, method, flags, csize, usize, offset)
        else:
            yield None
        pos += 46 + n_name + n_extra + n_comment


def _zip64_values(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        if tag == 0x0001:
            data, j = extra[i + 4:i + 4 + length], 0
            values = []
            for current in (usize, csize, offset):
                if current == 0xFFFFFFFF and j + 8 <= len(data):
                    values.append(struct.unpack_from("<Q", data, j)[0])
                    j += 8
                else:
                    values.append(current)
            return values[0], values[1], values[2]
        i += 4 + length
    return usize, csize, offset


def _open_map(path: Path):
    f = open(path, "rb")
    try:
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError):  # empty file
        f.close()
        raise


def count_entries(path: Path) -> int:
    """How many central-directory records the archive has (ValueError if none)."""
    f, mm = _open_map(path)
    with f, mm:
        return sum(1 for _ in _walk(mm, with_entries=False))


def list_entries(path: Path, limit: int = 5000) -> list[CentralEntry]:
    """The first ``limit`` central-directory records (ValueError if unreadable)."""
    out: list[CentralEntry] = []
    f, mm = _open_map(path)
    with f, mm:
        for entry in _walk(mm, with_entries=True):
            out.append(entry)
            if len(out) >= limit:
                break
    return out


def read_small_member(path: Path, entry: CentralEntry, limit: int = 256) -> bytes:
    """At most ``limit`` bytes of one member (for sniffing ``mimetype``)."""
    with open(path, "rb") as f:
        f.seek(entry.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != _LOCAL:
            return b""
        n_name, n_extra = struct.unpack_from("<HH", header, 26)
        f.seek(entry.header_offset + 30 + n_name + n_extra)
        raw = f.read(min(entry.compressed_size, 64 * 1024))
    if entry.method == zipfile.ZIP_STORED:
        return raw[:limit]
    if entry.method == zipfile.ZIP_DEFLATED:
        try:
            return zlib.decompressobj(-15).decompress(raw, limit)
        except zlib.error:
            return b""
    return b""


# --- the bounded inflate -------------------------------------------------------

_MARKERS = ("<!DOCTYPE", "<!ENTITY")
_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
_XML_STARTS = tuple(
    prefix
    for enc in _ENCODINGS
    for prefix in ("<".encode(enc),)
) + (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_EBCDIC_XML = b"\x4c\x6f\xa7\x94"  # "<?xm" in EBCDIC
_NOT_PARSED = (".svg", ".svgz")  # images: never handed to an XML parser by our readers


class _XmlScanner:
    """Looks for DOCTYPE/ENTITY declarations in a stream of XML bytes, in any of
    the encodings an XML parser would accept, across chunk boundaries."""

    def __init__(self, forbid_doctype: bool):
        words = _MARKERS if forbid_doctype else ("<!ENTITY",)
        self.patterns = [w.encode(enc) for w in words for enc in _ENCODINGS]
        self.keep = max(len(p) for p in self.patterns)
        self.tail = b""
        self.decided: bool | None = None  # is this member XML at all?

    def feed(self, data: bytes) -> bool:
        """True when a forbidden declaration is seen."""
        if self.decided is None:
            head = (self.tail + data).lstrip(b" \t\r\n")
            if not head and len(self.tail) + len(data) < 4096:
                self.tail += data
                return False
            if head.startswith(_EBCDIC_XML):
                return True  # an encoding no office tool writes: refuse rather than guess
            self.decided = head.startswith(_XML_STARTS)
        if not self.decided:
            return False
        window = self.tail + data
        if any(p in window for p in self.patterns):
            return True
        self.tail = window[-self.keep:]
        return False


def _inflate_member(f, info: zipfile.ZipInfo, label: str, limits: ArchiveLimits, budget: int,
                    scanner: _XmlScanner | None, sink=None) -> int:
    """Bytes the member really unpacks to; raises InvalidUpload on a cap, bad
    data or forbidden XML. ``budget`` is what the whole archive has left.
    ``sink(chunk)``, when given, receives the unpacked bytes as they are checked."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != _LOCAL:
        raise InvalidUpload(damaged(label))
    n_name, n_extra = struct.unpack_from("<HH", header, 26)
    f.seek(info.header_offset + 30 + n_name + n_extra)

    produced, crc = 0, 0

    def take(out: bytes) -> None:
        nonlocal produced, crc
        produced += len(out)
        if produced > budget:
            raise InvalidUpload(BOMB)
        if produced > limits.ratio_min_bytes and produced > limits.max_ratio * max(info.compress_size, 1):
            raise InvalidUpload(BOMB)
        crc = zlib.crc32(out, crc)
        if scanner is not None and scanner.feed(out):
            raise InvalidUpload(UNSAFE_XML)
        if sink is not None and out:
            sink(out)

    if info.compress_type == zipfile.ZIP_STORED:
        left = info.compress_size
        while left > 0:
            chunk = f.read(min(_IN_CHUNK, left))
            if not chunk:
                raise InvalidUpload(damaged(label))
            left -= len(chunk)
            take(chunk)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            while not inflater.eof:
                chunk = f.read(_IN_CHUNK)  # read on past the declared size: it may lie
                if not chunk:
                    raise InvalidUpload(damaged(label))  # the stream never ended
                while chunk and not inflater.eof:
                    take(inflater.decompress(chunk, _OUT_CHUNK))
                    chunk = inflater.unconsumed_tail
        except zlib.error:
            raise InvalidUpload(damaged(label)) from None
    else:  # Office, LibreOffice and EPUB tools only ever store or deflate
        raise InvalidUpload(damaged(label))

    if produced != info.file_size or (crc & 0xFFFFFFFF) != info.CRC:
        raise InvalidUpload(damaged(label))
    return produced


def inflate_member(f, info: zipfile.ZipInfo, label: str, limits: ArchiveLimits, budget: int, sink) -> int:
    """The bounded inflate for other readers (GPT bundles): ``sink(chunk)`` gets the
    bytes as they are produced, counted and capped; the CRC and the measured size
    are checked at the end. InvalidUpload on any cap or damage."""
    return _inflate_member(f, info, label, limits, budget, None, sink)


def check_archive(path: Path, label: str = "ZIP", *, forbid_doctype: bool = True,
                  limits: ArchiveLimits = DEFAULT_LIMITS) -> ArchiveSummary:
    """Refuse an archive that is damaged, has too many parts, unpacks beyond the
    caps, or carries XML with DTD/entity declarations. ``label`` names the format
    in the damaged-file sentence (``DOCX``); EPUB passes ``forbid_doctype=False``
    because XHTML legitimately starts with ``<!DOCTYPE html>`` (entities stay
    forbidden). Runs in bounded memory: one input and one output chunk at a time."""
    path = Path(path)
    try:
        entries = count_entries(path)
    except (ValueError, OSError, struct.error):
        raise InvalidUpload(damaged(label)) from None
    if entries > limits.max_entries:
        raise InvalidUpload(too_many_parts(entries))
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        raise InvalidUpload(damaged(label)) from None
    if len(infos) > limits.max_entries:  # zipfile saw more than our walk: refuse anyway
        raise InvalidUpload(too_many_parts(len(infos)))

    total = 0
    with open(path, "rb") as f:
        for info in infos:
            if info.flag_bits & 0x1:
                raise InvalidUpload(PASSWORD)
            if info.is_dir():
                continue
            lower = info.filename.lower()
            scanner = None if lower.endswith(_NOT_PARSED) else _XmlScanner(forbid_doctype)
            total += _inflate_member(f, info, label, limits, limits.max_total_bytes - total, scanner)
    return ArchiveSummary(entries=entries, unpacked_bytes=total)
