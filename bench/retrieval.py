"""Benchmark: retrieval quality and speed of KnowledgeIndex (bm25, dense,
hybrid) at several corpus sizes, beside plain baselines measured in the same
run (a naive per-document BM25 loop and a full-sort dense search).

Owns: building a labelled corpus (SQuAD with --squad, else a proxy made from
documentation text shipped inside installed Python packages), caching its
embeddings under --cache, and printing recall@1/5/10, MRR@10, p50/p95 search
latency and embedding throughput. Must not download anything.

    .venv/bin/python bench/retrieval.py [--sizes 1000,10000,100000] [--squad PATH]
        [--queries 300] [--cache DIR] [--synthetic 100000]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from personal_gpt.knowledge.chunk import chunk_elements  # noqa: E402
from personal_gpt.knowledge.embed import Embedder  # noqa: E402
from personal_gpt.knowledge.index import BM25_B, BM25_K1, KnowledgeIndex, tokenize  # noqa: E402
from personal_gpt.knowledge.types import Element  # noqa: E402

SEED = 1234
DROP = 0.30  # share of a sampled sentence's words removed to make a proxy query
KS = (1, 5, 10)
WEIGHTS = (0.3, 0.7)  # other dense weights tried for the fusion (the index uses 0.5)
RRF_K = 60
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ALPHA_WORD = re.compile(r"^[A-Za-z][a-z]+[,;:.]?$")


# --- corpora -------------------------------------------------------------------

def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _prose_share(text: str) -> float:
    words = text.split()
    return sum(1 for w in words if _ALPHA_WORD.match(w)) / max(1, len(words))


def package_passages(limit: int) -> list[str]:
    """Passages of docstrings and README/METADATA text from site-packages
    (files in a seeded random order), cut by our own chunker; prose-like, at
    least 25 words, deduplicated; deterministic for one environment."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if name.endswith(".py") or name in ("METADATA", "README.md", "README.rst", "README.txt"):
                files.append(Path(folder) / name)
    random.Random(SEED).shuffle(files)  # mix packages, so a small corpus is not one library's docs
    seen: set[str] = set()
    passages: list[str] = []
    for path in files:
        if path.suffix == ".py":
            docs = _docstrings(path)
        else:
            try:
                docs = [path.read_text(encoding="utf-8", errors="replace")]
            except OSError:
                continue
        for doc in docs:
            elements = [Element(p, "NarrativeText") for p in re.split(r"\n\s*\n", doc) if p.strip()]
            for chunk in chunk_elements(elements):
                text = chunk.text
                key = " ".join(text.lower().split())
                if len(text.split()) < 25 or key in seen or _prose_share(text) < 0.6:
                    continue
                seen.add(key)
                passages.append(text)
        if len(passages) >= limit:
            break
    return passages[:limit]


def proxy_corpus(max_size: int, n_queries: int, cache: Path):
    """(passages, queries, targets): queries are a sentence of the target
    passage with 30% of its words dropped, a sentence found nowhere else."""
    cache_file = cache / f"proxy-passages-{max_size}.json"
    if cache_file.is_file():
        passages = json.loads(cache_file.read_text())
    else:
        started = time.perf_counter()
        passages = package_passages(max_size)
        cache_file.write_text(json.dumps(passages))
        print(f"collected {len(passages)} passages from site-packages in {time.perf_counter() - started:.0f}s")
    rng = random.Random(SEED)
    haystack = "\x00".join(" ".join(p.split()) for p in passages)
    order = list(range(len(passages)))
    rng.shuffle(order)
    queries, targets = [], []
    for i in order:
        if len(queries) >= n_queries:
            break
        sentences = [s for s in _SENTENCE.split(" ".join(passages[i].split())) if 8 <= len(s.split()) <= 40]
        sentences = [s for s in sentences if _prose_share(s) >= 0.7 and haystack.count(s) == 1]
        if not sentences:
            continue
        words = rng.choice(sentences).split()
        drop = set(rng.sample(range(len(words)), int(round(DROP * len(words)))))
        queries.append(" ".join(w for j, w in enumerate(words) if j not in drop))
        targets.append(i)
    return passages, queries, targets


def squad_corpus(path: Path, n_queries: int):
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    passages, questions = [], []
    index: dict[str, int] = {}
    for article in data:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            pid = index.setdefault(context, len(passages))
            if pid == len(passages):
                passages.append(context)
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible"):
                    questions.append((qa["question"].strip(), pid))
    rng = random.Random(SEED)
    rng.shuffle(questions)
    chosen, used = [], set()
    for question, pid in questions:  # one question per paragraph, so targets are distinct
        if pid not in used:
            chosen.append((question, pid))
            used.add(pid)
        if len(chosen) >= n_queries:
            break
    return passages, [q for q, _ in chosen], [p for _, p in chosen]


def corpus_for_size(passages, targets, size):
    """Row numbers: all targets first, then distractors in passage order."""
    target_set = set(targets)
    rows = list(dict.fromkeys(targets))
    for i in range(len(passages)):
        if len(rows) >= size:
            break
        if i not in target_set:
            rows.append(i)
    return rows


# --- embeddings with a cache -------------------------------------------------

def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cached_vectors(embedder: Embedder, texts: list[str], cache: Path, label: str):
    """Vectors for ``texts``; new ones are embedded and appended to the cache.
    Returns (vectors, number embedded now, seconds spent embedding)."""
    vec_file, key_file = cache / f"{label}-vectors.npy", cache / f"{label}-keys.json"
    known_vectors = np.load(vec_file) if vec_file.is_file() else np.zeros((0, embedder.dim), np.float32)
    known_keys = json.loads(key_file.read_text()) if key_file.is_file() else []
    position = {k: i for i, k in enumerate(known_keys[: known_vectors.shape[0]])}
    keys = [_key(t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys if k not in position))
    seconds = 0.0
    if missing:
        by_key = {k: t for k, t in zip(keys, texts)}
        new_vectors = []
        step = 2048
        for start in range(0, len(missing), step):
            part = missing[start:start + step]
            began = time.perf_counter()
            new_vectors.append(embedder.encode([by_key[k] for k in part]))
            seconds += time.perf_counter() - began
            done = start + len(part)
            print(f"  embedded {done}/{len(missing)} ({done / seconds:.1f} chunks/s)", flush=True)
            # save as we go: an interrupted run resumes where it stopped
            known_vectors = np.concatenate([known_vectors[: len(known_keys)], new_vectors[-1]])
            known_keys = known_keys + part
            np.save(vec_file, known_vectors)
            key_file.write_text(json.dumps(known_keys))
        position = {k: i for i, k in enumerate(known_keys)}
    return known_vectors[[position[k] for k in keys]], len(missing), seconds


# --- baselines -----------------------------------------------------------------

class NaiveBM25:
    """The textbook loop (as rank_bm25 does it): score every document with
    dict lookups. Same tokenizer and formula, so the rankings must agree."""

    def __init__(self, texts):
        self.docs = [Counter(tokenize(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avgdl = sum(self.lengths) / max(1, len(self.docs))
        df = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {t: math.log1p((n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query):
        terms = set(tokenize(query))
        out = []
        for d, length in zip(self.docs, self.lengths):
            s = 0.0
            for t in terms:
                tf = d.get(t)
                if tf:
                    s += self.idf[t] * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * length / self.avgdl))
            out.append(s)
        return np.array(out)


# --- measuring -----------------------------------------------------------------

def metrics(ranked: list[list[int]], targets: list[int]) -> dict:
    out = {f"r@{k}": float(np.mean([t in r[:k] for r, t in zip(ranked, targets)])) for k in KS}
    out["mrr"] = float(np.mean([1.0 / (r.index(t) + 1) if t in r[:10] else 0.0 for r, t in zip(ranked, targets)]))
    return out


def weighted(hits, weight: float) -> list[int]:
    """Convex combination of candidate-normalised scores (BM25 / max, dense
    min-max), as KnowledgeIndex does with weight 0.5."""
    if not hits:
        return []
    bm = np.array([h.bm25_score for h in hits])
    de = np.array([h.dense_score for h in hits])
    bm = bm / bm.max() if bm.max() > 0 else bm
    de = (de - de.min()) / (de.max() - de.min()) if de.max() > de.min() else np.zeros_like(de)
    fused = weight * de + (1 - weight) * bm
    return [hits[i].id for i in np.argsort(-fused, kind="stable")]


def rrf(hits, k: int = RRF_K) -> list[int]:
    """Reciprocal-rank fusion (Cormack et al. 2009) of the same two top-100 lists."""
    score = {h.id: (1 / (k + h.bm25_rank) if h.bm25_rank else 0) + (1 / (k + h.dense_rank) if h.dense_rank else 0) for h in hits}
    return sorted(score, key=lambda i: -score[i])


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def run_size(size, passages, queries, targets, vectors_all, qvecs, naive_queries: int):
    rows = corpus_for_size(passages, targets, size)
    texts = [passages[r] for r in rows]
    index = KnowledgeIndex()
    began = time.perf_counter()
    index.add(rows, texts, vectors_all[: len(rows)])
    index.search("warm up", qvecs[0], k=1)  # compiles the postings
    build_s = time.perf_counter() - began
    results = []
    for mode in ("bm25", "dense", "hybrid"):
        ranked, latency = [], []
        for query, qv in zip(queries, qvecs):
            began = time.perf_counter()
            hits = index.search(query, qv, k=10, mode=mode)
            latency.append((time.perf_counter() - began) * 1000)
            ranked.append([h.id for h in hits])
        results.append((mode, metrics(ranked, targets), pct(latency, 50), pct(latency, 95)))
    deep = [index.search(q, qv, k=200, mode="hybrid") for q, qv in zip(queries, qvecs)]
    results.append((f"hybrid rrf k={RRF_K}", metrics([rrf(h)[:10] for h in deep], targets), None, None))
    for w in WEIGHTS:
        results.append((f"hybrid cc w={w}", metrics([weighted(h, w)[:10] for h in deep], targets), None, None))

    # baselines on a few queries: naive BM25 loop (and its agreement), dense full sort
    naive = NaiveBM25(texts)
    agree, naive_lat, sort_lat = 0, [], []
    matrix = np.ascontiguousarray(vectors_all[: len(rows)])
    for query, qv in list(zip(queries, qvecs))[:naive_queries]:
        began = time.perf_counter()
        scores = naive.scores(query)
        top = [rows[i] for i in np.argsort(-scores, kind="stable")[:10] if scores[i] > 0]
        naive_lat.append((time.perf_counter() - began) * 1000)
        ours = index.search(query, qv, k=10, mode="bm25")
        agree += np.allclose(sorted(scores[scores > 0], reverse=True)[:10], [h.score for h in ours], rtol=1e-4) and len(top) == len(ours)
        began = time.perf_counter()
        np.argsort(-(matrix @ qv))[:10]
        sort_lat.append((time.perf_counter() - began) * 1000)
    baselines = {
        "naive_bm25_p50": pct(naive_lat, 50), "naive_agree": f"{agree}/{min(naive_queries, len(queries))}",
        "dense_sort_p50": pct(sort_lat, 50), "build_s": build_s,
    }
    return len(rows), results, baselines


def synthetic_latency(size: int, n_queries: int = 200) -> dict:
    """The spec's synthetic load: random 384-d vectors and ~120-word texts
    drawn (Zipf-like) from a 30k-word vocabulary."""
    rng = np.random.default_rng(SEED)
    vocab = np.array([f"w{i}" for i in range(30_000)])
    p = 1.0 / np.arange(1, 30_001)
    p /= p.sum()
    words = rng.choice(30_000, size=(size, 120), p=p)
    texts = [" ".join(vocab[row]) for row in words]
    vectors = rng.standard_normal((size, 384)).astype(np.float32)
    index = KnowledgeIndex()
    began = time.perf_counter()
    index.add(list(range(size)), texts, vectors)
    index.search("w1", vectors[0], k=1)
    build = time.perf_counter() - began
    out = {"build_s": build}
    queries = [(" ".join(vocab[rng.choice(words[rng.integers(size)], 6, replace=False)]),
                rng.standard_normal(384).astype(np.float32)) for _ in range(n_queries)]
    for mode in ("bm25", "dense", "hybrid"):
        latency = []
        for q, v in queries:
            began = time.perf_counter()
            index.search(q, v, k=10, mode=mode)
            latency.append((time.perf_counter() - began) * 1000)
        out[mode] = (pct(latency, 50), pct(latency, 95))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--squad", type=Path, help="a SQuAD v1.1/v2.0 JSON file")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pgpt-bench-retrieval")
    parser.add_argument("--synthetic", type=int, default=100_000, help="also time search on N synthetic chunks (0: skip)")
    parser.add_argument("--naive-queries", type=int, default=20)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    args.cache.mkdir(parents=True, exist_ok=True)
    n_queries = min(args.queries, max(1, sizes[0] // 2))

    if args.squad:
        passages, queries, targets = squad_corpus(args.squad, n_queries)
        label = "squad-" + _key(str(args.squad.resolve()))[:8]
        print(f"corpus: SQuAD {args.squad} ({len(passages)} paragraphs), {len(queries)} questions")
    else:
        passages, queries, targets = proxy_corpus(max(sizes), n_queries, args.cache)
        label = "proxy"
        print("corpus: PROXY. No public QA set can be downloaded here, so passages are documentation text from\n"
              "installed Python packages (docstrings, READMEs) cut by chunk_elements, and each query is a sentence of\n"
              f"its target passage with {DROP:.0%} of its words dropped (no paraphrase). This favours exact-term\n"
              "matching (BM25); use --squad for real questions.")
        print(f"{len(passages)} passages available, {len(queries)} queries")
    if max(sizes) > len(passages):
        print(f"note: only {len(passages)} passages available; sizes are capped")

    embedder = Embedder()
    rows_needed = corpus_for_size(passages, targets, max(sizes))
    sample = [passages[r] for r in rows_needed[:256]]
    embedder.encode(sample[:8])  # load the model
    began = time.perf_counter()
    embedder.encode(sample)
    throughput = len(sample) / (time.perf_counter() - began)
    mean_tokens = statistics.mean(embedder.count_tokens(t) for t in sample)
    print(f"embedding throughput: {throughput:.1f} chunks/s on {len(sample)} passages of {mean_tokens:.0f} word pieces on average")
    vectors, embedded, seconds = cached_vectors(embedder, [passages[r] for r in rows_needed], args.cache, label)
    if embedded:
        print(f"embedded {embedded} new passages in {seconds:.0f}s ({embedded / seconds:.1f} chunks/s); cached in {args.cache}")
    else:
        print(f"all passage vectors came from the cache in {args.cache}")
    qlat = []
    qvecs = []
    for q in queries:
        began = time.perf_counter()
        qvecs.append(embedder.encode([q])[0])
        qlat.append((time.perf_counter() - began) * 1000)
    print(f"query embedding: p50 {pct(qlat, 50):.1f} ms, p95 {pct(qlat, 95):.1f} ms (one query at a time)")

    header = f"{'size':>7} {'mode':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR':>6} {'p50 ms':>8} {'p95 ms':>8}"
    print()
    print(header)
    print("-" * len(header))
    summary = {}
    for size in sizes:
        n, results, base = run_size(size, passages, queries, targets, vectors, qvecs, args.naive_queries)
        for mode, m, p50, p95 in results:
            lat = f"{p50:>8.2f} {p95:>8.2f}" if p50 is not None else f"{'-':>8} {'-':>8}"
            print(f"{n:>7} {mode:<16} {m['r@1']:>6.3f} {m['r@5']:>6.3f} {m['r@10']:>6.3f} {m['mrr']:>6.3f} {lat}")
            summary[(n, mode)] = (m, p50)
        print(f"{n:>7} {'baseline':<16} naive BM25 loop p50 {base['naive_bm25_p50']:.1f} ms (same top-10 scores: "
              f"{base['naive_agree']}); dense full sort p50 {base['dense_sort_p50']:.2f} ms; index build {base['build_s']:.1f}s")
    synthetic = None
    if args.synthetic:
        synthetic = synthetic_latency(args.synthetic)
        print(f"\nsynthetic {args.synthetic} chunks (random 384-d vectors, 120-word Zipf texts over 30k words), "
              f"build {synthetic['build_s']:.1f}s:")
        for mode in ("bm25", "dense", "hybrid"):
            p50, p95 = synthetic[mode]
            print(f"  {mode:<7} p50 {p50:6.2f} ms  p95 {p95:6.2f} ms")

    print()
    for (n, mode), (m, _) in summary.items():
        if mode == "hybrid":
            print(f"target recall@5 >= 0.90 at {n}: hybrid {m['r@5']:.3f} -> {'PASS' if m['r@5'] >= 0.90 else 'FAIL'}")
    largest = max(n for n, _ in summary)
    p50 = summary[(largest, "hybrid")][1]
    print(f"target p50 < 30 ms: hybrid at {largest} chunks {p50:.2f} ms -> {'PASS' if p50 < 30 else 'FAIL'}")
    if synthetic and largest < 100_000:
        p50 = synthetic["hybrid"][0]
        print(f"target p50 < 30 ms at 100k: synthetic hybrid at {args.synthetic} {p50:.2f} ms -> {'PASS' if p50 < 30 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
