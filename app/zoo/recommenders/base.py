"""What every recommender takes and gives: the query, and a ranking of experts with evidence."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo.zoo import Zoo


@dataclass(frozen=True)
class Query:
    """What is known of the task to rank experts for.

    ``embedding`` and ``data`` are what a user's upload gives. ``logme`` holds LogME scores by
    expert name already computed on ``data`` (the evaluation reads them from the zoo's matrix
    instead of extracting every expert's features again); a method that needs an expert's
    LogME takes it from here when present. ``domain`` and ``source`` are labels that only the
    evaluation knows (a user's upload has neither): the baselines that read them measure
    what knowing the domain is worth, which an embedding must beat to earn its keep.
    """

    embedding: Embedding | None = None
    data: LabelledImages | None = None
    logme: Mapping[str, float] | None = None
    domain: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Ranked:
    expert: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


#: A recommender fitted on a zoo: (the zoo it ranks the experts of, the query) → ranking.
Recommender = Callable[[Zoo, Query], list[Ranked]]


def ranked(zoo: Zoo, scores: np.ndarray, evidence: list[dict[str, Any]]) -> list[Ranked]:
    """Every expert of ``zoo``, best (highest score) first; ties keep the zoo's order."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [Ranked(zoo.experts[i].name, float(scores[i]), evidence[i]) for i in order]


def standardised(errors: np.ndarray) -> np.ndarray:
    """Per task (row): errors as z-scores across experts, so easy and hard tasks weigh alike."""
    spread = errors.std(axis=1, keepdims=True)
    z: np.ndarray = (errors - errors.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1)
    return z


def mean_ranks(errors: np.ndarray) -> np.ndarray:
    """Each expert's mean rank (1 = best) over the rows of ``errors``; ties keep expert order."""
    ranks = np.argsort(np.argsort(errors, axis=1, kind="stable"), axis=1) + 1
    means: np.ndarray = ranks.mean(axis=0)
    return means


def need_embedding(query: Query, method: str) -> Embedding:
    if query.embedding is None:
        raise ConfigError(f"the {method} recommender needs the task's embedding")
    return query.embedding


def need_data(query: Query, method: str) -> LabelledImages:
    if query.data is None:
        raise ConfigError(f"the {method} recommender needs the task's images")
    return query.data
