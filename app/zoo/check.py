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
from app.zoo.evaluate import Progress, ranking_metrics, summarise, versus
from app.zoo.features import extract_features
from app.zoo.matrix import holdout_error
from app.zoo.recommenders import LearnedScorer, Query, Ranked, logme, ranked, recommenders
from app.zoo.zoo import Zoo

CHECK_METHODS = ("global-best", "task2vec-knn", "task2vec-asym", "learned", "logme")


def _ground_truth(
    zoo: Zoo, data: LabelledImages, with_logme: bool
) -> tuple[dict[str, float], list[Ranked] | None, float]:
    """Every expert's held-out error on ``data``, LogME's ranking (when asked) and its seconds.

    Features are extracted once per expert and serve both; LogME's seconds include the forward
    passes, which it needs and the embedding-based recommenders do not."""
    errors: dict[str, float] = {}
    scores, evidence = [], []
    seconds = 0.0
    for e, expert in enumerate(zoo.experts):
        started = time.perf_counter()
        features = extract_features(expert, zoo.expert_model(e), data)
        if with_logme:
            scores.append(logme(features, data.labels))
            evidence.append({"logme": scores[-1]})
            seconds += time.perf_counter() - started
        errors[expert.name] = holdout_error(features, data.labels, zoo.protocol)
    ranking = ranked(zoo, np.array(scores), evidence) if with_logme else None
    return errors, ranking, seconds


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
    method, and every expert's true error on every dataset."""
    unknown = set(methods) - set(CHECK_METHODS)
    if unknown:
        raise ValueError(
            f"unknown recommenders: {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(CHECK_METHODS)}"
        )
    if not datasets:
        raise ValueError("an outside check needs at least one labelled dataset")
    made = recommenders(zoo, k)
    if "learned" in methods:
        made["learned"] = LearnedScorer(zoo, k)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    truth: dict[str, dict[str, float]] = {}
    for i, (name, data) in enumerate(datasets.items()):
        embedding = embed(data, zoo.embed_config, progress=progress)
        zoo.check_compatible(embedding, f"the embedding of {name}")
        errors, by_logme, logme_seconds = _ground_truth(zoo, data, "logme" in methods)
        truth[name] = errors
        floor = zoo.protocol.resolution(len(data))
        for method in methods:
            if method == "logme" and by_logme is not None:
                ranking, seconds = by_logme, logme_seconds
            else:
                started = time.perf_counter()
                ranking = made[method](zoo, Query(embedding, data))
                seconds = time.perf_counter() - started
            rows[method].append(
                {
                    "dataset": name,
                    "images": len(data),
                    "classes": len(data.classes),
                    "pick": ranking[0].expert,
                    "best": min(errors, key=errors.__getitem__),
                    **ranking_metrics(errors, floor, ranking),
                    "seconds": seconds,
                }
            )
        if progress is not None:
            progress("datasets", i + 1, len(datasets))
    return {
        "recommenders": {m: summarise(r) for m, r in rows.items()},
        "versus": versus(rows, key="dataset"),
        "per_dataset": rows,
        "errors": truth,
        "zoo": {"tasks": len(zoo.tasks), "experts": len(zoo.experts), "probe": zoo.probe},
    }
