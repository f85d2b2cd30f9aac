"""Distances between task embeddings.

* ``symmetric`` — the paper's task distance: cosine distance between h_a/(h_a+h_b) and
  h_b/(h_a+h_b) (named 'cosine' in the reference code). The element-wise normalisation makes
  it depend on both vectors, so FAISS cannot index it directly, and it is not invariant to
  rescaling one side: compare only embeddings made with the same estimator and budget.
* ``asymmetric`` — for model selection, from a source (expert) task a to a target task b:
  d_sym(a, b) − α·d_sym(a, t0), with t0 the trivial embedding (α = 0.15 for ResNet-34). It
  favours source tasks that are more complex than the target, which transfer better.
* ``cosine`` — plain cosine distance of the scale-normalised hessians.
* ``kl``, ``asymmetric_kl``, ``jsd`` — divergences between the Gaussian weight posteriors
  N(0, 1/h) the embeddings describe (useful with the variational method).

Scale normalisation (h/scale) is a no-op for Monte Carlo embeddings (scale = 1) and divides out
the per-layer prior of variational ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from app.task2vec.embedding import Embedding
from app.task2vec.errors import EmbeddingFileError

DEFAULT_ALPHA = 0.15


def check_comparable(a: Embedding, b: Embedding) -> None:
    """Refuse to compare embeddings of different probes, methods or estimators."""
    if a.hessian.shape != b.hessian.shape:
        raise EmbeddingFileError(
            f"embeddings of different sizes ({a.dim} vs {b.dim}): different probes or "
            "skip-layers cannot be compared"
        )
    for key in ("probe", "method", "fisher_estimator", "skip_layers"):
        if key in a.meta and key in b.meta and a.meta[key] != b.meta[key]:
            raise EmbeddingFileError(
                f"embeddings differ in {key} ({a.meta[key]!r} vs {b.meta[key]!r}); distances "
                "are only meaningful between embeddings made the same way"
            )


def _normalised(e: Embedding) -> np.ndarray:
    return e.hessian.astype(np.float64) / e.scale.astype(np.float64)


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0.0 or nv == 0.0:
        return 0.0 if nu == nv else 1.0
    return float(1.0 - np.dot(u, v) / (nu * nv))


#: Filters whose Fisher is zero in both embeddings ("dead" filters: e.g. after a ReLU that
#: never fires on the task's images): "half" counts them as 1/2 on each side, "drop" leaves
#: them out of the cosine, as the reference code does (its 0/0 gives NaN, which it drops).
#: "drop" is the default: on the demo zoo (36% of EfficientNet-Lite0 filters are zero in a
#: task's embedding) the two move distances by 0.13 (median) but rank experts alike; "drop"
#: gave task2vec-knn a slightly higher τ (+0.008) and was never measurably worse.
ZERO_FILTER_CONVENTIONS = ("half", "drop")
_zero_filters: ContextVar[str] = ContextVar("zero_filters", default="drop")


@contextmanager
def zero_filter_convention(name: str) -> Iterator[None]:
    """Compute symmetric distances with convention ``name`` inside the block (for measuring
    one against the other; the default is the one the evaluation found to rank better)."""
    if name not in ZERO_FILTER_CONVENTIONS:
        raise ValueError(
            f"unknown zero-filter convention {name!r}; choose one of: "
            f"{', '.join(ZERO_FILTER_CONVENTIONS)}"
        )
    token = _zero_filters.set(name)
    try:
        yield
    finally:
        _zero_filters.reset(token)


#: Memo of distances inside ``memoised_distances``: key → (distance, the objects the key
#: names, kept alive so that their ids cannot be reused while the memo lives).
_memo: ContextVar[dict[tuple[Any, ...], tuple[float, tuple[object, ...]]] | None] = ContextVar(
    "distance_memo", default=None
)


@contextmanager
def memoised_distances() -> Iterator[None]:
    """Inside the block, a distance between the same two embedding objects is computed once.

    A leave-one-out evaluation asks for the same pairs in every fold (each fold's zoo holds
    the same embedding objects); outside such a block nothing is remembered, so a changed
    embedding can never be answered from a stale value. Memoised values are the ones the
    plain computation returns, bit for bit."""
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


def memoised(kind: str, objects: tuple[object, ...], compute: Callable[[], float]) -> float:
    """``compute()``, remembered under (kind, the objects' identities, the zero-filter
    convention) while ``memoised_distances`` is active."""
    memo = _memo.get()
    if memo is None:
        return compute()
    key = (kind, *map(id, objects), _zero_filters.get())
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (compute(), objects)
    return hit[0]


def _relative(ha: np.ndarray, hb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h_a/(h_a+h_b), h_b/(h_a+h_b), with filters zero in both handled by the convention."""
    total = ha + hb
    empty = total <= 0
    if empty.any() and _zero_filters.get() == "drop":
        ha, hb, total = ha[~empty], hb[~empty], total[~empty]
        empty = np.zeros(total.shape, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        ra = ha / total
    if empty.any():
        ra[empty] = 0.5
    return ra, 1.0 - ra


def symmetric_hessians(ha: np.ndarray, hb: np.ndarray) -> float:
    return _cosine(*_relative(ha, hb))


def symmetric(a: Embedding, b: Embedding) -> float:
    """The paper's symmetric Task2Vec distance (in [0, 1])."""
    return memoised(
        "symmetric",
        (a, b),
        lambda: symmetric_hessians(a.hessian.astype(np.float64), b.hessian.astype(np.float64)),
    )


def trivial_embedding(e: Embedding) -> Embedding:
    """t0: the embedding of a task with no information, i.e. the prior ``scale`` itself.

    For variational embeddings this is where the estimate collapses with too little data; for
    Monte Carlo ones (scale = 1) it is the flat embedding.
    """
    return Embedding(e.scale.copy(), e.scale.copy(), {**e.meta, "trivial": True})


def asymmetric(source: Embedding, target: Embedding, alpha: float = DEFAULT_ALPHA) -> float:
    """d_sym(source, target) − α·d_sym(source, t0): smaller = better source for target."""
    return symmetric(source, target) - alpha * complexity(source)


def complexity(source: Embedding) -> float:
    """d_sym(source, t0): how far the task is from one with no information."""
    return memoised("complexity", (source,), lambda: symmetric(source, trivial_embedding(source)))


def cosine(a: Embedding, b: Embedding) -> float:
    return _cosine(_normalised(a), _normalised(b))


def _variances(a: Embedding, b: Embedding) -> tuple[np.ndarray, np.ndarray]:
    tiny = np.finfo(np.float64).tiny
    var_a: np.ndarray = 1.0 / np.maximum(_normalised(a), tiny)
    var_b: np.ndarray = 1.0 / np.maximum(_normalised(b), tiny)
    return var_a, var_b


def _kl_terms(var0: np.ndarray, var1: np.ndarray) -> np.ndarray:
    """KL(N(0, var0) || N(0, var1)) per coordinate."""
    terms: np.ndarray = 0.5 * (var0 / var1 - 1.0 + np.log(var1) - np.log(var0))
    return terms


def asymmetric_kl(a: Embedding, b: Embedding) -> float:
    var_a, var_b = _variances(a, b)
    return float(_kl_terms(var_a, var_b).sum())


def kl(a: Embedding, b: Embedding) -> float:
    var_a, var_b = _variances(a, b)
    return float(np.maximum(_kl_terms(var_a, var_b), _kl_terms(var_b, var_a)).sum())


def jsd(a: Embedding, b: Embedding) -> float:
    var_a, var_b = _variances(a, b)
    mid = 0.5 * (var_a + var_b)
    return float((0.5 * (_kl_terms(var_a, mid) + _kl_terms(var_b, mid))).mean())


METRICS: dict[str, Callable[[Embedding, Embedding], float]] = {
    "symmetric": symmetric,
    "asymmetric": asymmetric,
    "cosine": cosine,
    "kl": kl,
    "asymmetric_kl": asymmetric_kl,
    "jsd": jsd,
}


def distance(
    a: Embedding, b: Embedding, metric: str = "symmetric", alpha: float = DEFAULT_ALPHA
) -> float:
    """Distance from ``a`` to ``b`` by name, after checking that they are comparable."""
    check_comparable(a, b)
    if metric == "asymmetric":
        return asymmetric(a, b, alpha)
    try:
        fn = METRICS[metric]
    except KeyError:
        raise EmbeddingFileError(
            f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}"
        ) from None
    return fn(a, b)


def distance_matrix(
    embeddings: list[Embedding], metric: str = "symmetric", alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Row i, column j: distance from embedding i to embedding j."""
    n = len(embeddings)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = distance(embeddings[i], embeddings[j], metric, alpha)
    return out
