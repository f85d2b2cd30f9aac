"""Methods that look at the uploaded images through the experts: LogME on every expert's
features, and brute force (every expert trained and tested with the zoo's protocol)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from app.task2vec.datasets import LabelledImages
from app.zoo.features import extract_many
from app.zoo.matrix import holdout_error
from app.zoo.recommenders.base import Query, Ranked, Recommender, need_data, ranked
from app.zoo.recommenders.registry import register
from app.zoo.zoo import Zoo

_SMALLEST_ALPHA = 1e-12


def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 11) -> float:
    """LogME (You et al., ICML 2021): mean log evidence per sample of a Bayesian linear model.

    One SVD of the features, then a fixed-point iteration on (α, β) per one-hot label column.
    The log-determinant counts all D eigenvalues of A = αI + βFᵀF, including the D − k equal
    to α when there are fewer samples than dimensions.
    """
    f = features.astype(np.float64)
    n, dim = f.shape
    with threadpool_limits(limits=1, user_api="blas"):  # see matrix.holdout_error
        u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        z2 = (u.T @ y) ** 2
        outside = float(y @ y - z2.sum())
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
            res2 = float((z2 / (1 + sigma / t) ** 2).sum() + max(outside, 0.0))
            # Features with no variance (a dead expert, a constant image set) give γ = 0 and
            # would drive α to 0 and α/β to 0/0; the floor keeps the evidence finite (it is
            # independent of α then) and never binds on features that carry anything.
            alpha = max(gamma / (m2 + 1e-5), _SMALLEST_ALPHA)
            beta = (n - gamma) / (res2 + 1e-5)
        evidences.append(_log_evidence(sigma, z2, outside, n, dim, alpha, beta) / n)
    return float(np.mean(evidences))


def _log_evidence(
    sigma: np.ndarray, z2: np.ndarray, outside: float, n: int, dim: int, alpha: float, beta: float
) -> float:
    """log p(y | F, α, β) from the SVD of F (σ = squared singular values, z = Uᵀy)."""
    t = alpha / beta
    m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
    res2 = float((z2 / (1 + sigma / t) ** 2).sum() + max(outside, 0.0))
    log_det = float(np.log(alpha + beta * sigma).sum()) + (dim - sigma.shape[0]) * np.log(alpha)
    return float(
        dim / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det / 2
    )


def _expert_features(zoo: Zoo, data: LabelledImages) -> Iterator[np.ndarray]:
    """Every expert's features of ``data``, in the zoo's expert order (one pass over it)."""
    yield from extract_many([(e, zoo.expert_model(i)) for i, e in enumerate(zoo.experts)], data)


def logme_recommender(zoo: Zoo, query: Query) -> list[Ranked]:
    """LogME on every expert's features of the query's images (one forward pass each), or
    the scores the query carries already."""
    if query.logme is not None:
        known = np.array([query.logme[e.name] for e in zoo.experts])
        return ranked(zoo, known, [{"logme": float(v)} for v in known])
    data = need_data(query, "logme")
    scores, evidence = [], []
    for features in _expert_features(zoo, data):
        scores.append(logme(features, data.labels))
        evidence.append({"logme": scores[-1], "feature_dim": int(features.shape[1])})
    return ranked(zoo, np.array(scores), evidence)


def brute_force(zoo: Zoo, query: Query) -> list[Ranked]:
    """Evaluate every expert on the query with the zoo's protocol: the oracle."""
    data = need_data(query, "brute-force")
    errors = [
        holdout_error(features, data.labels, zoo.protocol)
        for features in _expert_features(zoo, data)
    ]
    return ranked(zoo, -np.array(errors), [{"error": e} for e in errors])


@register(
    "logme",
    summary="LogME (You et al. 2021) of every expert's features of the uploaded images",
    needs="images",
    runs="worker",
)
def _logme(zoo: Zoo, k: int) -> Recommender:
    return logme_recommender


@register(
    "brute-force",
    summary="every expert trained and tested on the uploaded images with the zoo's protocol",
    needs="images",
    runs="worker",
    oracle=True,
)
def _brute_force(zoo: Zoo, k: int) -> Recommender:
    return brute_force
