"""Nearest zoo tasks: FAISS candidates, re-ranked exactly by the symmetric Task2Vec distance.

FAISS cannot search the paper's symmetric distance directly (it normalises each pair of
embeddings by their sum). It can search a transform of the embeddings whose L2 distance
approximates it: for nearby tasks, with δ = log h_a − log h_b per filter,

    d_sym(a, b) ≈ ½ · Var_i(δ_i) = ‖x_a − x_b‖²,  x = (log h − mean(log h)) / sqrt(2n),

(second-order expansion of the cosine of h_a/(h_a+h_b) and h_b/(h_a+h_b)). So the index holds
the centred log-embeddings, returns a candidate list several times longer than asked for,
and the candidates are re-ranked with the exact symmetric distance. SQL stays the source of
truth: the index is a cache, saved with its version (probe, dimension, count, content hash)
and rebuilt when that no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from app.task2vec.distances import memoised, symmetric_hessians
from app.task2vec.embedding import Embedding
from app.task2vec.errors import EmbeddingFileError
from app.task2vec.files import save_npz

#: Floor for zero Fisher values before the log: relative to each embedding's median, so
#: a dead filter reads as "far below typical", whatever the estimator's scale.
_LOG_FLOOR = 1e-6

#: A zoo index holds tasks, not images: below this many, FAISS's OpenMP fan-out costs more than
#: the scan (measured on 2 cores: a learned ranking on the 66-task demo zoo, 15.2 ms → 7.1 ms).
_PARALLEL_ABOVE = 20_000


@dataclass(frozen=True)
class IndexVersion:
    """What the index was built from; a mismatch with the zoo means it is stale."""

    probe: str
    dim: int
    count: int
    content: str  # sha256 over ids and embeddings

    @staticmethod
    def of(probe: str, ids: np.ndarray, hessians: np.ndarray) -> IndexVersion:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(hessians, dtype=np.float32).tobytes())
        return IndexVersion(probe, int(hessians.shape[1]), int(ids.shape[0]), digest.hexdigest())


@dataclass(frozen=True)
class Neighbour:
    id: int
    distance: float


def log_transform(hessians: np.ndarray) -> np.ndarray:
    """Rows → centred log-embeddings scaled so that squared L2 ≈ symmetric distance."""
    h = np.asarray(hessians, dtype=np.float64)
    if h.ndim == 1:
        h = h[None]
    positive = np.where(h > 0, h, np.nan)
    median = np.nanmedian(positive, axis=1, keepdims=True)
    median = np.where(np.isfinite(median), median, 1.0)
    logs = np.log(np.maximum(h, median * _LOG_FLOOR))
    centred = logs - logs.mean(axis=1, keepdims=True)
    out: np.ndarray = (centred / np.sqrt(2.0 * h.shape[1])).astype(np.float32)
    return out


class TaskIndex:
    """Candidate retrieval (FAISS, L2 on the transform) plus exact symmetric re-ranking."""

    def __init__(
        self,
        probe: str,
        ids: np.ndarray,
        hessians: np.ndarray,
        faiss_index: faiss.Index | None = None,
        embeddings: Sequence[Embedding] | None = None,
    ) -> None:
        """``embeddings``: the embedding objects of the rows, when the caller has them; they
        name the rows for ``memoised_distances`` (values still come from ``hessians``)."""
        ids = np.asarray(ids, dtype=np.int64)
        hessians = np.asarray(hessians, dtype=np.float32)
        if hessians.ndim != 2 or hessians.shape[0] != ids.shape[0]:
            raise EmbeddingFileError(
                f"index needs one embedding per id: {ids.shape[0]} ids, embeddings of shape "
                f"{hessians.shape}"
            )
        if len(set(ids.tolist())) != len(ids):
            raise EmbeddingFileError("index ids must be unique")
        self.probe = probe
        self.ids = ids
        self.hessians = hessians
        self.version = IndexVersion.of(probe, ids, hessians)
        self._row = {int(i): r for r, i in enumerate(ids)}
        if faiss_index is None:
            faiss_index = faiss.IndexIDMap2(faiss.IndexFlatL2(hessians.shape[1]))
            if len(ids):
                faiss_index.add_with_ids(log_transform(hessians), ids)
        self._faiss = faiss_index
        self.embeddings = None if embeddings is None else list(embeddings)

    @classmethod
    def build(cls, probe: str, entries: Sequence[tuple[int, Embedding]]) -> TaskIndex:
        """From (id, embedding) pairs; all embeddings must come from ``probe``, one layout."""
        dims = {e.dim for _, e in entries}
        if len(dims) > 1:
            raise EmbeddingFileError(f"embeddings of different sizes in one index: {sorted(dims)}")
        for task_id, e in entries:
            if e.meta.get("probe", probe) != probe:
                raise EmbeddingFileError(
                    f"task {task_id} was embedded with probe {e.meta['probe']!r}, the index "
                    f"holds {probe!r}: a zoo is tied to one probe"
                )
        ids = np.array([i for i, _ in entries], dtype=np.int64)
        dim = dims.pop() if dims else 0
        hessians = np.stack([e.hessian for _, e in entries]) if entries else np.zeros((0, dim))
        return cls(probe, ids, hessians, embeddings=[e for _, e in entries])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        """Ids of the ``count`` nearest tasks in the transformed space."""
        count = min(count, len(self))
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        query_rows = log_transform(query)
        threads = faiss.omp_get_max_threads()
        if len(self) < _PARALLEL_ABOVE:
            faiss.omp_set_num_threads(1)
        try:
            _, found = self._faiss.search(query_rows, count)
        finally:
            faiss.omp_set_num_threads(threads)
        ids: np.ndarray = np.asarray(found[0], dtype=np.int64)
        return ids[ids >= 0]

    def search(
        self,
        query: Embedding,
        k: int = 10,
        oversample: int = 4,
        exclude: Sequence[int] = (),
    ) -> list[Neighbour]:
        """The ``k`` nearest zoo tasks by the exact symmetric distance.

        FAISS proposes ``oversample·k`` candidates (plus the excluded ones); only those are
        compared exactly.
        """
        if query.dim != self.hessians.shape[1]:
            raise EmbeddingFileError(
                f"query has {query.dim} dims, the index {self.hessians.shape[1]}: another probe"
            )
        skip = set(exclude)
        found = self.candidates(query.hessian, oversample * k + len(skip))
        q = query.hessian.astype(np.float64)
        scored = [
            Neighbour(int(i), self._exact(query, q, self._row[int(i)]))
            for i in found
            if int(i) not in skip
        ]
        scored.sort(key=lambda n: (n.distance, n.id))
        return scored[:k]

    def _exact(self, query: Embedding, q: np.ndarray, row: int) -> float:
        def compute() -> float:
            return symmetric_hessians(q, self.hessians[row].astype(np.float64))

        if self.embeddings is None:
            return compute()
        return memoised("index", (query, self.embeddings[row]), compute)

    def exact_search(
        self, query: Embedding, k: int = 10, exclude: Sequence[int] = ()
    ) -> list[Neighbour]:
        """Brute force over every task: the ground truth the candidate stage is measured by."""
        skip = set(exclude)
        q = query.hessian.astype(np.float64)
        scored = [
            Neighbour(int(i), symmetric_hessians(q, h.astype(np.float64)))
            for i, h in zip(self.ids, self.hessians, strict=True)
            if int(i) not in skip
        ]
        scored.sort(key=lambda n: (n.distance, n.id))
        return scored[:k]

    def save(self, path: str | Path) -> None:
        """Atomic write: the FAISS index, the raw embeddings and the version."""
        save_npz(
            path,
            ids=self.ids,
            hessians=self.hessians,
            faiss=faiss.serialize_index(self._faiss),
            version=np.array(json.dumps(asdict(self.version))),
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected: IndexVersion | None = None,
        embeddings: Sequence[Embedding] | None = None,
    ) -> TaskIndex | None:
        """The saved index, or None when it is missing, unreadable or not ``expected``
        (``embeddings``: the rows' embedding objects, as in ``__init__``)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                version = IndexVersion(**json.loads(str(data["version"])))
                ids, hessians = data["ids"], data["hessians"]
                serialized = data["faiss"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if expected is not None and version != expected:
            return None
        index = cls(version.probe, ids, hessians, faiss.deserialize_index(serialized), embeddings)
        if index.version != version or index._faiss.ntotal != len(ids):
            return None  # altered or truncated
        return index


def recall_at_k(
    index: TaskIndex, queries: Sequence[tuple[int, Embedding]], k: int = 10, oversample: int = 4
) -> float:
    """Mean share of the exact k nearest tasks that the FAISS stage + re-rank returns.

    Each query is a zoo task searched with itself excluded (leave-one-out).
    """
    if not queries:
        return 1.0
    shares = []
    for task_id, embedding in queries:
        truth = {n.id for n in index.exact_search(embedding, k, exclude=[task_id])}
        got = {n.id for n in index.search(embedding, k, oversample, exclude=[task_id])}
        shares.append(len(truth & got) / max(1, len(truth)))
    return float(np.mean(shares))
