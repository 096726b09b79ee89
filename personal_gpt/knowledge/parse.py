"""Turn uploaded files into text elements with page numbers and sections.

Checks size, real type and (for ZIP-based formats) the bounded unpack in this
process, then runs ``unstructured`` in a subprocess (``_parse_worker``) with an
address-space, CPU and wall-clock limit. Every failure becomes one sentence a
creator understands; the detail goes to the log. Imports no parser library.

``ParseSession`` keeps one worker process for a sequence of files (an ingest
job), so ``unstructured`` and its spaCy model load once per job instead of once
per file (about 1.4 s each). Each file still gets the limits a fresh process
gives it: the same address-space and file-size limits (for the whole process),
its own CPU seconds (the worker moves RLIMIT_CPU before each file) and its own
wall-clock timeout, measured here. A timeout, a crash, a memory kill or an
answer that is not what the protocol says ends that worker; the file gets the
same sentence as with a one-file worker, and the next file a fresh worker. A
file refused for memory by a worker that had already read other files is tried
once more in a fresh worker, so a verdict about memory is always a fresh
process's. A worker is also replaced once it has read ``max_files_per_worker``
files or says its address space passed 70 % of its limit. A session belongs to
one job, and so to one GPT: a worker never reads two creators' files.
``parse_file`` is a one-file session.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

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
    # pyarrow's default allocator (mimalloc, used by pandas for CSV/XLSX) reserves 1 GiB of address space
    # up front, which counts against the worker's RLIMIT_AS and leaves the parse itself little room.
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}


MAX_FILES_PER_WORKER = 100
MAX_ANSWER_BYTES = 1 << 30  # far above any answer for a 50 MB upload; a worker past it is misbehaving

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


def _precheck(path: Path, filename: str, *, max_bytes: int, archive_limits: archive.ArchiveLimits) -> str:
    """Everything decided in this process before any parser runs; returns the type."""
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
    return filetype


def _document(payload: dict, filetype: str) -> ParsedDocument:
    elements = [Element(text=e["text"], kind=e["kind"], page=e.get("page"), section=e.get("section"))
                for e in payload["elements"]]
    return ParsedDocument(elements=elements, filetype=filetype, pages=payload.get("pages"),
                          warnings=list(payload.get("warnings") or []))


# --- the long-lived worker ------------------------------------------------------------

class _TimedOut(Exception):
    pass


class _Ended(Exception):
    """The worker closed its stdout or stdin: it has ended (or is ending)."""


class _Malformed(Exception):
    pass


class _Failed(Exception):
    def __init__(self, code: int, payload: dict, tail: str, elapsed: float):
        super().__init__(code)
        self.code, self.payload, self.tail, self.elapsed = code, payload, tail, elapsed


class _Worker:
    """One serve-mode worker process with its own temp folder (its HOME, TMPDIR and
    cwd) and an unlinked file for its stderr: never a pipe, which a chatty library
    could fill while nobody reads it, and so look like a hang."""

    def __init__(self, memory_mb: int, cpu_s: int):
        self.memory_mb = memory_mb
        self.served = 0  # requests answered
        self.recycle = False
        self._buffer = bytearray()
        self._tmp = tempfile.TemporaryDirectory(prefix="pgpt-parse-")
        self._err = tempfile.TemporaryFile(prefix="pgpt-parse-err-")
        fd = self._err.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # so truncating it works
        env = _worker_env(self._tmp.name)
        env.pop(worker.SLEEP_ENV, None)  # serve mode takes it per request (``test_sleep``)
        cmd = [sys.executable, "-m", "personal_gpt.knowledge._parse_worker", "--serve",
               "--memory-mb", str(memory_mb), "--cpu-s", str(cpu_s)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                         env=env, cwd=self._tmp.name, start_new_session=True, close_fds=True,
                                         bufsize=0)
        except BaseException:
            self._err.close()
            self._tmp.cleanup()
            raise
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: dict) -> None:
        data = memoryview(json.dumps(request).encode("utf-8") + b"\n")
        try:
            while data:
                data = data[os.write(self.proc.stdin.fileno(), data):]
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Ended from exc

    def receive(self, deadline: float) -> bytes:
        """One answer line, or _TimedOut at ``deadline``, _Ended at EOF, _Malformed."""
        buf, fd, start = self._buffer, self.proc.stdout.fileno(), 0
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                if end != len(buf) - 1:
                    raise _Malformed("more than one line in one answer")
                line = bytes(buf[:end])
                buf.clear()
                return line
            start = len(buf)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut
            if not self._selector.select(remaining):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _Ended
            buf += chunk
            if len(buf) > MAX_ANSWER_BYTES:
                raise _Malformed(f"an answer over {MAX_ANSWER_BYTES} bytes")

    def exit_code(self) -> int:
        """After _Ended: its exit status (killed if it does not end by itself)."""
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            return self.proc.wait()

    def clear_stderr(self) -> None:
        os.ftruncate(self._err.fileno(), 0)

    def stderr_tail(self, limit: int = 4000) -> str:
        fd = self._err.fileno()
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit)).decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill(self.proc)

    def stop(self) -> None:
        """Kill it and free what it held (idempotent)."""
        self.kill()
        self.proc.wait()
        self._selector.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._err.close()
        self._tmp.cleanup()


class ParseSession:
    """Parses a sequence of files with one long-lived, sandboxed worker::

        with ParseSession(timeout_s=120, memory_mb=1536) as session:
            for path, name in uploads:
                doc = session.parse(path, name)   # as parse_file(path, name)

    The worker starts at the first file that reaches it (pre-checks refuse bombs
    and spoofed types before any process starts). ``timeout_s`` is each file's
    wall-clock limit (a file that starts a worker counts that start, as a
    one-file worker does); the worker's RLIMIT_CPU is moved to ``timeout_s`` + 5
    CPU seconds for each file. ``parse`` takes the same keyword arguments as
    ``parse_file``; a different ``memory_mb`` for one file starts a worker with
    that limit. Calls are serialised; ``close`` (or leaving the ``with``) kills
    the worker, also while another thread waits on a parse."""

    def __init__(self, *, timeout_s: float = 120, memory_mb: int = 1536,
                 max_files_per_worker: int = MAX_FILES_PER_WORKER):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_files_per_worker = max(1, int(max_files_per_worker))
        self.workers_started = 0
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    def __enter__(self) -> ParseSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pid(self) -> int | None:
        """The current worker's pid (None before the first parse and after a failure ended it)."""
        current = self._worker
        return current.pid if current is not None else None

    def close(self) -> None:
        self._closed = True
        current = self._worker
        if current is not None:
            current.kill()  # without the lock: ends a parse that another thread waits on
        with self._lock:
            if self._worker is not None:
                self._discard(self._worker)

    def parse(self, path: Path, filename: str, *, timeout_s: float | None = None, memory_mb: int | None = None,
              max_bytes: int = DEFAULT_MAX_BYTES, max_pages: int = DEFAULT_MAX_PAGES,
              archive_limits: archive.ArchiveLimits = archive.DEFAULT_LIMITS) -> ParsedDocument:
        """As ``parse_file``: raises QuotaExceeded over ``max_bytes`` and InvalidUpload,
        with one sentence, for everything that cannot be read."""
        path = Path(path)
        filetype = _precheck(path, filename, max_bytes=max_bytes, archive_limits=archive_limits)
        payload = self.run(path, filetype, timeout_s=timeout_s, memory_mb=memory_mb, max_pages=max_pages)
        return _document(payload, filetype)

    def run(self, path: Path, filetype: str, *, timeout_s: float | None = None, memory_mb: int | None = None,
            max_pages: int = DEFAULT_MAX_PAGES) -> dict:
        """The worker's JSON answer for a checked file of ``filetype`` (as ``run_worker``)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        memory_mb = self.memory_mb if memory_mb is None else memory_mb
        with self._lock:
            retried = False
            while True:
                if self._closed:
                    raise RuntimeError("the parse session is closed")
                started = time.monotonic()
                current = self._ready_worker(memory_mb, timeout_s)
                if self._closed:  # close() ran while the worker started: it may not have seen it
                    self._discard(current)
                    raise RuntimeError("the parse session is closed")
                warm = current.served > 0
                try:
                    return self._ask(current, path, filetype, started, timeout_s, max_pages)
                except _Failed as failed:
                    if self._closed:  # close() ended the worker under this parse
                        raise RuntimeError("the parse session was closed during the parse") from None
                    code = failed.code
                    if code not in _KNOWN and _OUT_OF_MEMORY.search(failed.tail):
                        code = worker.EXIT_MEMORY  # a library ran out of address space and aborted its own way
                    if code in (worker.EXIT_MEMORY, -signal.SIGKILL) and warm and not retried:
                        log.info("parse of %s (%s) ran out of memory in a worker that had read %d file(s); "
                                 "trying once more in a fresh one", path, filetype, current.served)
                        retried = True
                        continue
                    log.warning("parse of %s (%s) failed: exit %s after %.1f s; stderr tail: %s", path, filetype,
                                code, failed.elapsed, failed.tail)
                    raise InvalidUpload(_sentence(code, filetype, failed.payload, timeout_s, memory_mb)) from None

    # --- inside the lock ---

    def _ready_worker(self, memory_mb: int, timeout_s: float) -> _Worker:
        current = self._worker
        if current is not None:
            reason = ("it ended between files" if not current.alive() else
                      "another memory limit" if current.memory_mb != memory_mb else
                      "it asked to be replaced" if current.recycle else
                      "it read its share of files" if current.served >= self.max_files_per_worker else None)
            if reason is not None:
                log.info("replacing parse worker %d after %d file(s): %s", current.pid, current.served, reason)
                self._discard(current)
                current = None
        if current is None:
            current = _Worker(memory_mb, math.ceil(timeout_s) + 5)
            self._worker = current
            self.workers_started += 1
        return current

    def _discard(self, current: _Worker) -> None:
        if self._worker is current:
            self._worker = None
        current.stop()

    def _ask(self, current: _Worker, path: Path, filetype: str, started: float, timeout_s: float,
             max_pages: int) -> dict:
        request = {"id": next(self._ids), "path": str(Path(path).resolve()), "kind": filetype,
                   "max_pages": max_pages, "cpu_s": math.ceil(timeout_s) + 5}
        sleep = os.environ.get(worker.SLEEP_ENV)
        if sleep:
            request["test_sleep"] = sleep
        current.clear_stderr()
        try:
            current.send(request)
            line = current.receive(started + timeout_s)
        except _TimedOut:
            tail = current.stderr_tail(2000)
            self._discard(current)
            log.warning("parse of %s (%s) killed after %.1f s; stderr tail: %s", path, filetype,
                        time.monotonic() - started, tail)
            raise InvalidUpload(f"Reading the file took too long (over {_fmt(timeout_s)} s).") from None
        except _Ended:
            code = current.exit_code()
            tail = current.stderr_tail()
            self._discard(current)
            raise _Failed(code, {}, tail, time.monotonic() - started) from None
        except _Malformed as exc:
            return self._malformed(current, started, str(exc))
        current.served += 1
        try:
            payload = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._malformed(current, started, f"not JSON ({exc})")
        if not isinstance(payload, dict) or payload.get("id") != request["id"]:
            return self._malformed(current, started, "not the answer to this request")
        error = payload.get("error")
        if error is not None:
            if not isinstance(error, int) or isinstance(error, bool):
                return self._malformed(current, started, f"error {error!r}")
            tail = current.stderr_tail()
            if error in (worker.EXIT_MEMORY, worker.EXIT_CRASH) or not current.alive():
                self._discard(current)  # it ends itself after these; never reused
            raise _Failed(error, payload, tail, time.monotonic() - started)
        if not isinstance(payload.get("elements"), list):
            return self._malformed(current, started, "no elements")
        current.recycle = bool(payload.get("recycle"))
        if payload.get("blocked"):
            log.warning("parse of %s (%s): the worker refused %s", path, filetype, payload["blocked"])
        log.info("parsed %s (%s): %d elements in %.2f s (worker %d, file %d, %s MB address space)", path,
                 filetype, len(payload["elements"]), time.monotonic() - started, current.pid, current.served,
                 payload.get("address_space_mb"))
        return payload

    def _malformed(self, current: _Worker, started: float, why: str) -> NoReturn:
        tail = current.stderr_tail()
        self._discard(current)
        raise _Failed(worker.EXIT_CRASH, {}, f"malformed answer from the parse worker: {why}; stderr tail: {tail}",
                      time.monotonic() - started)


def parse_file(path: Path, filename: str, *, timeout_s: float = 120, memory_mb: int = 1536,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pages: int = DEFAULT_MAX_PAGES,
               archive_limits: archive.ArchiveLimits = archive.DEFAULT_LIMITS) -> ParsedDocument:
    """Parse the stored upload at ``path``; ``filename`` is the creator's name for
    it (only its extension matters here). Raises QuotaExceeded over ``max_bytes``
    and InvalidUpload, with one sentence, for everything that cannot be read.
    A one-file ParseSession: to parse several files, open one session for them."""
    with ParseSession(timeout_s=timeout_s, memory_mb=memory_mb) as session:
        return session.parse(path, filename, max_bytes=max_bytes, max_pages=max_pages, archive_limits=archive_limits)
