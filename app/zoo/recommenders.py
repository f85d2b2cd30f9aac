"""Recommenders: rank a zoo's experts for a new task, all behind one interface.

Each takes the zoo, the query (its Task2Vec embedding, and its images for the methods that
need them) and returns every expert it can rank, best first, with a score (higher is better)
and the evidence behind it. A recommender sees only the zoo it is given: evaluation holds
tasks out by handing it a ``Zoo.subset`` without them and without their experts, so nothing
here needs to know which task a query came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from app.task2vec.datasets import LabelledImages
from app.task2vec.distances import DEFAULT_ALPHA, asymmetric, complexity, symmetric
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo.features import extract_many
from app.zoo.index import Neighbour, log_transform
from app.zoo.matrix import holdout_error
from app.zoo.zoo import Zoo


@dataclass(frozen=True)
class Query:
    embedding: Embedding | None = None
    data: LabelledImages | None = None


@dataclass(frozen=True)
class Ranked:
    expert: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


def _standardised(errors: np.ndarray) -> np.ndarray:
    """Per task (row): errors as z-scores across experts, so easy and hard tasks weigh alike."""
    spread = errors.std(axis=1, keepdims=True)
    z: np.ndarray = (errors - errors.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1)
    return z


def ranked(zoo: Zoo, scores: np.ndarray, evidence: list[dict[str, Any]]) -> list[Ranked]:
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [Ranked(zoo.experts[i].name, float(scores[i]), evidence[i]) for i in order]


def _need_embedding(query: Query, method: str) -> Embedding:
    if query.embedding is None:
        raise ConfigError(f"the {method} recommender needs the task's embedding")
    return query.embedding


def _need_data(query: Query, method: str) -> LabelledImages:
    if query.data is None:
        raise ConfigError(f"the {method} recommender needs the task's images")
    return query.data


def global_best(zoo: Zoo, query: Query) -> list[Ranked]:
    """The expert with the best mean rank over the zoo's tasks, whatever the query."""
    ranks = np.argsort(np.argsort(zoo.errors, axis=1, kind="stable"), axis=1) + 1
    mean_rank = ranks.mean(axis=0)
    evidence = [{"mean_rank": float(r), "tasks": len(zoo.tasks)} for r in mean_rank]
    return ranked(zoo, -mean_rank, evidence)


class Task2VecKNN:
    """Experts ranked by their errors on the k nearest zoo tasks (symmetric distance).

    Errors are standardised per task and averaged with weights 1/(distance + ε), so the
    nearest tasks count most and a hard neighbour does not drown an easy one.
    """

    def __init__(self, zoo: Zoo, k: int = 5, scores: np.ndarray | None = None) -> None:
        """``scores``: the (tasks, experts) matrix to average over neighbours; by default the
        zoo's errors standardised per task."""
        self.zoo, self.k = zoo, k
        self.index = zoo.index()
        self.z = _standardised(zoo.errors) if scores is None else scores

    def weighted_errors(
        self, embedding: Embedding, hidden: list[int]
    ) -> tuple[np.ndarray, list[Neighbour]]:
        """Per expert: distance-weighted standardised error on the nearest visible tasks."""
        neighbours = self.index.search(embedding, self.k, exclude=hidden)
        weights = np.array([1.0 / (n.distance + 1e-3) for n in neighbours])
        rows = [n.id for n in neighbours]
        return (weights[:, None] * self.z[rows]).sum(axis=0) / weights.sum(), neighbours

    def __call__(self, zoo: Zoo, query: Query) -> list[Ranked]:
        embedding = _need_embedding(query, "task2vec-knn")
        errors, neighbours = self.weighted_errors(embedding, [])
        rows = [n.id for n in neighbours]
        scores = -errors
        near = [
            {"task": zoo.tasks[n.id].name, "distance": round(n.distance, 4)} for n in neighbours
        ]
        evidence = [
            {
                "neighbours": [
                    {**near[j], "error": float(zoo.errors[rows[j], e])} for j in range(len(rows))
                ]
            }
            for e in range(len(zoo.experts))
        ]
        return ranked(zoo, scores, evidence)


#: Asymmetric distances closer than this are treated as ties. The demo embedding's seed noise
#: (the distance between two embeddings of one task) is about 0.09, so a smaller gap is not
#: evidence that one source task is nearer than another.
ASYM_TIE_TOLERANCE = 0.05


def task2vec_asym(
    zoo: Zoo,
    query: Query,
    alpha: float = DEFAULT_ALPHA,
    tolerance: float = ASYM_TIE_TOLERANCE,
) -> list[Ranked]:
    """Experts with a zoo source task, by the asymmetric distance source → target.

    The distance tells source tasks apart, not experts: experts trained on one task (or on
    tasks within ``tolerance`` of each other) tie, and a tie goes to the larger expert (more
    parameters). The score is minus the distance of the tie group's leader, lowered by a
    fraction of ``tolerance`` per place within the group, so it stays in ranking order.
    """
    embedding = _need_embedding(query, "task2vec-asym")
    names = {t.name: i for i, t in enumerate(zoo.tasks)}
    distances: dict[int, float] = {}
    for e, expert in enumerate(zoo.experts):
        if expert.source_task in names:
            source = zoo.embeddings[names[expert.source_task]]
            distances[e] = asymmetric(source, embedding, alpha)
    if not distances:
        raise ConfigError("no expert of this zoo has a source task among its tasks")
    remaining = sorted(distances, key=lambda e: (distances[e], e))
    ranking = []
    while remaining:
        lead = distances[remaining[0]]
        group = [e for e in remaining if distances[e] <= lead + tolerance]
        group.sort(key=lambda e: (-zoo.expert_parameters(e), distances[e], e))
        for place, e in enumerate(group):
            evidence = {
                "source_task": zoo.experts[e].source_task,
                "asymmetric_distance": distances[e],
                "parameters": zoo.expert_parameters(e),
            }
            score = -(lead + tolerance * place / len(group))
            ranking.append(Ranked(zoo.experts[e].name, score, evidence))
        remaining = [e for e in remaining if e not in group]
    return ranking


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
            alpha = gamma / (m2 + 1e-5)
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
    """LogME on every expert's features of the query's images (one forward pass each)."""
    data = _need_data(query, "logme")
    scores, evidence = [], []
    for features in _expert_features(zoo, data):
        scores.append(logme(features, data.labels))
        evidence.append({"logme": scores[-1], "feature_dim": int(features.shape[1])})
    return ranked(zoo, np.array(scores), evidence)


def brute_force(zoo: Zoo, query: Query) -> list[Ranked]:
    """Evaluate every expert on the query with the zoo's protocol: the oracle."""
    data = _need_data(query, "brute-force")
    errors = [
        holdout_error(features, data.labels, zoo.protocol)
        for features in _expert_features(zoo, data)
    ]
    return ranked(zoo, -np.array(errors), [{"error": e} for e in errors])


Recommender = Callable[[Zoo, Query], list[Ranked]]


def recommenders(zoo: Zoo, k: int = 5) -> dict[str, Recommender]:
    """Every recommender for ``zoo`` by name (``learned`` joins when trained)."""
    return {
        "global-best": global_best,
        "task2vec-knn": Task2VecKNN(zoo, k),
        "task2vec-asym": task2vec_asym,
        "logme": logme_recommender,
        "brute-force": brute_force,
    }


def task_descriptors(embedding: Embedding) -> np.ndarray:
    """What a task's embedding file says about its size: log images, log classes."""
    images = float(embedding.meta.get("num_images") or embedding.meta.get("samples") or 1)
    classes = float(embedding.meta.get("num_classes") or 2)
    return np.array([np.log(images), np.log(classes)])


class LearnedScorer:
    """A learned scorer in the spirit of MODEL2VEC, trained on the zoo without the query.

    For a (task, expert) pair it predicts the expert's standardised log-error on the task
    (log-errors floored at one held-out image, standardised across experts per task: the
    relative scale the paper's error-increase metric uses) from:

    * the distance-weighted errors of the expert on the task's k nearest zoo tasks;
    * the asymmetric distance from the expert's source task, when it has one;
    * a per-expert bias (MODEL2VEC's b_i);
    * per-expert weights on a low-dimensional view of the task: its size and class count
      (from the embedding's metadata) and its first ``components`` principal components among
      the zoo's log-embeddings. This is MODEL2VEC's learned expert vector acting on the task
      embedding, in a rank-``components`` form that 65 tasks can fit.

    The model is a ridge regression fit on every zoo task, each with itself left out of its
    own neighbour features.
    """

    def __init__(self, zoo: Zoo, k: int = 5, ridge: float = 1.0, components: int = 4) -> None:
        from sklearn.linear_model import Ridge

        self.zoo = zoo
        floors = np.array([[zoo.protocol.resolution(t.size)] for t in zoo.tasks])
        self.target = _standardised(np.log(zoo.errors + floors))
        self.knn = Task2VecKNN(zoo, k, scores=self.target)
        names = {t.name: i for i, t in enumerate(zoo.tasks)}
        self.sources = [names.get(e.source_task or "") for e in zoo.experts]
        # α·d_sym(source, t0) of each source: the target-independent half of d_asym.
        self._complexity = {
            s: DEFAULT_ALPHA * complexity(zoo.embeddings[s]) for s in self.sources if s is not None
        }
        rows = list(range(len(zoo.tasks)))

        descriptors = np.stack([task_descriptors(zoo.embeddings[j]) for j in rows])
        self._descriptor_mean = descriptors.mean(axis=0)
        self._descriptor_std = descriptors.std(axis=0) + 1e-9
        logs = log_transform(np.stack([zoo.embeddings[j].hessian for j in rows]))
        self._mean = logs.mean(axis=0)
        _, singular, vt = np.linalg.svd(logs - self._mean, full_matrices=False)
        components = min(components, len(rows) - 1)
        # Unit variance per component over the zoo's tasks.
        self._basis = (vt[:components].T / singular[:components]) * np.sqrt(len(rows))

        x = np.vstack([self.features(zoo.embeddings[j], [j]) for j in rows])
        y = np.concatenate([self.target[j] for j in rows])
        self.model = Ridge(alpha=ridge).fit(x, y)

    def _task_view(self, embedding: Embedding) -> np.ndarray:
        descriptors = (task_descriptors(embedding) - self._descriptor_mean) / self._descriptor_std
        projected = (log_transform(embedding.hessian)[0] - self._mean) @ self._basis
        return np.concatenate([descriptors, projected])

    def features(self, embedding: Embedding, hidden: list[int]) -> np.ndarray:
        """(experts, features) for one task, never looking at the rows in ``hidden``."""
        knn_error, _ = self.knn.weighted_errors(embedding, hidden)
        n_experts = len(self.zoo.experts)
        asym, has_source = np.zeros(n_experts), np.zeros(n_experts)
        for e, source in enumerate(self.sources):
            if source is not None:
                d = symmetric(self.zoo.embeddings[source], embedding)
                asym[e] = d - self._complexity[source]
                has_source[e] = 1.0
        identity = np.eye(n_experts)
        view = self._task_view(embedding)
        per_expert = (identity[:, :, None] * view[None, None, :]).reshape(n_experts, -1)
        return np.column_stack([knn_error, asym, has_source, identity, per_expert])

    def __call__(self, zoo: Zoo, query: Query) -> list[Ranked]:
        embedding = _need_embedding(query, "learned")
        predicted = self.model.predict(self.features(embedding, []))
        evidence = [{"predicted_standardised_log_error": float(p)} for p in predicted]
        return ranked(zoo, -predicted, evidence)
