"""Methods that read the query's nearest zoo tasks: k-NN over the symmetric distance, 1-NN,
and the asymmetric distance from each expert's source task."""

from __future__ import annotations

import numpy as np

from app.task2vec.distances import DEFAULT_ALPHA, asymmetric
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo.index import Neighbour
from app.zoo.recommenders.base import (
    Query,
    Ranked,
    Recommender,
    need_embedding,
    ranked,
    standardised,
)
from app.zoo.recommenders.registry import register
from app.zoo.zoo import Zoo


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
        self.z = standardised(zoo.errors) if scores is None else scores

    def weighted_errors(
        self, embedding: Embedding, hidden: list[int]
    ) -> tuple[np.ndarray, list[Neighbour]]:
        """Per expert: distance-weighted standardised error on the nearest visible tasks."""
        neighbours = self.index.search(embedding, self.k, exclude=hidden)
        weights = np.array([1.0 / (n.distance + 1e-3) for n in neighbours])
        rows = [n.id for n in neighbours]
        return (weights[:, None] * self.z[rows]).sum(axis=0) / weights.sum(), neighbours

    def __call__(self, zoo: Zoo, query: Query) -> list[Ranked]:
        embedding = need_embedding(query, "task2vec-knn")
        errors, neighbours = self.weighted_errors(embedding, [])
        rows = [n.id for n in neighbours]
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
        return ranked(zoo, -errors, evidence)


@register(
    "task2vec-knn",
    summary="the experts by their errors on the k nearest zoo tasks (symmetric distance)",
    needs="embedding",
    runs="api",
)
def _knn(zoo: Zoo, k: int) -> Recommender:
    return Task2VecKNN(zoo, k)


@register(
    "1-nn",
    summary="the experts by their errors on the single nearest zoo task",
    needs="embedding",
    runs="evaluation",
)
def _one_nn(zoo: Zoo, k: int) -> Recommender:
    return Task2VecKNN(zoo, 1)


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
    embedding = need_embedding(query, "task2vec-asym")
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


@register(
    "task2vec-asym",
    summary="experts with a zoo source task, by the asymmetric distance source → query",
    needs="embedding",
    runs="api",
)
def _asym(zoo: Zoo, k: int) -> Recommender:
    return task2vec_asym
