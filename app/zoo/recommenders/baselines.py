"""Baselines that keep a benchmark honest: answers that read nothing of the query's images.

``global-best`` and ``largest-expert`` know nothing of the task at all; ``domain-best`` and
``source-best`` know its domain or image source, labels the evaluation has and a user's upload
does not. An embedding-based method that cannot beat knowing the domain is a domain
classifier, not a task embedding.
"""

from __future__ import annotations

import numpy as np

from app.task2vec.errors import ConfigError
from app.zoo.recommenders.base import Query, Ranked, Recommender, mean_ranks, ranked
from app.zoo.recommenders.registry import register
from app.zoo.zoo import Zoo


def _by_mean_rank(zoo: Zoo, rows: list[int], label: str | None) -> list[Ranked]:
    means = mean_ranks(zoo.errors[rows])
    of = {} if label is None else {"of": label}
    evidence = [{"mean_rank": float(r), "tasks": len(rows), **of} for r in means]
    return ranked(zoo, -means, evidence)


def global_best(zoo: Zoo, query: Query) -> list[Ranked]:
    """The expert with the best mean rank over the zoo's tasks, whatever the query."""
    return _by_mean_rank(zoo, list(range(len(zoo.tasks))), None)


@register(
    "global-best",
    summary="the experts by their mean rank over every zoo task, whatever the data",
    needs="nothing",
    runs="api",
)
def _global_best(zoo: Zoo, k: int) -> Recommender:
    return global_best


@register(
    "largest-expert",
    summary="the experts by parameter count, largest first (data-blind)",
    needs="nothing",
    runs="evaluation",
)
def _largest(zoo: Zoo, k: int) -> Recommender:
    def largest(zoo: Zoo, query: Query) -> list[Ranked]:
        sizes = np.array([zoo.expert_parameters(e) for e in range(len(zoo.experts))], float)
        return ranked(zoo, np.log10(sizes), [{"parameters": int(s)} for s in sizes])

    return largest


def _label_best(label: str) -> Recommender:
    def best(zoo: Zoo, query: Query) -> list[Ranked]:
        value = getattr(query, label)
        if value is None:
            raise ConfigError(f"{label}-best needs the task's {label} label")
        rows = [t for t, task in enumerate(zoo.tasks) if getattr(task, label) == value]
        # No zoo task of that label (its domain is held out): knowing it is worth nothing.
        return _by_mean_rank(zoo, rows, value) if rows else global_best(zoo, query)

    return best


@register(
    "domain-best",
    summary="the experts by mean rank over the zoo tasks of the query's domain (a label)",
    needs="label",
    runs="evaluation",
)
def _domain_best(zoo: Zoo, k: int) -> Recommender:
    return _label_best("domain")


@register(
    "source-best",
    summary="the experts by mean rank over the zoo tasks of the query's image source (a label)",
    needs="label",
    runs="evaluation",
)
def _source_best(zoo: Zoo, k: int) -> Recommender:
    return _label_best("source")
