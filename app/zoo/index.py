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

Two kinds: "flat" holds every transformed row (exact L2 over them) and the raw rows in RAM;
"compressed" (``index_compressed``, for zoos of ``index_zoo.COMPRESSED_FROM`` tasks and more)
searches PCA-reduced rows in an IVF index and re-ranks from a memory-mapped row store. Its
version names the store by the digest taken when the store was written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.task2vec.distances import memoised, symmetric_hessians
from app.task2vec.embedding import Embedding
from app.task2vec.errors import EmbeddingFileError
from app.task2vec.files import save_npz
from app.zoo.index_compressed import CompressedStage, StageSettings, store_path
from app.zoo.index_reduce import scan_nearest
from app.zoo.index_store import file_digest, open_rows, read_at_random

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

    @staticmethod
    def of_store(probe: str, ids: np.ndarray, dim: int, digest: str, factor: float) -> IndexVersion:
        """Of rows held in a store file whose sha256 is ``digest`` (times ``factor``)."""
        content = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        content.update(f"store:{digest}:{factor!r}".encode())
        return IndexVersion(probe, dim, int(ids.shape[0]), content.hexdigest())


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
        *,
        stage: CompressedStage | None = None,
        version: IndexVersion | None = None,
    ) -> None:
        """``embeddings``: the embedding objects of the rows, when the caller has them; they
        name the rows for ``memoised_distances`` (values still come from ``hessians``).
        ``stage``: the compressed kind's first stage, whose row store ``hessians`` is (then
        ``version`` names the rows: hashing a memory-mapped store on every open would read it
        all)."""
        ids = np.asarray(ids, dtype=np.int64)
        if stage is None:
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
        self.stage = stage
        self.store: Path | None = None  # the compressed kind's row store file
        self.kind = "flat" if stage is None else "compressed"
        self.version = version or IndexVersion.of(probe, ids, hessians)
        self._row = {int(i): r for r, i in enumerate(ids)}
        if stage is not None:
            faiss_index = stage.index
        elif faiss_index is None:
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

    @classmethod
    def build_compressed(
        cls,
        probe: str,
        ids: np.ndarray,
        store: Path,
        factor: float = 1.0,
        settings: StageSettings | None = None,
        version: IndexVersion | None = None,
    ) -> TaskIndex:
        """Over the rows of the ``.npy`` at ``store`` (row i = task ``ids[i]``, times
        ``factor``), which stays on disk, memory-mapped. ``version``: what the rows were
        written from, when the caller has named it; by default the store's digest."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = open_rows(Path(store), count=len(ids))
        if rows is None:
            raise EmbeddingFileError(f"{store}: no row store of {len(ids)} rows")
        stage = CompressedStage.build(ids, rows, factor, settings or StageSettings())
        read_at_random(rows)  # the build read it in order; queries read a few rows each
        digest = file_digest(Path(store))
        version = version or IndexVersion.of_store(probe, ids, rows.shape[1], digest, factor)
        index = cls(probe, ids, rows, stage=stage, version=version)
        index.store = Path(store)
        return index

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        """Ids of the ``count`` nearest tasks in the transformed space."""
        count = min(count, len(self))
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        if self.stage is not None:
            return self.stage.candidates(query, count)
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
        if self.stage is not None:
            wanted = max(oversample * k, self.stage.settings.rerank) + len(skip)
            kept = [int(i) for i in self.candidates(query.hessian, wanted) if int(i) not in skip]
            rows = np.array([self._row[i] for i in kept], dtype=np.int64)
            exact = self.stage.distances(query.hessian, rows)
            found_exact = [Neighbour(i, float(d)) for i, d in zip(kept, exact, strict=True)]
            return sorted(found_exact, key=lambda n: (n.distance, n.id))[:k]
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
        if self.stage is not None:  # a chunked scan of the store
            rows, dist = scan_nearest(
                query.hessian, self.hessians, k + len(skip), self.stage.factor
            )
            scan = [
                Neighbour(int(self.ids[r]), float(d)) for r, d in zip(rows[0], dist[0], strict=True)
            ]
            return [n for n in scan if n.id not in skip][:k]
        q = query.hessian.astype(np.float64)
        scored = [
            Neighbour(int(i), symmetric_hessians(q, h.astype(np.float64)))
            for i, h in zip(self.ids, self.hessians, strict=True)
            if int(i) not in skip
        ]
        scored.sort(key=lambda n: (n.distance, n.id))
        return scored[:k]

    def save(self, path: str | Path) -> None:
        """Atomic write: the FAISS index, the raw embeddings (for the compressed kind: where
        its row store is and the store's digest) and the version."""
        if self.stage is not None and self.store is not None:
            path = Path(path)
            beside = self.store.parent.resolve() == path.parent.resolve()
            save_npz(
                path,
                ids=self.ids,
                version=np.array(json.dumps(asdict(self.version))),
                **self.stage.arrays(
                    self.store.name if beside else str(self.store.resolve()),
                    file_digest(self.store),
                ),
            )
            return
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
                if "stage" in data.files:
                    if expected is not None and version != expected:
                        return None
                    return cls._load_compressed(path, data, version)
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

    @classmethod
    def _load_compressed(cls, path: Path, data: Any, version: IndexVersion) -> TaskIndex | None:
        """The compressed kind, when its row store is there, whole, and what it was built on."""
        about = CompressedStage.about(data)
        store = store_path(path, about["store"])
        ids = np.asarray(data["ids"], dtype=np.int64)
        rows = open_rows(store, count=len(ids), dim=version.dim)
        if rows is None or file_digest(store) != about["digest"]:
            return None  # missing, truncated or rewritten since
        read_at_random(rows)
        stage = CompressedStage.from_arrays(data, rows)
        if stage.index.ntotal != len(ids):
            return None
        index = cls(version.probe, ids, rows, stage=stage, version=version)
        index.store = store
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
