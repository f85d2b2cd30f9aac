"""What a large task index computes over its rows: the log transform in chunks, a PCA that
shrinks 17k–42k dimensions to a few hundred, and the symmetric distance of one query to a
block of rows at once (for the full scans that measure the index).

The PCA is fitted on a sample of the rows (randomized SVD: the covariance of 17k dimensions
alone would be 1.2 GB and its eigendecomposition far too slow on two cores). The reduced
vectors keep the directions the zoo's tasks differ along; the candidate stage searches them,
and the exact symmetric distance re-ranks what it proposes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.utils.extmath import randomized_svd

from app.task2vec.distances import symmetric_hessians

_BLOCK = 64
_FEW = 8

#: As ``index.log_transform``: zero Fisher values are floored relative to the row's median.
LOG_FLOOR = 1e-6


def log_transform_rows(rows: np.ndarray) -> np.ndarray:
    """``index.log_transform`` of a block of rows, in float32 arithmetic (equal to it within
    float32 rounding): each row's median of its positive values is read from one sort of a
    small block (``nanmedian`` walks the rows one by one in Python, too slow for a million
    of them), and small blocks keep the temporaries in memory the allocator reuses."""
    rows = np.asarray(rows)
    if rows.ndim == 1:
        rows = rows[None]
    out = np.empty(rows.shape, dtype=np.float32)
    for start in range(0, rows.shape[0], _BLOCK):
        out[start : start + _BLOCK] = _log_block(np.asarray(rows[start : start + _BLOCK]))
    return out


def _log_block(rows: np.ndarray) -> np.ndarray:
    h = rows.astype(np.float32)
    positive = h > 0
    count = positive.sum(axis=1)
    ordered = np.sort(np.where(positive, h, np.float32(np.inf)), axis=1)
    lines = np.arange(h.shape[0])
    low = np.maximum(count - 1, 0) // 2
    high = np.minimum(np.maximum(count, 1) // 2, h.shape[1] - 1)
    pair = ordered[lines, low].astype(np.float64) + ordered[lines, high].astype(np.float64)
    median = np.where(count > 0, pair / 2, 1.0)[:, None]
    logs = np.log(np.maximum(h, (median * LOG_FLOOR).astype(np.float32)))
    logs -= logs.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    logs *= np.float32(1.0 / np.sqrt(2.0 * h.shape[1]))
    return logs


def _drops_dead_filters() -> bool:
    """Whether the symmetric distance in force leaves out filters zero on both sides (the
    default convention) rather than counting them as ½ each."""
    return symmetric_hessians(np.array([0.0, 1.0]), np.array([0.0, 2.0])) < 1e-12


@dataclass(frozen=True)
class Reduction:
    """x ↦ (x − mean) · components: the top principal directions of the log-embeddings."""

    mean: np.ndarray  # (dim,)
    components: np.ndarray  # (dim, width)

    @property
    def width(self) -> int:
        return int(self.components.shape[1])

    @staticmethod
    def fit(sample: np.ndarray, width: int, seed: int = 0) -> Reduction:
        """From log-transformed rows ``sample`` (rows × dim); ``width`` ≤ both sizes."""
        width = max(1, min(width, sample.shape[0], sample.shape[1]))
        mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = sample - mean
        _, _, vt = randomized_svd(centred, width, n_oversamples=20, n_iter=4, random_state=seed)
        return Reduction(mean, np.ascontiguousarray(vt.T, dtype=np.float32))

    def apply(self, logs: np.ndarray) -> np.ndarray:
        centred = logs - self.mean
        if len(centred) <= _FEW:  # a query: BLAS threads cost more than they save
            out: np.ndarray = np.einsum("ij,jk->ik", centred, self.components)
        else:
            out = centred @ self.components
        return out.astype(np.float32)


def reduced_chunks(
    rows: np.ndarray, reduction: Reduction, factor: float, chunk: int = 2048
) -> Iterator[np.ndarray]:
    """The reduced vectors of ``rows`` (a memmap is read one chunk at a time)."""
    for start in range(0, rows.shape[0], chunk):
        block = np.asarray(rows[start : start + chunk], dtype=np.float32) / np.float32(factor)
        yield reduction.apply(log_transform_rows(block))


def symmetric_block(query: np.ndarray, rows: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """The symmetric distance from ``query`` to each of ``rows``, computed as
    ``symmetric_hessians`` does (the same ratios, the same dead-filter convention) for a whole
    block at once. In float64 it is that distance up to rounding; float32 halves the memory
    traffic for scans that only pick a short list. Rows go through in small blocks whose
    temporaries the allocator reuses (fresh pages for large ones cost more than the sums)."""
    q: np.ndarray = np.asarray(query, dtype=dtype)[None, :]
    out = np.empty(rows.shape[0])
    drop = _drops_dead_filters()
    for start in range(0, rows.shape[0], _BLOCK):
        a: np.ndarray = np.array(rows[start : start + _BLOCK], dtype=dtype)  # a copy: reused
        total = a + q
        dead = None if drop else total <= 0
        np.maximum(total, np.finfo(dtype).smallest_subnormal, out=total)
        ra = np.divide(a, total, out=a)
        rb = np.divide(q, total, out=total)  # = 1 − ra, to rounding; 0 where both are 0
        if dead is not None:
            ra[dead] = rb[dead] = 0.5
        out[start : start + len(a)] = _cosines(ra, rb)
    return out


def _cosines(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    dot = np.einsum("ij,ij->i", ra, rb, dtype=np.float64)
    na = np.sqrt(np.einsum("ij,ij->i", ra, ra, dtype=np.float64))
    nb = np.sqrt(np.einsum("ij,ij->i", rb, rb, dtype=np.float64))
    norms = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = 1.0 - dot / norms
    empty = norms == 0
    out[empty] = np.where(na[empty] == nb[empty], 0.0, 1.0)
    return out


def scan_nearest(
    queries: np.ndarray, rows: np.ndarray, k: int, factor: float = 1.0, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest rows of each query by a full scan, one chunk of rows at a time
    (a memmap is never read whole): a float32 pass keeps the nearest k + 64 of each query,
    which are scored again in float64. Returns (rows, distances), each (queries, k)."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float64)) * factor
    k = min(k, rows.shape[0])
    keep = min(rows.shape[0], k + 64)
    best = [np.zeros(0, dtype=np.int64) for _ in queries]
    best_d = [np.zeros(0) for _ in queries]
    for start in range(0, rows.shape[0], chunk):
        block = np.asarray(rows[start : start + chunk], dtype=np.float32)
        for j, q in enumerate(queries):
            d = np.concatenate([best_d[j], symmetric_block(q, block, np.float32)])
            r = np.concatenate([best[j], np.arange(start, start + len(block))])
            top = np.argsort(d, kind="stable")[:keep]
            best[j], best_d[j] = r[top], d[top]
    out_rows = np.zeros((len(queries), k), dtype=np.int64)
    out_d = np.zeros((len(queries), k))
    for j, q in enumerate(queries):
        candidates = np.sort(best[j])
        exact = np.concatenate(
            [
                symmetric_block(q, np.asarray(rows[part]))
                for part in np.array_split(candidates, max(1, len(candidates) // chunk))
            ]
        )
        order = np.lexsort((candidates, exact))[:k]
        out_rows[j], out_d[j] = candidates[order], exact[order]
    return out_rows, out_d
