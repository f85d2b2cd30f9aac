"""The learned scorer (MODEL2VEC's idea, sized for a zoo of a few hundred tasks), and its
control with the embeddings dealt out to the wrong tasks.

Its fit reads at most ``FIT_TASKS`` zoo tasks: every task of a smaller zoo, a seeded sample
stratified by domain of a larger one. Only the neighbour searches see the whole zoo, through
its index; a query reads its neighbours' rows of the matrix, the experts' source tasks and
nothing else, so neither the fit nor a ranking grows with the zoo beyond the index's search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.task2vec.distances import DEFAULT_ALPHA, complexity, symmetric
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError, Task2VecError
from app.zoo.index import log_transform
from app.zoo.recommenders.base import (
    Query,
    Ranked,
    Recommender,
    need_embedding,
    ranked,
    standardised,
)
from app.zoo.recommenders.neighbours import Task2VecKNN
from app.zoo.recommenders.registry import register
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import Zoo

#: The most zoo tasks the scorer is fitted on. 2,000 tasks give each expert's weights
#: (2 + ``components`` of them) hundreds of rows per domain, while the fit's reads, its
#: principal axes and its ridge cost the same at 100,000 tasks as at 2,000.
FIT_TASKS = 2000

#: Embeddings log-transformed at once: bounds the float64 copy the transform makes.
_CHUNK = 256


def task_descriptors(embedding: Embedding) -> np.ndarray:
    """What a task's embedding file says about its size: log images, log classes."""
    images = float(embedding.meta.get("num_images") or embedding.meta.get("samples") or 1)
    classes = float(embedding.meta.get("num_classes") or 2)
    return np.array([np.log(images), np.log(classes)])


def _domain(task: TaskSpec) -> str:
    """The task's domain; one stratum ("") for tasks whose recipe names none this build knows."""
    try:
        return task.domain
    except Task2VecError:
        return ""


def _quotas(sizes: list[int], places: int) -> list[int]:
    """``places`` shared in proportion to ``sizes`` (largest remainders, ties to the first),
    in integers, so that no share exceeds its size when ``places`` <= their sum."""
    total = sum(sizes)
    quotas = [size * places // total for size in sizes]
    remainders = [size * places % total for size in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))
    for i in order[: places - sum(quotas)]:
        quotas[i] += 1
    return quotas


def fit_sample(zoo: Zoo, limit: int = FIT_TASKS, seed: int = 0) -> list[int]:
    """The tasks the scorer is fitted on, in zoo order: every task when there are at most
    ``limit``; otherwise ``limit`` of them drawn with ``seed``, each domain given its share
    of the zoo (so a small domain is neither lost nor over-weighted)."""
    if limit < 2:
        raise ConfigError(f"the learned scorer needs at least 2 tasks to fit on, not {limit}")
    n = len(zoo.tasks)
    if n <= limit:
        return list(range(n))
    strata: dict[str, list[int]] = {}
    for i, task in enumerate(zoo.tasks):
        strata.setdefault(_domain(task), []).append(i)
    domains = sorted(strata)
    quotas = _quotas([len(strata[d]) for d in domains], limit)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.array(strata[d]), q, replace=False)
        for d, q in zip(domains, quotas, strict=True)
    ]
    return sorted(int(i) for part in chosen for i in part)


def _log_embeddings(embeddings: Sequence[Embedding]) -> np.ndarray:
    """(tasks, dim) ``log_transform`` of the embeddings, a chunk at a time (row by row the
    same values as one call)."""
    out = np.empty((len(embeddings), embeddings[0].dim), dtype=np.float32)
    for start in range(0, len(embeddings), _CHUNK):
        part = embeddings[start : start + _CHUNK]
        out[start : start + len(part)] = log_transform(np.stack([e.hessian for e in part]))
    return out


def _principal_axes(centred: np.ndarray, components: int) -> np.ndarray:
    """(dim, components): the leading right singular vectors of ``centred`` (tasks × dim),
    each divided by its singular value.

    From the eigenvectors of the tasks' Gram matrix rather than an SVD of the matrix itself:
    with a few hundred tasks of 17k–42k dimensions that is one (tasks × tasks) product, about
    30 times faster than the SVD (1.95 s against 0.06 s for 150 × 42,016 on one core), and
    the same axes to rounding (a sign may flip, which the ridge absorbs)."""
    values, vectors = np.linalg.eigh(centred @ centred.T)
    top = np.argsort(values)[::-1][:components]
    singular = np.sqrt(np.clip(values[top], 0.0, None))
    safe = np.where(singular > 0, singular, 1.0)
    axes: np.ndarray = (centred.T @ vectors[:, top]) / safe**2
    return axes


def _randomized_axes(centred: np.ndarray, components: int, seed: int) -> np.ndarray:
    """``_principal_axes`` by a seeded randomized SVD: for a sample of thousands of tasks,
    whose Gram matrix would cost (tasks² × dim), this costs (tasks × dim × ~components)."""
    from sklearn.utils.extmath import randomized_svd

    _, singular, vt = randomized_svd(centred, components, random_state=seed)
    safe = np.where(singular > 0, singular, 1.0)
    axes: np.ndarray = vt.T / safe
    return axes


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

    The model is a ridge regression fit on the tasks of ``fit_sample`` (every zoo task up to
    ``fit_tasks``), each with itself left out of its own neighbour features; the neighbours
    are searched among all the zoo's tasks.
    """

    def __init__(
        self,
        zoo: Zoo,
        k: int = 5,
        ridge: float = 1.0,
        components: int = 4,
        fit_tasks: int = FIT_TASKS,
        seed: int = 0,
    ) -> None:
        from sklearn.linear_model import Ridge

        self.zoo = zoo
        floors = np.array([[zoo.protocol.resolution(t.size)] for t in zoo.tasks])
        self.target = standardised(np.log(zoo.errors + floors))
        self.knn = Task2VecKNN(zoo, k, scores=self.target)
        names = {t.name: i for i, t in enumerate(zoo.tasks)}
        self.sources = [names.get(e.source_task or "") for e in zoo.experts]
        #: The experts' source tasks' embeddings, read once: a query reads no zoo embedding.
        self._source_embeddings = {s: zoo.embeddings[s] for s in self.sources if s is not None}
        # α·d_sym(source, t0) of each source: the target-independent half of d_asym.
        self._complexity = {
            s: DEFAULT_ALPHA * complexity(e) for s, e in self._source_embeddings.items()
        }
        #: The zoo tasks the model is fitted on (all of them up to ``fit_tasks``).
        self.sample = fit_sample(zoo, fit_tasks, seed)
        embeddings = [zoo.embeddings[j] for j in self.sample]
        self._fit_view(embeddings, components, seed)

        x = np.vstack([self.features(e, [j]) for j, e in zip(self.sample, embeddings, strict=True)])
        y = np.concatenate([self.target[j] for j in self.sample])
        self.model = Ridge(alpha=ridge).fit(x, y)

    def _fit_view(self, embeddings: list[Embedding], components: int, seed: int) -> None:
        """The task view's scales and principal axes, from the fitted tasks' embeddings: the
        exact axes when they are the whole zoo, a randomized SVD's when a sample."""
        descriptors = np.stack([task_descriptors(e) for e in embeddings])
        self._descriptor_mean = descriptors.mean(axis=0)
        self._descriptor_std = descriptors.std(axis=0) + 1e-9
        logs = _log_embeddings(embeddings)
        self._mean = logs.mean(axis=0)
        logs -= self._mean
        components = min(components, len(embeddings) - 1)
        if len(embeddings) == len(self.zoo.tasks):
            axes = _principal_axes(logs, components)
        else:
            axes = _randomized_axes(logs, components, seed)
        # Unit variance per component over the fitted tasks.
        self._basis = axes * np.sqrt(len(embeddings))

    def _task_view(self, embedding: Embedding) -> np.ndarray:
        descriptors = (task_descriptors(embedding) - self._descriptor_mean) / self._descriptor_std
        projected = (log_transform(embedding.hessian)[0] - self._mean) @ self._basis
        return np.concatenate([descriptors, projected])

    def features(self, embedding: Embedding, hidden: list[int]) -> np.ndarray:
        """(experts, features) for one task, never looking at the rows in ``hidden``."""
        knn_error, _ = self.knn.weighted_errors(embedding, hidden)
        n_experts = len(self.zoo.experts)
        asym, has_source = np.zeros(n_experts), np.zeros(n_experts)
        distances = {s: symmetric(e, embedding) for s, e in self._source_embeddings.items()}
        for e, source in enumerate(self.sources):
            if source is not None:
                asym[e] = distances[source] - self._complexity[source]
                has_source[e] = 1.0
        identity = np.eye(n_experts)
        view = self._task_view(embedding)
        per_expert = (identity[:, :, None] * view[None, None, :]).reshape(n_experts, -1)
        return np.column_stack([knn_error, asym, has_source, identity, per_expert])

    def __call__(self, zoo: Zoo, query: Query) -> list[Ranked]:
        embedding = need_embedding(query, "learned")
        predicted = self.model.predict(self.features(embedding, []))
        evidence = [{"predicted_standardised_log_error": float(p)} for p in predicted]
        return ranked(zoo, -predicted, evidence)


@register(
    "learned",
    summary="a ridge model of each expert's standardised log-error from the task's embedding",
    needs="embedding",
    runs="api",
)
def _learned(zoo: Zoo, k: int) -> Recommender:
    return LearnedScorer(zoo, k)


def shuffled_embeddings(zoo: Zoo, seed: int = 0) -> Zoo:
    """The zoo with its embeddings permuted so that no task keeps its own (a derangement)."""
    n = len(zoo.tasks)
    rng = np.random.default_rng(seed)
    order = np.arange(n)
    while n > 1 and np.any(order == np.arange(n)):
        order = rng.permutation(n)
    return Zoo(
        zoo.embed_config,
        zoo.tasks,
        [zoo.embeddings[i] for i in order],
        zoo.experts,
        zoo.errors,
        zoo.protocol,
    )


@register(
    "learned-shuffled",
    summary="the learned scorer fit with every zoo task given another's embedding: what it "
    "scores without task information (a control)",
    needs="embedding",
    runs="evaluation",
)
def _shuffled(zoo: Zoo, k: int) -> Recommender:
    scorer = LearnedScorer(shuffled_embeddings(zoo), k)

    def control(zoo: Zoo, query: Query) -> list[Ranked]:
        return scorer(scorer.zoo, query)

    return control
