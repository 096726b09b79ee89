"""Turn one uploaded file into text elements with page numbers and sections.

Checks size, real type and (for ZIP-based formats) the bounded unpack in this
process, then runs ``unstructured`` in a subprocess (``_parse_worker``) with an
address-space, CPU and wall-clock limit. Every failure becomes one sentence a
creator understands; the detail goes to the log. Imports no parser library.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from personal_gpt.knowledge import _parse_worker as worker
from personal_gpt.knowledge import archive, sniff
from personal_gpt.knowledge.types import Element, InvalidUpload, ParsedDocument, QuotaExceeded

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MAX_PAGES = 1000

DOC_NOT_SUPPORTED = ("Old Word .doc files are not supported; open the file in Word or LibreOffice, "
                     "save it as .docx and upload it again.")
PDF_PASSWORD = "The PDF is password-protected; remove the password and upload it again."
PDF_NO_TEXT = "No text found: the file may be a scanned image; OCR is not supported yet."
PDF_CORRUPT = "The PDF is damaged or incomplete; export it again and upload the new file."
GENERIC = "The file could not be read: it may be damaged."

# Variables the worker gets; nothing else of this process's environment (which
# may hold secrets) reaches the code that reads untrusted files.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "SYSTEMROOT", worker.SLEEP_ENV)
_WORKER_ENV = {
    "DO_NOT_TRACK": "1", "SCARF_NO_ANALYTICS": "true", "UNSTRUCTURED_DISABLE_NOTICE": "1",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
    "PYTHONIOENCODING": "utf-8",
}


_KNOWN = (worker.EXIT_CORRUPT, worker.EXIT_PASSWORD, worker.EXIT_NO_TEXT, worker.EXIT_TOO_MANY_PAGES,
          worker.EXIT_BROKEN_XML)
_OUT_OF_MEMORY = re.compile(r"MemoryError|[Mm]emory allocation|Cannot allocate memory|bad_alloc|[Oo]ut of memory")


def _fmt(value: float) -> str:
    return f"{value:g}"


def _broken_xml(filetype: str) -> str:
    return (f"The {filetype.upper()} file is damaged (its XML is broken); "
            "open it in its original program, save it again and upload the new file.")


def _sentence(code: int, filetype: str, payload: dict, timeout_s: float, memory_mb: int) -> str:
    if code == worker.EXIT_PASSWORD:
        return PDF_PASSWORD
    if code == worker.EXIT_NO_TEXT:
        return PDF_NO_TEXT
    if code == worker.EXIT_CORRUPT:
        return PDF_CORRUPT if filetype == "pdf" else GENERIC
    if code == worker.EXIT_TOO_MANY_PAGES:
        pages, limit = payload.get("pages"), payload.get("limit")
        if isinstance(pages, int) and isinstance(limit, int):
            return f"The PDF has {pages:,} pages; the limit is {limit:,}."
        return "The PDF has too many pages."
    if code == worker.EXIT_BROKEN_XML:
        return _broken_xml(filetype)
    if code == worker.EXIT_MEMORY:
        return f"Reading the file needed more than {memory_mb} MB of memory."
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # CPU limit, or killed for memory
        return f"Reading the file took too long (over {_fmt(timeout_s)} s)." if code == -signal.SIGXCPU \
            else f"Reading the file needed more than {memory_mb} MB of memory."
    return GENERIC


def _worker_env(tmp: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(_WORKER_ENV)
    env["HOME"] = env["TMPDIR"] = env["XDG_CACHE_HOME"] = tmp
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.kill()
    except OSError:
        pass


def run_worker(path: Path, filetype: str, *, timeout_s: float, memory_mb: int,
               max_pages: int = DEFAULT_MAX_PAGES) -> dict:
    """Run the parse subprocess; returns its JSON result or raises InvalidUpload."""
    cmd = [sys.executable, "-m", "personal_gpt.knowledge._parse_worker", str(Path(path).resolve()), filetype,
           "--memory-mb", str(memory_mb), "--cpu-s", str(math.ceil(timeout_s) + 5), "--max-pages", str(max_pages)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgpt-parse-") as tmp:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_worker_env(tmp), cwd=tmp, start_new_session=True, close_fds=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
            log.warning("parse of %s (%s) killed after %.1f s; stderr tail: %s", path, filetype,
                        time.monotonic() - started, err[-2000:].decode("utf-8", "replace"))
            raise InvalidUpload(f"Reading the file took too long (over {_fmt(timeout_s)} s).") from None
        finally:
            if proc.poll() is None:
                _kill(proc)
                proc.wait()
    elapsed = time.monotonic() - started
    code = proc.returncode
    try:
        payload = json.loads(out.decode("utf-8")) if out.strip() else {}
    except (ValueError, UnicodeDecodeError):
        payload = {}
    if code != worker.EXIT_OK or "elements" not in payload:
        if code not in _KNOWN and _OUT_OF_MEMORY.search(err[-4000:].decode("utf-8", "replace")):
            code = worker.EXIT_MEMORY  # a library ran out of address space and aborted its own way
        log.warning("parse of %s (%s) failed: exit %s after %.1f s; stderr tail: %s", path, filetype, code,
                    elapsed, err[-4000:].decode("utf-8", "replace"))
        raise InvalidUpload(_sentence(code, filetype, payload, timeout_s, memory_mb))
    if payload.get("blocked"):
        log.warning("parse of %s (%s): the worker refused %s", path, filetype, payload["blocked"])
    log.info("parsed %s (%s): %d elements in %.2f s", path, filetype, len(payload["elements"]), elapsed)
    return payload


def parse_file(path: Path, filename: str, *, timeout_s: float = 120, memory_mb: int = 1536,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pages: int = DEFAULT_MAX_PAGES,
               archive_limits: archive.ArchiveLimits = archive.DEFAULT_LIMITS) -> ParsedDocument:
    """Parse the stored upload at ``path``; ``filename`` is the creator's name for
    it (only its extension matters here). Raises QuotaExceeded over ``max_bytes``
    and InvalidUpload, with one sentence, for everything that cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InvalidUpload(sniff.EMPTY)
    if size > max_bytes:
        raise QuotaExceeded(f"The file is larger than {_fmt(max_bytes / 2**20)} MB.")
    ext = sniff.extension(filename)
    if ext and ext not in sniff.EXTENSIONS:
        raise InvalidUpload(sniff.unsupported(ext))
    detected = sniff.detect(path)
    if detected.container == "zip":
        # Bombs are refused whatever the supported name says, before the name is compared.
        claimed = sniff.EXTENSIONS.get(ext)
        label = claimed if claimed in sniff.ZIP_TYPES else detected.kind
        archive.check_archive(path, label.upper(), forbid_doctype=detected.kind != "epub", limits=archive_limits)
    filetype = sniff.match(detected, filename)
    if filetype == "doc":
        raise InvalidUpload(DOC_NOT_SUPPORTED)
    payload = run_worker(path, filetype, timeout_s=timeout_s, memory_mb=memory_mb, max_pages=max_pages)
    elements = [Element(text=e["text"], kind=e["kind"], page=e.get("page"), section=e.get("section"))
                for e in payload["elements"]]
    return ParsedDocument(elements=elements, filetype=filetype, pages=payload.get("pages"),
                          warnings=list(payload.get("warnings") or []))
