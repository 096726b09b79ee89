"""An in-memory hybrid search index over ONE GPT's chunks: Okapi BM25 on an
inverted index (numpy CSR arrays) plus brute-force cosine over normalised
float32 vectors, fused by a convex combination of scaled scores (it beat
reciprocal-rank fusion on both our labelled sets: bench/retrieval.py). Also
the float32 <-> bytes helpers used to keep vectors in a database column.

Owns ranking only: no model, no database, no file access. Each instance holds
its own items; nothing is shared between instances.
"""

from __future__ import annotations

import itertools
import re
import threading
import unicodedata
from dataclasses import dataclass

import numpy as np

BM25_K1 = 1.2
BM25_B = 0.75
DENSE_WEIGHT = 0.5  # hybrid = 0.5 * scaled cosine + 0.5 * scaled BM25
FUSION_DEPTH = 100  # candidates taken from each ranking before fusing
MODES = ("bm25", "dense", "hybrid")

# A light English stop-word list: words too common to carry meaning in a query.
STOP_WORDS = frozenset(
    """a an and are as at be but by for from has have how i if in into is it its of on or so
    that the their then there these they this to was we were what when where which who why will
    with you your do does did can could should would may might me my our us""".split()
)
_WORD = re.compile(r"\w+")
# ASCII characters that are not word characters (\w): turned into spaces
_ASCII_SEPARATORS = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")})
# Scripts written without spaces: every character is a term (plus the pair it
# starts, so that runs of characters still match as phrases).
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f]")


def tokenize(text: str) -> list[str]:
    """Lowercased unicode word terms of ``text`` without English stop words;
    CJK/Thai runs become character unigrams and bigrams. Language-agnostic
    otherwise (no stemming)."""
    if text.isascii():  # the common case: same terms as below, faster
        return list(itertools.filterfalse(STOP_WORDS.__contains__, text.lower().translate(_ASCII_SEPARATORS).split()))
    text = unicodedata.normalize("NFKC", text).casefold()
    words = _WORD.findall(text)
    if not _UNSPACED.search(text):
        return [w for w in words if w not in STOP_WORDS]
    terms: list[str] = []
    for word in words:
        if _UNSPACED.search(word):
            chars = [c for c in word]
            terms.extend(chars)
            terms.extend(a + b for a, b in zip(chars, chars[1:]))
        elif word not in STOP_WORDS:
            terms.append(word)
    return terms


@dataclass(frozen=True)
class Hit:
    """One result. Ranks are 1-based within each ranking's candidates; a
    field is None when that ranking was not run or did not list the item."""

    id: int
    score: float  # what the mode ranks by: BM25 score, cosine, or fused score
    bm25_score: float | None = None
    dense_score: float | None = None
    bm25_rank: int | None = None
    dense_rank: int | None = None


def serialize_vector(vector) -> bytes:
    """One vector as float32 little-endian bytes (for a BLOB/BYTEA column)."""
    array = np.asarray(vector, dtype="<f4")
    if array.ndim != 1:
        raise ValueError("serialize_vector takes one 1-D vector")
    return array.tobytes()


def deserialize_vectors(blobs) -> np.ndarray:
    """Bytes from :func:`serialize_vector`, one per row -> ``(n, dim)`` float32."""
    blobs = [bytes(b) for b in blobs]
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    size = len(blobs[0])
    if size % 4 or any(len(b) != size for b in blobs):
        raise ValueError("stored vectors have different or invalid sizes")
    return np.frombuffer(b"".join(blobs), dtype="<f4").astype(np.float32).reshape(len(blobs), size // 4)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (ties: lower index first)."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < scores.shape[0]:
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(scores.shape[0])
    return part[np.lexsort((part, -scores[part]))]


class _Postings:
    """A compiled BM25 inverted index: for term t, rows ``docs[ptr[t]:ptr[t+1]]``
    with their precomputed Okapi weights ``weights[...]`` (idf x tf part)."""

    __slots__ = ("ptr", "docs", "weights")

    def __init__(self, ptr: np.ndarray, docs: np.ndarray, weights: np.ndarray):
        self.ptr, self.docs, self.weights = ptr, docs, weights


class KnowledgeIndex:
    """Hybrid (BM25 + dense) search over one GPT's chunks, held in memory.

    ``add`` upserts by id; ``remove`` drops ids; ``search`` ranks. Safe to use
    from several threads: writers hold a lock, readers work on a snapshot.
    The BM25 postings are compiled lazily on the first search after a change
    (about a second per 100k chunks), so add in batches."""

    def __init__(self, *, dense_weight: float = DENSE_WEIGHT):
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError("dense_weight must be between 0 and 1")
        self.dense_weight = float(dense_weight)
        self._lock = threading.RLock()
        self._dim: int | None = None
        self._n = 0
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, 0), dtype=np.float32)  # capacity rows; the first _n are live
        self._row: dict[int, int] = {}
        self._terms: list[np.ndarray] = []  # per row: distinct term ids
        self._tfs: list[np.ndarray] = []  # per row: their counts
        self._lengths = np.zeros(0, dtype=np.float32)  # per row: number of terms
        self._vocab: dict[str, int] = {}
        self._postings: _Postings | None = None

    def __len__(self) -> int:
        return self._n

    def __contains__(self, item_id) -> bool:
        return int(item_id) in self._row

    @property
    def dim(self) -> int | None:
        return self._dim

    # --- writing ---------------------------------------------------------------

    def add(self, ids: list[int], texts: list[str], vectors: np.ndarray) -> None:
        """Index items; an id already present is replaced. ``vectors`` is
        ``(len(ids), dim)``; rows are L2-normalised here if they are not."""
        ids = [int(i) for i in ids]
        texts = list(texts)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1 and len(ids) == 0:
            vectors = vectors.reshape(0, self._dim or 0)
        if not (len(ids) == len(texts) == (vectors.shape[0] if vectors.ndim == 2 else -1)):
            raise ValueError("add() needs as many ids, texts and vector rows")
        if len(set(ids)) != len(ids):
            raise ValueError("add() got the same id twice")
        if not ids:
            return
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
        analysed = [self._analyse(t) for t in texts]  # outside the lock: the slow part
        with self._lock:
            if self._dim is None or self._n == 0:
                self._dim = vectors.shape[1]
            elif vectors.shape[1] != self._dim:
                raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the index has {self._dim}")
            present = [i for i in ids if i in self._row]
            if present:
                self._remove_locked(present)
            self._reserve(self._n + len(ids))
            start = self._n
            self._vectors[start:start + len(ids)] = vectors
            self._ids[start:start + len(ids)] = ids
            # distinct (row, term) pairs of the whole batch in one np.unique
            lengths = np.fromiter((len(words) for words in analysed), dtype=np.int64, count=len(ids))
            vocab = self._vocab
            words = list(itertools.chain.from_iterable(analysed))
            for word in sorted(set(words).difference(vocab)):  # sorted: term ids do not depend on hash order
                vocab[word] = len(vocab)
            flat = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words))
            width = max(len(vocab), 1)
            keys, counts = np.unique(np.repeat(np.arange(len(ids), dtype=np.int64), lengths) * width + flat, return_counts=True)
            bounds = np.searchsorted(keys // width, np.arange(1, len(ids)))
            terms = (keys % width).astype(np.int32)
            self._terms.extend(np.split(terms, bounds))
            self._tfs.extend(np.split(counts.astype(np.float32), bounds))
            for j, item_id in enumerate(ids):
                self._row[item_id] = start + j
            self._lengths = np.concatenate([self._lengths[:start], lengths.astype(np.float32)])
            self._n = start + len(ids)
            self._postings = None

    def remove(self, ids) -> int:
        """Drop these ids (unknown ones are ignored); returns how many went."""
        with self._lock:
            return self._remove_locked([int(i) for i in ids])

    def _remove_locked(self, ids: list[int]) -> int:
        rows = sorted({self._row[i] for i in ids if i in self._row})
        if not rows:
            return 0
        keep = np.ones(self._n, dtype=bool)
        keep[rows] = False
        # fresh arrays (not in place) so that searches holding a snapshot stay valid
        self._vectors = self._vectors[: self._n][keep]
        self._ids = self._ids[: self._n][keep]
        self._lengths = self._lengths[: self._n][keep]
        self._terms = [t for t, k in zip(self._terms, keep) if k]
        self._tfs = [t for t, k in zip(self._tfs, keep) if k]
        self._n = int(keep.sum())
        self._row = {int(i): r for r, i in enumerate(self._ids.tolist())}
        self._postings = None
        return len(rows)

    def _reserve(self, rows: int) -> None:
        if self._vectors.shape[0] >= rows and self._vectors.shape[1] == self._dim:
            return
        capacity = max(rows, int(self._vectors.shape[0] * 1.5), 64)
        vectors = np.zeros((capacity, self._dim), dtype=np.float32)
        ids = np.zeros(capacity, dtype=np.int64)
        if self._n:
            vectors[: self._n] = self._vectors[: self._n]
            ids[: self._n] = self._ids[: self._n]
        self._vectors, self._ids = vectors, ids

    @staticmethod
    def _analyse(text: str) -> list[str]:
        return tokenize(text or "")

    def _compile(self) -> _Postings:
        """Build the CSR postings with Okapi weights for the current rows."""
        n = self._n
        vocab_size = len(self._vocab)
        if n == 0:
            return _Postings(np.zeros(vocab_size + 1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        sizes = np.fromiter((t.shape[0] for t in self._terms), dtype=np.int64, count=n)
        terms = np.concatenate(self._terms) if sizes.sum() else np.zeros(0, np.int32)
        tfs = np.concatenate(self._tfs) if sizes.sum() else np.zeros(0, np.float32)
        rows = np.repeat(np.arange(n, dtype=np.int32), sizes)
        order = np.argsort(terms, kind="stable")  # stable: rows stay ascending within a term
        terms, tfs, rows = terms[order], tfs[order], rows[order]
        df = np.bincount(terms, minlength=vocab_size)
        ptr = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(df, out=ptr[1:])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)  # Lucene's non-negative idf
        lengths = self._lengths[:n]
        avgdl = float(lengths.mean()) or 1.0
        norm = (BM25_K1 * (1.0 - BM25_B + BM25_B * lengths / avgdl)).astype(np.float32)
        weights = idf[terms] * tfs * (BM25_K1 + 1.0) / (tfs + norm[rows])
        return _Postings(ptr, rows, weights.astype(np.float32))

    # --- reading ---------------------------------------------------------------

    def _snapshot(self):
        with self._lock:
            if self._postings is None:
                self._postings = self._compile()
            return self._n, self._ids[: self._n], self._vectors[: self._n], self._postings, self._vocab

    def bm25_scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for ``query`` (rows in index order)."""
        n, _, _, postings, vocab = self._snapshot()
        return self._bm25(query, n, postings, vocab)

    @staticmethod
    def _bm25(query: str, n: int, postings: _Postings, vocab: dict[str, int]) -> np.ndarray:
        term_ids = sorted({vocab[t] for t in tokenize(query or "") if t in vocab})
        term_ids = [t for t in term_ids if t + 1 < postings.ptr.shape[0]]
        if not term_ids or n == 0:
            return np.zeros(n, dtype=np.float32)
        if len(term_ids) == 1:
            t = term_ids[0]
            scores = np.zeros(n, dtype=np.float32)
            scores[postings.docs[postings.ptr[t]:postings.ptr[t + 1]]] = postings.weights[postings.ptr[t]:postings.ptr[t + 1]]
            return scores
        docs = np.concatenate([postings.docs[postings.ptr[t]:postings.ptr[t + 1]] for t in term_ids])
        weights = np.concatenate([postings.weights[postings.ptr[t]:postings.ptr[t + 1]] for t in term_ids])
        return np.bincount(docs, weights=weights, minlength=n).astype(np.float32)

    def search(self, query: str, query_vector=None, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The ``k`` best items for ``query`` (text, for BM25) and
        ``query_vector`` (for dense). ``mode``: "bm25", "dense" or "hybrid"
        (both top-100 lists fused by a weighted sum of their scaled scores;
        ``Hit.score`` is then in [0, 1]). BM25 lists only items sharing a
        term with the query."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        n, ids, vectors, postings, vocab = self._snapshot()
        if n == 0 or k <= 0:
            return []
        bm25 = dense = None
        if mode in ("bm25", "hybrid"):
            bm25 = self._bm25(query, n, postings, vocab)
        if mode in ("dense", "hybrid"):
            if query_vector is None:
                raise ValueError(f"mode {mode!r} needs a query vector")
            q = np.asarray(query_vector, dtype=np.float32).reshape(-1)
            if q.shape[0] != vectors.shape[1]:
                raise ValueError(f"the query vector has {q.shape[0]} dimensions, the index has {vectors.shape[1]}")
            norm = float(np.linalg.norm(q))
            dense = vectors @ (q / norm if norm > 0 else q)

        if mode == "bm25":
            top = _top(bm25, k)
            top = top[bm25[top] > 0]
            return [
                Hit(int(ids[r]), float(bm25[r]), bm25_score=float(bm25[r]), bm25_rank=i + 1)
                for i, r in enumerate(top)
            ]
        if mode == "dense":
            top = _top(dense, k)
            return [
                Hit(int(ids[r]), float(dense[r]), dense_score=float(dense[r]), dense_rank=i + 1)
                for i, r in enumerate(top)
            ]

        # Convex combination over the union of both top-100 lists: BM25 / its
        # max and min-max-scaled cosine, weighted 50/50 (see module docstring).
        depth = max(FUSION_DEPTH, k)
        bm25_top = _top(bm25, depth)
        bm25_top = bm25_top[bm25[bm25_top] > 0]
        dense_top = _top(dense, depth)
        candidates = np.union1d(bm25_top, dense_top)
        b = bm25[candidates]
        b = b / b.max() if b.size and b.max() > 0 else np.zeros_like(b)
        d = dense[candidates]
        spread = float(d.max() - d.min()) if d.size else 0.0
        d = (d - d.min()) / spread if spread > 0 else np.zeros_like(d)
        fused = self.dense_weight * d + (1.0 - self.dense_weight) * b
        # best fused first; ties go to the better cosine, then to the earlier row
        best = np.lexsort((candidates, -dense[candidates], -fused))[:k]
        bm25_rank = {int(r): i + 1 for i, r in enumerate(bm25_top)}
        dense_rank = {int(r): i + 1 for i, r in enumerate(dense_top)}
        return [
            Hit(
                int(ids[r]), float(fused[j]), bm25_score=float(bm25[r]), dense_score=float(dense[r]),
                bm25_rank=bm25_rank.get(int(r)), dense_rank=dense_rank.get(int(r)),
            )
            for j, r in ((j, candidates[j]) for j in best)
        ]
