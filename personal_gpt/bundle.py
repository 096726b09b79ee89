"""The GPT bundle file format (`.zip`): writing one atomically and opening one safely.

Owns the layout (``manifest.json`` first, then ``gpt.json``, ``knowledge/``, ``finetune/``,
``adapters/``, ``settings.json``…), the manifest's per-member size and SHA-256, and every
refusal of a bad file (not a zip, damaged, newer format, missing/extra/altered parts, unsafe
names, symlinks, zip bombs) before anything is extracted. Must not touch the database or
Services: ``services_bundle.py`` decides what goes in and what an import creates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from personal_gpt.errors import InvalidInput

FORMAT = "personal-gpt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABEL = "Personal GPTs bundle"
_CHUNK = 1024 * 1024
MAX_JSON_BYTES = 64 * 2**20  # manifest.json, gpt.json, settings.json… are read into memory
MAX_NAME_CHARS = 240

_DRIVE = re.compile(r"^[A-Za-z]:")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class BundleError(InvalidInput):
    """A bundle that cannot be read or imported; the message says why in one sentence."""

    code = "invalid_bundle"


# --- sentences -------------------------------------------------------------------------

NOT_A_ZIP = "This file is not a Personal GPTs bundle: it is not a .zip file."
DAMAGED = "The bundle is damaged (incomplete or corrupt): export the GPT again and use the new file."
NO_MANIFEST = "This .zip is not a Personal GPTs bundle: it has no manifest.json."
OTHER_FORMAT = "This .zip is not a Personal GPTs bundle: its manifest.json is of another kind."
NEWER = ("This bundle was made by a newer version of Personal GPTs (bundle format {found}, this app reads up to "
         "{ours}) — update first.")
ENCRYPTED = "The bundle is password-protected, which Personal GPTs bundles never are."
BOMB = "The bundle is too large when unpacked (a possible zip bomb)."


def too_large(limit: int) -> str:
    return f"The bundle unpacks to more than {_size(limit)}, the most this app accepts."


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    return f"{n:,} bytes"


def _shown(name: str) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in name)
    return text if len(text) <= 80 else text[:80] + "…"


@dataclass(frozen=True)
class BundleLimits:
    """Caps for opening a bundle. ``max_ratio`` applies to a member once it has produced
    more than ``ratio_min_bytes`` (small text members may compress very well)."""

    max_total_bytes: int = 2 * 2**30
    max_members: int = 10_000
    max_ratio: int = 200
    ratio_min_bytes: int = 8 * 2**20

    @classmethod
    def from_env(cls) -> "BundleLimits":
        """``PGPT_BUNDLE_MAX_MB`` (default 2048) caps what one bundle may unpack to."""
        raw = os.environ.get("PGPT_BUNDLE_MAX_MB", "").strip()
        try:
            mb = int(raw) if raw else 2048
        except ValueError:
            mb = 2048
        return cls(max_total_bytes=max(1, mb) * 2**20)


DEFAULT_LIMITS = BundleLimits()


# --- names -----------------------------------------------------------------------------

def safe_part(name: str, limit: int = 80) -> str:
    """A file-name part made of letters, digits, dot, dash and underscore only (never
    ``.``/``..``), for member names built from display names or ids."""
    text = _SAFE_CHARS.sub("_", str(name or "")).strip("._") or "file"
    return text[:limit]


def check_member_name(name: str) -> str | None:
    """Why ``name`` may not be a member of a bundle (one sentence), or None when it is safe:
    relative, forward slashes only, no ``..``/``.``/empty parts, no drive letter, no NUL."""
    shown = _shown(name)
    if not name:
        return "The bundle has a part with an empty name."
    if "\x00" in name:
        return f"The bundle has a part whose name contains a NUL character ({shown})."
    if "\\" in name:
        return f"The bundle has a part whose name contains a backslash ({shown})."
    if name.startswith("/"):
        return f"The bundle has a part with an absolute path ({shown})."
    if _DRIVE.match(name):
        return f"The bundle has a part whose name starts with a drive letter ({shown})."
    parts = name.split("/")
    if any(part == ".." for part in parts):
        return f"The bundle has a part whose name leaves its folder ({shown})."
    if any(part in ("", ".") for part in parts):
        return f"The bundle has a part with an odd path ({shown})."
    if len(name) > MAX_NAME_CHARS or any(not ch.isprintable() for ch in name):
        return f"The bundle has a part with an unusable name ({shown})."
    return None


# --- writing ---------------------------------------------------------------------------

@dataclass
class Member:
    """One file to put in a bundle: from a file on disk (``source``) or from memory (``data``)."""

    name: str
    source: Path | None = None
    data: bytes | None = None

    def chunks(self) -> Iterable[bytes]:
        if self.data is not None:
            yield self.data
            return
        with open(self.source, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


def json_member(name: str, value) -> Member:
    return Member(name, data=json.dumps(value, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def _digest(member: Member) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for chunk in member.chunks():
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def write_bundle(dest: Path, members: list[Member], *, app_version: str, gpt_name: str) -> Path:
    """Write ``members`` behind a manifest into ``dest``: streamed into a temp file next to it
    and published with ``os.replace`` (``dest`` is complete or untouched). Returns ``dest``."""
    dest = Path(dest)
    names = [m.name for m in members]
    for name in names:
        problem = check_member_name(name)
        if problem or name == MANIFEST:
            raise ValueError(f"bad member name {name!r}")  # our own bug, never the creator's
    if len(set(names)) != len(names):
        raise ValueError("duplicate member names")
    listed = []
    for m in members:
        size, sha = _digest(m)
        listed.append({"name": m.name, "size": size, "sha256": sha})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "app_version": app_version,
        "created_at": datetime.now(timezone.utc).isoformat(), "gpt_name": gpt_name, "members": listed,
    }
    sizes = {x["name"]: x["size"] for x in listed}
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                stamp = datetime.now(timezone.utc).timetuple()[:6]
                for m in [json_member(MANIFEST, manifest), *members]:
                    info = zipfile.ZipInfo(m.name, date_time=stamp)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    with zf.open(info, "w", force_zip64=sizes.get(m.name, 0) > 2**31) as out:
                        for chunk in m.chunks():
                            out.write(chunk)
            raw.flush()  # the central directory is written when the ZipFile closes
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# --- reading ---------------------------------------------------------------------------

@dataclass
class OpenedBundle:
    """A bundle whose every member was checked and extracted into ``root`` (a fresh temp
    folder). Use as a context manager, or call ``close()``, to remove the folder."""

    root: Path
    manifest: dict
    members: dict[str, dict] = field(default_factory=dict)  # name -> {size, sha256}

    def path(self, name: str) -> Path:
        if name not in self.members:
            raise BundleError(f"The bundle is incomplete: it has no {_shown(name)}.")
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.members

    def json(self, name: str, default=None):
        if name not in self.members:
            if default is not None:
                return default
            raise BundleError(f"The bundle is incomplete: it has no {_shown(name)}.")
        if self.members[name]["size"] > MAX_JSON_BYTES:
            raise BundleError(f"The bundle's {_shown(name)} is too large.")
        try:
            return json.loads((self.root / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"The bundle's {_shown(name)} is not valid JSON.") from None

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "OpenedBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = (info.external_attr >> 16) & 0o170000
    return mode == stat.S_IFLNK


def _read_member(f, info: zipfile.ZipInfo, limits: BundleLimits, budget: int, sink) -> int:
    from personal_gpt.knowledge import archive
    from personal_gpt.knowledge.types import InvalidUpload

    caps = archive.ArchiveLimits(max_total_bytes=limits.max_total_bytes, max_entries=limits.max_members,
                                 max_ratio=limits.max_ratio, ratio_min_bytes=limits.ratio_min_bytes)
    try:
        return archive.inflate_member(f, info, LABEL, caps, budget, sink)
    except InvalidUpload as exc:
        if str(exc) == archive.BOMB:
            raise BundleError(BOMB) from None
        raise BundleError(DAMAGED) from None


def _check_manifest(manifest: object) -> dict[str, dict]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(OTHER_FORMAT)
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError("The bundle's manifest has no valid format_version.")
    if version > FORMAT_VERSION:
        raise BundleError(NEWER.format(found=version, ours=FORMAT_VERSION))
    listed = manifest.get("members")
    if not isinstance(listed, list):
        raise BundleError("The bundle's manifest does not list its parts.")
    out: dict[str, dict] = {}
    for item in listed:
        if not isinstance(item, dict):
            raise BundleError("The bundle's manifest lists a part it does not describe.")
        name, size, sha = item.get("name"), item.get("size"), item.get("sha256")
        if (not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise BundleError("The bundle's manifest lists a part without a valid size and SHA-256.")
        problem = check_member_name(name)
        if problem:
            raise BundleError(problem)
        if name in out or name == MANIFEST:
            raise BundleError(f"The bundle's manifest lists {_shown(name)} twice.")
        out[name] = {"size": size, "sha256": sha}
    return out


def _entries(path: Path, limits: BundleLimits) -> list[zipfile.ZipInfo]:
    """The zip's members after the structural checks (count, names, types, duplicates)."""
    from personal_gpt.knowledge import archive

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        raise BundleError("The bundle file could not be read.") from None
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise BundleError(NOT_A_ZIP)
    try:
        count = archive.count_entries(path)
    except (ValueError, OSError, struct.error):
        raise BundleError(DAMAGED) from None
    if count > limits.max_members:
        raise BundleError(f"The bundle has too many parts ({count:,}); at most {limits.max_members:,} are allowed.")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError):
        raise BundleError(DAMAGED) from None
    if len(infos) != count or len(infos) > limits.max_members:
        raise BundleError(DAMAGED)
    seen: set[str] = set()
    folded: set[str] = set()
    for info in infos:
        name = info.filename
        if info.orig_filename != name:  # zipfile rewrote it (e.g. a backslash or NUL): judge the original
            name = info.orig_filename
        problem = check_member_name(name)
        if problem:
            raise BundleError(problem)
        if _is_symlink(info):
            raise BundleError(f"The bundle has a symbolic link ({_shown(name)}), which bundles never contain.")
        if info.is_dir():
            raise BundleError(f"The bundle has a folder entry ({_shown(name)}), which bundles never contain.")
        if info.flag_bits & 0x1:
            raise BundleError(ENCRYPTED)
        if name in seen or name.casefold() in folded:
            raise BundleError(f"The bundle has two parts called {_shown(name)}.")
        seen.add(name)
        folded.add(name.casefold())
    return infos


def open_bundle(path: Path, limits: BundleLimits = DEFAULT_LIMITS, workdir: Path | None = None) -> OpenedBundle:
    """Check a bundle completely and extract it into a fresh temp folder (under ``workdir``
    when given). Every refusal is a BundleError with one sentence, raised before anything
    is left on disk: sizes are enforced while inflating (headers are not trusted), and each
    member must match the manifest's size and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise BundleError("There is no bundle file at that path.")
    infos = _entries(path, limits)
    by_name = {i.orig_filename: i for i in infos}
    if MANIFEST not in by_name:
        raise BundleError(NO_MANIFEST)
    if sum(i.file_size for i in infos) > limits.max_total_bytes:  # declared: a cheap early refusal only
        raise BundleError(too_large(limits.max_total_bytes))

    root = Path(tempfile.mkdtemp(prefix="pgpt-bundle-", dir=workdir))
    try:
        with open(path, "rb") as f:
            buf = bytearray()

            def into_memory(chunk: bytes) -> None:
                buf.extend(chunk)
                if len(buf) > MAX_JSON_BYTES:
                    raise BundleError("The bundle's manifest.json is too large.")

            used = _read_member(f, by_name[MANIFEST], limits, limits.max_total_bytes, into_memory)
            try:
                manifest = json.loads(bytes(buf).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise BundleError("The bundle's manifest.json is not valid JSON.") from None
            members = _check_manifest(manifest)
            missing = [n for n in members if n not in by_name]
            if missing:
                raise BundleError(f"The bundle is incomplete: {_shown(missing[0])} is missing.")
            extra = [n for n in by_name if n != MANIFEST and n not in members]
            if extra:
                raise BundleError(f"The bundle has a part its manifest does not list ({_shown(extra[0])}).")
            if sum(m["size"] for m in members.values()) + used > limits.max_total_bytes:
                raise BundleError(too_large(limits.max_total_bytes))
            for name, want in members.items():
                info = by_name[name]
                if info.file_size != want["size"]:
                    raise BundleError(f"The bundle's {_shown(name)} does not match its manifest (size).")
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                written = 0
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "wb") as out:
                    def to_file(chunk: bytes, _out=out, _name=name, _want=want["size"]) -> None:
                        nonlocal written
                        written += len(chunk)
                        if written > _want:
                            raise BundleError(f"The bundle's {_shown(_name)} does not match its manifest (size).")
                        h.update(chunk)
                        _out.write(chunk)

                    try:
                        produced = _read_member(f, info, limits, limits.max_total_bytes - used, to_file)
                    except BundleError as exc:
                        if str(exc) == BOMB and used + written >= limits.max_total_bytes:
                            raise BundleError(too_large(limits.max_total_bytes)) from None
                        raise
                used += produced
                if produced != want["size"]:
                    raise BundleError(f"The bundle's {_shown(name)} does not match its manifest (size).")
                if h.hexdigest() != want["sha256"]:
                    raise BundleError(f"The bundle's {_shown(name)} does not match its manifest (its SHA-256 "
                                      "differs): the file was changed or damaged.")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return OpenedBundle(root=root, manifest=manifest, members=members)
