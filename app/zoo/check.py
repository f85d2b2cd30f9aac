"""Outside checks: how well each recommender ranks a zoo's experts for datasets the zoo never saw.

The in-zoo protocols (``evaluate.py``) hold tasks out of the zoo; this check takes labelled
datasets that were never in it — a team's own data, or Fashion-MNIST's test split, which no zoo
task and no expert touches — and scores every recommender's ranking against brute force: every
expert evaluated on the dataset with the zoo's own protocol (the fixed-feature logistic
regression and split of the performance matrix). It is the check to run on one's own data
before trusting the rankings, and it needs nothing but the datasets and a built zoo.

The datasets must not share images with the zoo's tasks or the experts' training sets; the
check cannot know, so that is the caller's promise (Fashion-MNIST's t10k keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import embed
from app.zoo import recommenders
from app.zoo.evaluate import Progress, ranking_metrics, summarise, versus, with_logme
from app.zoo.features import extract_features
from app.zoo.folds import shared_images
from app.zoo.intervals import ErrorIntervals, coverage, interval_summary
from app.zoo.matrix import holdout_error
from app.zoo.novelty import Novelty
from app.zoo.recommenders import Query, Recommender, logme
from app.zoo.zoo import Zoo

#: Every method of the evaluation but the label baselines: an outside dataset has no zoo label.
CHECK_METHODS = tuple(
    m for m in recommenders.evaluated() if recommenders.method(m).needs != "label"
)


def _ground_truth(
    zoo: Zoo, data: LabelledImages, with_logme: bool
) -> tuple[dict[str, float], dict[str, float] | None, float]:
    """Every expert's held-out error on ``data``, its LogME score (when asked) and the seconds
    LogME took.

    Features are extracted once per expert and serve both; LogME's seconds include the forward
    passes, which it needs and the embedding-based recommenders do not."""
    errors: dict[str, float] = {}
    scores: dict[str, float] = {}
    seconds = 0.0
    for e, expert in enumerate(zoo.experts):
        started = time.perf_counter()
        features = extract_features(expert, zoo.expert_model(e), data)
        if with_logme:
            scores[expert.name] = logme(features, data.labels)
            seconds += time.perf_counter() - started
        errors[expert.name] = holdout_error(features, data.labels, zoo.protocol)
    return errors, scores if with_logme else None, seconds


def _scored(
    zoo: Zoo,
    recommend: Recommender,
    query: Query,
    errors: dict[str, float],
    floor: float,
    logme_seconds: float,
) -> dict[str, Any]:
    """One method's ranking for one dataset, scored against brute force (``errors``, whose
    differences below ``floor`` the split cannot resolve).

    The seconds include LogME's share of the forward passes the method asked for: an expert
    scored by LogME had to be run over the dataset, which the embedding-only methods skip."""
    started = time.perf_counter()
    ranking = recommend(zoo, query)
    seconds = time.perf_counter() - started
    passes = sum("logme" in r.evidence for r in ranking)
    return {
        "pick": ranking[0].expert,
        **ranking_metrics(errors, floor, ranking),
        "seconds": seconds + logme_seconds * passes / len(zoo.experts),
        "forward_passes": passes,
    }


def _check_arguments(datasets: Mapping[str, LabelledImages], methods: tuple[str, ...]) -> None:
    unknown = set(methods) - set(CHECK_METHODS)
    if unknown:
        raise ValueError(
            f"unknown recommenders: {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(CHECK_METHODS)}"
        )
    if not datasets:
        raise ValueError("an outside check needs at least one labelled dataset")


def check(
    zoo: Zoo,
    datasets: Mapping[str, LabelledImages],
    methods: tuple[str, ...] = CHECK_METHODS,
    k: int = 5,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Each method's ranking of ``zoo``'s experts for each dataset, scored against brute force.

    Returns the summary per method (the figures of ``evaluate``: relative error increase,
    regret in points, weighted τ, top-1, seconds per recommendation), one row per dataset and
    method, every expert's true error on every dataset, and how many of those errors the
    predicted-error intervals hold (``intervals``)."""
    _check_arguments(datasets, methods)
    zoo = with_logme(zoo)
    made = {m: recommenders.build(m, zoo, k) for m in methods}
    shared = shared_images(zoo)
    novelty, intervals = Novelty.fit(zoo, shared), ErrorIntervals(zoo, shared, k)
    covered: list[dict[str, Any]] = []
    images = any(recommenders.method(m).needs == "images" for m in methods)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    truth: dict[str, dict[str, float]] = {}
    for i, (name, data) in enumerate(datasets.items()):
        embedding = embed(data, zoo.embed_config, progress=progress)
        zoo.check_compatible(embedding, f"the embedding of {name}")
        errors, by_logme, logme_seconds = _ground_truth(zoo, data, images)
        truth[name] = errors
        described = {
            "dataset": name,
            "images": len(data),
            "classes": len(data.classes),
            "best": min(errors, key=errors.__getitem__),
            **novelty.of(zoo, embedding),
        }
        truth_row = np.array([errors[e.name] for e in zoo.experts])
        held = coverage(intervals.predict(embedding), truth_row)
        covered.append({**held, "out_of_distribution": described["out_of_distribution"]})
        query = Query(embedding, data, logme=by_logme)
        floor = zoo.protocol.resolution(len(data))
        for method in methods:
            row = _scored(zoo, made[method], query, errors, floor, logme_seconds)
            rows[method].append({**described, **row})
        if progress is not None:
            progress("datasets", i + 1, len(datasets))
    return {
        "recommenders": {m: summarise(r) for m, r in rows.items()},
        "versus": versus(rows, key="dataset", cluster=None),
        "intervals": interval_summary(covered),
        "per_dataset": rows,
        "errors": truth,
        "zoo": {"tasks": len(zoo.tasks), "experts": len(zoo.experts), "probe": zoo.probe},
    }
