"""Benchmark: ingest throughput (pages/s, chunks/s) of our pipeline on a
PDF-heavy corpus, beside a plain-library baseline measured in the same run
(in-process ``unstructured`` partition + raw sentence-transformers, or plain
transformers mean pooling when sentence-transformers is not importable).

Owns: generating the corpus in a temp dir, timing ``ingest_file`` per file with
a stage breakdown, timing the baseline on the same files and the same chunk
texts (interleaved file by file, so load from other work hits both alike),
and a projection of one long-lived parse worker per job. Changes nothing
in the app; must not download anything.

    .venv/bin/python bench/ingest.py [--files 12] [--pages 8] [--st-path /tmp/st] [--repeat 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personal_gpt.knowledge import _parse_worker as worker  # noqa: E402
from personal_gpt.knowledge import ingest as ingest_mod  # noqa: E402
from personal_gpt.knowledge import parse as parse_mod  # noqa: E402
from personal_gpt.knowledge.embed import bundled_embedder_dir, default_embedder  # noqa: E402
from tests.support.documents import pdf_with_pages  # noqa: E402

SEED = 20240611
TARGET = 1.15

# --- corpus --------------------------------------------------------------------

_SUBJECTS = ("The onboarding team", "Our billing service", "The quarterly review", "Each regional office",
             "The support desk", "A new customer", "The warehouse manager", "The compliance officer",
             "The mobile app", "The data platform", "Every contractor", "The finance department",
             "The product roadmap", "The hiring committee", "The security audit", "Our largest supplier")
_VERBS = ("reviews", "approves", "documents", "schedules", "escalates", "measures", "archives", "reconciles",
          "summarises", "prioritises", "validates", "forecasts", "publishes", "renegotiates", "monitors")
_OBJECTS = ("the monthly invoices", "every refund request", "the shipping backlog", "incident reports",
            "travel expenses", "the vendor contracts", "customer feedback", "the staffing plan",
            "inventory counts", "the service level targets", "open purchase orders", "training records",
            "the release checklist", "overtime claims", "the disaster recovery plan", "warranty returns")
_CLAUSES = ("before the end of each quarter", "within five working days", "whenever a threshold is crossed",
            "after the weekly planning meeting", "unless the regional lead objects in writing",
            "so that auditors can trace every decision", "using the shared template in the handbook",
            "and notifies the account owner by email", "because late filings incur a penalty",
            "while keeping personal data out of the report", "once the budget has been confirmed",
            "according to the policy revised last spring")
_WORDS = ("capacity", "latency", "margin", "retention", "throughput", "variance", "backlog", "forecast",
          "allocation", "headcount", "turnover", "baseline", "escalation", "exception", "threshold",
          "dashboard", "milestone", "dependency", "handover", "checkpoint", "reconciliation", "ledger")


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.55:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_CLAUSES)}"
    elif kind < 0.8:
        n = rng.randint(2, 40)
        s = (f"In {rng.choice(('March', 'June', 'September', 'December'))} the {rng.choice(_WORDS)} rose by "
             f"{n} percent, and {rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}")
    else:
        words = rng.sample(_WORDS, 4)
        s = (f"Note that {words[0]} and {words[1]} depend on {words[2]}, so the {words[3]} is checked "
             f"{rng.choice(_CLAUSES)}")
    return s + "."


def _page_text(rng: random.Random, file_no: int, page_no: int) -> str:
    """~250-400 words: a heading line and 4-6 paragraphs separated by blank lines."""
    target = rng.randint(250, 400)
    paras, words = [f"Section {file_no}.{page_no}: {rng.choice(_WORDS).title()} and {rng.choice(_WORDS)}"], 0
    while words < target:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 5)))
        words += len(para.split())
        paras.append(para)
    return "\n\n".join(paras)


def build_corpus(folder: Path, files: int, pages: int) -> list[Path]:
    rng = random.Random(SEED)
    out: list[Path] = []
    for f in range(1, files + 1):
        path = folder / f"report-{f:02d}.pdf"
        path.write_bytes(pdf_with_pages([_page_text(rng, f, p) for p in range(1, pages + 1)]))
        out.append(path)
    try:  # a couple of non-PDF files, as a real upload set has
        import docx

        for d in (1, 2):
            document = docx.Document()
            for p in range(1, 4):
                document.add_heading(f"Handbook part {d}.{p}", level=1)
                for para in _page_text(rng, 100 + d, p).split("\n\n")[1:]:
                    document.add_paragraph(para)
            path = folder / f"handbook-{d}.docx"
            document.save(str(path))
            out.append(path)
    except ImportError:
        pass
    md = "\n\n".join(f"## Notes {p}\n\n" + "\n\n".join(_page_text(rng, 200, p).split("\n\n")[1:])
                     for p in range(1, 4))
    path = folder / "notes.md"
    path.write_text("# Team notes\n\n" + md + "\n", encoding="utf-8")
    out.append(path)
    return out


# --- ours and baseline, file by file -----------------------------------------------

class TimedEmbedder:
    """Passes every call to the app's embedder and adds up the time spent in
    ``count_tokens`` (the chunker's sizing) and ``encode``."""

    def __init__(self, inner):
        self.inner = inner
        self.count_s = 0.0
        self.encode_s = 0.0

    def count_tokens(self, text: str) -> int:
        t = time.perf_counter()
        try:
            return self.inner.count_tokens(text)
        finally:
            self.count_s += time.perf_counter() - t

    def encode(self, texts, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner.encode(texts, *args, **kwargs)
        finally:
            self.encode_s += time.perf_counter() - t


def prepare_inprocess_unstructured() -> dict:
    """In-process unstructured needs the worker's offline spaCy fix (reused:
    ``_parse_worker.use_bundled_spacy_model``) and its stubs for the OCR/layout
    imports (``_parse_worker.STUBBED_MODULES``). The worker's *blocking* of torch
    and transformers is not applied: this process embeds with them. Returns the
    one-time costs (import, spaCy model load) a fresh process pays once per job."""
    for name in worker.STUBBED_MODULES:
        sys.modules.setdefault(name, worker._Stub(name))
    worker.use_bundled_spacy_model()
    t = time.perf_counter()
    # auto imports the per-type partitioners lazily, at the first file of each type: count them here
    for module in ("unstructured.partition.auto", "unstructured.partition.docx", "unstructured.partition.md",
                   "unstructured.partition.pdf"):
        importlib.import_module(module)
    import_s = time.perf_counter() - t
    import unstructured.nlp.tokenize as tokenize

    t = time.perf_counter()
    tokenize._get_nlp()
    spacy_s = time.perf_counter() - t
    return {"import": import_s, "spacy": spacy_s,
            "note": "in-process unstructured set up with _parse_worker.use_bundled_spacy_model() + its "
                    "STUBBED_MODULES stubs (torch not blocked)"}


def clear_unstructured_caches() -> None:
    """unstructured memoises spaCy results per text; a later round must not reuse them."""
    import unstructured.nlp.tokenize as tokenize

    for name in ("_process_cached", "word_tokenize", "pos_tag", "_tokenize_for_cache"):
        fn = getattr(tokenize, name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def load_baseline_encoder(st_path: str | None):
    """(encode(texts), label, load seconds): raw sentence-transformers when
    importable from ``st_path``, else plain transformers + mean pooling."""
    where = str(bundled_embedder_dir())
    if st_path:
        sys.path.insert(0, st_path)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            print(f"  (sentence-transformers not importable from {st_path}: {exc!r}; using transformers)")
        else:
            t = time.perf_counter()
            model = SentenceTransformer(where, device="cpu")
            model.encode(["warm up"])
            load_s = time.perf_counter() - t

            def encode(texts):
                return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                    show_progress_bar=False)

            version = sys.modules["sentence_transformers"].__version__
            return encode, f"sentence-transformers {version} SentenceTransformer.encode(batch_size=64)", load_s
    import torch
    from transformers import AutoModel, AutoTokenizer

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
    mdl = AutoModel.from_pretrained(where, local_files_only=True).eval()

    def encode(texts):
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = mdl(**enc).last_hidden_state
                w = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return out

    encode(["warm up"])
    load_s = time.perf_counter() - t
    return encode, "plain transformers AutoModel + mean pooling, batches of 64 (sentence-transformers not used)", load_s


def run_round(paths: list[Path], base_encode) -> dict:
    """Each file through ``ingest_file`` (exactly as the job runner calls it),
    then straight after through the baseline (in-process partition + encoding of
    the same chunk texts), so load from other work on the machine hits both alike.
    ``parse_file`` is wrapped (in this process only) with a timer, so the stage
    between the "parsing" and "embedding" callbacks splits into parse and chunk."""
    from unstructured.partition.auto import partition

    timed = TimedEmbedder(default_embedder())
    parse_times: list[float] = []
    ours_total = to_embed = base_partition = base_encode_s = 0.0
    results, elements = {}, 0
    # ours = what JobRunner does: one sandboxed parse worker for the whole job (its start is counted)
    with parse_mod.ParseSession() as session:
        for path in paths:
            stamps: list[tuple[str, float]] = []
            counted = timed.count_s
            t0 = time.perf_counter()
            result = ingest_mod.ingest_file(path, path.name, timed, session=session,
                                            stage=lambda s: stamps.append((s, time.perf_counter())))
            ours_total += time.perf_counter() - t0
            to_embed += stamps[1][1] - stamps[0][1]  # "parsing" -> "embedding": parse + chunk
            parse_times.append(stamps[1][1] - stamps[0][1] - (timed.count_s - counted))  # chunking ~ count_tokens
            results[path] = result

            t0 = time.perf_counter()
            els = partition(filename=str(path), strategy="fast")
            base_partition += time.perf_counter() - t0
            elements += len(els)
            texts = [ingest_mod.embed_text(row["text"], row["section"]) for row in result.rows]
            t0 = time.perf_counter()
            base_encode(texts)
            base_encode_s += time.perf_counter() - t0
    parse_s = sum(parse_times)
    return {"ours": {"total": ours_total, "parse": parse_s, "chunk": to_embed - parse_s,
                     "count_tokens": timed.count_s, "encode": timed.encode_s,
                     "rest": ours_total - to_embed - timed.encode_s, "parse_per_file": parse_times},
            "base": {"partition": base_partition, "encode": base_encode_s, "elements": elements},
            "results": results}


# --- projection: one parse worker for the whole job ------------------------------

_ONE_WORKER = """
import json, os, sys, time
from pathlib import Path
from personal_gpt.knowledge import _parse_worker as w
out = os.dup(1); os.dup2(2, 1)
w.apply_limits(1536, 600); w.install_guard()
times = []
for item in json.loads(sys.argv[1]):
    t = time.perf_counter()
    w.parse(Path(item[0]), item[1], 1000)
    times.append(time.perf_counter() - t)
os.write(out, json.dumps(times).encode())
"""


def run_one_worker(paths: list[Path], filetypes: list[str]) -> dict:
    """All files parsed by ONE sandboxed worker process (same limits, guard and
    env as ``parse.run_worker``): what a long-lived per-job worker would cost."""
    items = json.dumps([[str(p.resolve()), ft] for p, ft in zip(paths, filetypes)])
    with tempfile.TemporaryDirectory(prefix="pgpt-bench-") as tmp:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _ONE_WORKER, items], capture_output=True,
                              env=parse_mod._worker_env(tmp), cwd=tmp, timeout=600)
        total = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode("utf-8", "replace")[-2000:])
    times = json.loads(proc.stdout)
    return {"total": total, "per_file": times}


# --- report ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=12, help="PDF files in the corpus")
    ap.add_argument("--pages", type=int, default=8, help="pages per PDF")
    ap.add_argument("--st-path", help="folder with sentence-transformers (installed --no-deps), for the baseline")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the corpus; the median round is shown")
    ap.add_argument("--out", help="keep the corpus and a JSON of the results here (default: temp dir, removed)")
    args = ap.parse_args(argv)

    tmp = None
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pgpt-bench-ingest-")
        folder = Path(tmp.name)
    corpus = folder / "corpus"
    corpus.mkdir(exist_ok=True)
    paths = build_corpus(corpus, args.files, args.pages)
    print(f"corpus: {len(paths)} files in {corpus} ({args.files} PDFs x {args.pages} pages, "
          f"{len(paths) - args.files} DOCX/MD); {os.cpu_count()} CPUs, torch threads "
          f"{default_embedder().threads or 'default'}", flush=True)

    embedder = default_embedder()
    t = time.perf_counter()
    embedder.encode(["warm up"])  # the app's embedder is a long-lived singleton: loaded once, outside the timing
    ours_load = time.perf_counter() - t
    base_encode, base_label, base_load = load_baseline_encoder(args.st_path)
    setup = prepare_inprocess_unstructured()
    once = setup["import"] + setup["spacy"]  # the baseline pays these once per job: counted in every round

    load_before = os.getloadavg()[0]
    rounds = []
    for r in range(args.repeat):
        if r:
            clear_unstructured_caches()
        rounds.append(run_round(paths, base_encode))
        rd = rounds[-1]
        rd["base"]["total"] = once + rd["base"]["partition"] + rd["base"]["encode"]
        rd["ratio"] = rd["ours"]["total"] / rd["base"]["total"]
        if args.repeat > 1:
            print(f"  round {r + 1}: ours {rd['ours']['total']:.2f} s, baseline {rd['base']['total']:.2f} s, "
                  f"ratio {rd['ratio']:.2f}x", flush=True)
    load_after = os.getloadavg()[0]
    pick = sorted(rounds, key=lambda rd: rd["ratio"])[len(rounds) // 2]  # the median round by ratio
    ours, base = pick["ours"], pick["base"]
    results = [rounds[0]["results"][p] for p in paths]
    filetypes = [r.filetype for r in results]
    pages = sum(r.pages or 0 for r in results)
    chunks = sum(len(r.rows) for r in results)
    one = run_one_worker(paths, filetypes)

    n = len(paths)
    ratio = pick["ratio"]
    sub_overhead = (ours["parse"] - base["partition"]) / n
    projected = one["total"] + ours["chunk"] + ours["encode"] + ours["rest"]

    def row(label: str, seconds: float) -> str:
        return f"{label:<44} {seconds:8.2f} {pages / seconds:9.1f} {chunks / seconds:10.1f}"

    print()
    print(f"files {n}   pages {pages} (PDF pages; DOCX/MD have none)   chunks {chunks}   "
          f"baseline elements {base['elements']}" + (f"   (median of {len(rounds)} rounds)" if len(rounds) > 1 else ""))
    print(f"{'':<44} {'seconds':>8} {'pages/s':>9} {'chunks/s':>10}")
    print(row("ours: ingest job (one sandboxed parse worker)", ours["total"]))
    print(row("baseline: partition + encode (+ import once)", base["total"]))
    print(f"ratio ours / baseline time: {ratio:.2f}x   (1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after, on {os.cpu_count()} CPUs: other work on the machine adds noise)")
    print()
    print("ours, breakdown:")
    print(f"  parse (sandboxed worker)        {ours['parse']:7.2f} s  "
          f"({ours['parse'] / n:.2f} s/file, {100 * ours['parse'] / ours['total']:.0f}%)")
    print(f"  chunk (chunk_elements)          {ours['chunk']:7.2f} s  "
          f"(of which count_tokens {ours['count_tokens']:.2f} s)")
    print(f"  embed (Embedder.encode)         {ours['encode']:7.2f} s  ({100 * ours['encode'] / ours['total']:.0f}%)")
    print(f"  rows, serialize, rest           {ours['rest']:7.2f} s")
    print(f"  (embedder load before timing    {ours_load:7.2f} s, not counted)")
    print("baseline, breakdown:")
    print(f"  import unstructured + spaCy     {once:7.2f} s  (once per job: {setup['import']:.2f} + {setup['spacy']:.2f})")
    print(f"  partition(strategy='fast')      {base['partition']:7.2f} s  ({base['partition'] / n:.2f} s/file)")
    print(f"  encode, same chunk texts        {base['encode']:7.2f} s  [{base_label}, per file]")
    print(f"  (model load before timing       {base_load:7.2f} s, not counted)")
    vision = [m for m in ("torchvision", "timm", "onnxruntime") if sys.modules.get(m) is not None]
    print(f"  note: {setup['note']}" + (f"; vision modules loaded: {vision}" if vision else ""))
    print()
    print(f"where our overhead comes from: parsing costs {sub_overhead:.2f} s/file more than in-process partition "
          f"(the sandboxed worker's start, counted once per job, and the request round trip); "
          f"chunk+embed {ours['chunk'] + ours['encode']:.2f} s vs baseline encode {base['encode']:.2f} s")
    print(f"projection, one sandboxed parse worker for the whole job: parse {one['total']:.2f} s "
          f"(vs {ours['parse']:.2f} s) -> total ~{projected:.2f} s, {projected / base['total']:.2f}x the baseline")
    met = ratio <= TARGET
    print(f"target: our overhead at most {TARGET}x the raw sum: {'met' if met else 'NOT met'} ({ratio:.2f}x)")

    if args.out:
        (folder / "ingest-bench.json").write_text(json.dumps({
            "files": n, "pages": pages, "chunks": chunks, "rounds": [
                {k: v for k, v in rd.items() if k != "results"} for rd in rounds],
            "baseline_once": setup, "baseline_label": base_label, "one_worker": one, "ratio": ratio, "projected_one_worker": projected,
            "target": TARGET, "met": met}, indent=2, default=str), encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
