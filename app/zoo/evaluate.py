"""Meta-evaluation: how well each recommender ranks a zoo's experts for a task it has not seen.

The folds (``folds.py``: leave-one-task-out, leave-one-domain-out, leave-one-source-out) hold
out a query's tasks, every zoo task that shares an image with them, and every expert trained
on one of those: a new user's dataset shares no image with the zoo and never has an expert
trained on it, so such an expert is neither a candidate, nor the oracle, nor in any fit. The
recommender is handed ``Zoo.subset`` of the remaining tasks and experts (its own FAISS index,
matrix and fit) and the held-out task's embedding as the query, computed from the task's
images as a user's upload would be. Images cannot leak either: the zoo's ``ImageSplit`` keeps
every evaluation image out of every expert's training set, and domains do not share images.

Per query, against the task's true errors over the experts of the fold:

* relative error increase of the top pick over the best expert (the oracle), in percent:
  100·(err_chosen − err_best) / err_best. A zero oracle error is floored at one held-out image
  (1 / held-out count), so a perfect oracle does not divide by zero;
* regret: err_chosen − err_best in error points (percent of images);
* weighted Kendall τ (``scipy.stats.weightedtau``, hyperbolic weights) between the scores and
  the true accuracies, over the experts the recommender ranks;
* top-1: the pick is (one of) the best;
* seconds per recommendation (a trained model's fitting is not counted).

LogME needs each expert's features of the query's images; its score of an expert on a task
depends on nothing else, so it is computed once per (task, expert) and read by every fold.
Per protocol the report also says how often a query is out of the fold's zoo's distribution
(``novelty``) and how many true errors the predicted-error intervals held (``intervals``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.stats import weightedtau
from threadpoolctl import threadpool_limits

from app.task2vec.distances import memoised_distances
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo import recommenders
from app.zoo.features import extract_features
from app.zoo.folds import MIN_SCORED_IMAGES, PROTOCOL_TITLES, PROTOCOLS, Fold, folds, shared_images
from app.zoo.index import recall_at_k
from app.zoo.intervals import ErrorIntervals, coverage, interval_summary
from app.zoo.novelty import Novelty
from app.zoo.recommenders import Query, Ranked, Task2VecKNN, logme
from app.zoo.zoo import Zoo

#: Every method the evaluation compares, in the registry's order (brute force is the truth).
METHODS = recommenders.evaluated()
METRICS = ("rel_error_increase", "regret", "weighted_tau", "top1", "seconds", "forward_passes")
Progress = Callable[[str, int, int], None]


def ranking_metrics(
    errors: dict[str, float], floor: float, ranking: list[Ranked]
) -> dict[str, float]:
    """A ranking's figures against the true ``errors`` (expert name → held-out error) of the
    experts it could pick from; ``floor`` is the smallest measurable error on the task."""
    chosen = errors[ranking[0].expert]
    best = min(errors.values())
    scores = np.array([r.score for r in ranking])
    accuracy = 1.0 - np.array([errors[r.expert] for r in ranking])
    tau = float(weightedtau(scores, accuracy).statistic) if len(ranking) > 1 else float("nan")
    return {
        "rel_error_increase": 100.0 * (chosen - best) / max(best, floor),
        "regret": 100.0 * (chosen - best),
        "weighted_tau": tau,
        "top1": float(chosen <= best),
    }


def _metrics(zoo: Zoo, task: int, fold: Fold, ranking: list[Ranked]) -> dict[str, float]:
    errors = {zoo.experts[e].name: float(zoo.errors[task, e]) for e in fold.experts}
    return ranking_metrics(errors, zoo.protocol.resolution(zoo.tasks[task].size), ranking)


def logme_scores(zoo: Zoo, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tasks, experts) LogME scores of every expert on every zoo task's evaluation images,
    and the seconds each task's scores took (every expert's forward pass included). A zoo
    built by ``ZooBuilder`` has them already, computed with its matrix."""
    from app.zoo.build import load_logme

    saved = load_logme(zoo)
    if saved is not None:
        return saved[0], saved[1].sum(axis=1)
    scores = np.zeros(zoo.errors.shape)
    seconds = np.zeros(len(zoo.tasks))
    for t in range(len(zoo.tasks)):
        data = zoo.task_data(t)
        started = time.perf_counter()
        for e, expert in enumerate(zoo.experts):
            features = extract_features(expert, zoo.expert_model(e), data)
            scores[t, e] = logme(features, data.labels)
        seconds[t] = time.perf_counter() - started
        if progress is not None:
            progress("logme", t + 1, len(zoo.tasks))
    return scores, seconds


def with_logme(zoo: Zoo) -> Zoo:
    """``zoo`` with its LogME matrix, when the build saved one for exactly its tasks and
    experts (what the hybrid fits its rule on)."""
    from app.zoo.build import load_logme

    saved = None if zoo.logme is not None else load_logme(zoo)
    return zoo if saved is None else replace(zoo, logme=saved[0])


def _query(zoo: Zoo, fold: Fold, t: int, embedding: Embedding, logme: np.ndarray | None) -> Query:
    """Held-out task ``t`` as a query: its embedding, its LogME scores for the fold's experts
    (read from the precomputed matrix), and the labels only the label baselines read."""
    scores = None
    if logme is not None:
        scores = {zoo.experts[e].name: float(logme[t, e]) for e in fold.experts}
    task = zoo.tasks[t]
    return Query(embedding, logme=scores, domain=task.domain, source=task.source)


def fold_rankings(
    zoo: Zoo,
    fold: Fold,
    methods: list[str],
    k: int = 5,
    logme: np.ndarray | None = None,
    queries: dict[int, Embedding] | None = None,
) -> dict[str, dict[int, tuple[list[Ranked], float]]]:
    """Every method's ranking (and its seconds) for every task the fold scores.

    Each method is fitted on the fold's ``Zoo.subset`` alone, and sees the held-out task's
    embedding (``queries[t]``: the embedding of the task's images, as a user's upload would
    have; by default the zoo's copy, which is the same file). ``logme`` is the precomputed
    (tasks, experts) matrix of ``logme_scores``, which the methods that need the images read
    instead of extracting features again. A method that cannot rank in this fold
    (``task2vec-asym`` with no expert left that has a source task) is left out of the fold's
    answer.
    """
    sub = zoo.subset(fold.visible(zoo), list(fold.experts))
    if logme is not None:
        sub.logme = logme[np.ix_(fold.visible(zoo), list(fold.experts))]
    for name in methods:
        if recommenders.method(name).needs == "images" and logme is None:
            raise ConfigError(f"{name} needs the precomputed scores of logme_scores()")
    made = {name: recommenders.build(name, sub, k) for name in methods}
    out: dict[str, dict[int, tuple[list[Ranked], float]]] = {m: {} for m in methods}
    for t in fold.queries:
        embedding = zoo.embeddings[t] if queries is None else queries[t]
        query = _query(zoo, fold, t, embedding, logme)
        for name, recommender in made.items():
            started = time.perf_counter()
            try:
                ranking = recommender(sub, query)
            except ConfigError:
                continue
            out[name][t] = (ranking, time.perf_counter() - started)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {"tasks": 0}
    return {
        **{key: _mean([row.get(key, float("nan")) for row in rows]) for key in METRICS},
        # The mean is driven by the few tasks an expert solves perfectly (a tiny floor).
        "median_rel_error_increase": float(np.median([r["rel_error_increase"] for r in rows])),
        "tasks": len(rows),
    }


#: What ``versus`` compares every recommender with: the answer that needs no task information.
BASELINE = "global-best"


def paired_difference(
    rows: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    metric: str = "regret",
    key: str = "task",
    cluster: str | None = "domain",
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of ``metric`` minus the baseline's on the same queries, with a 95% paired
    bootstrap interval (seeded) and the share of queries on which the recommender is better,
    worse or tied. Below zero is better for regret and error increase.

    Paired because queries differ far more from each other than recommenders do. Clustered
    (``cluster``: the row field naming a query's cluster, its domain by default) because the
    queries of one domain are not independent draws: they share images, classes and the
    experts that suit them, so resampling single queries makes the interval too narrow. Each
    resample draws whole clusters with replacement and averages over their queries.
    ``cluster=None`` resamples queries (datasets that share nothing)."""
    theirs = {r[key]: r[metric] for r in baseline}
    pairs = [
        (r.get(cluster) if cluster else i, r[metric] - theirs[r[key]])
        for i, r in enumerate(rows)
        if r[key] in theirs
    ]
    if not pairs:
        return {"tasks": 0}
    diffs = np.array([d for _, d in pairs])
    labels = sorted({str(c) for c, _ in pairs})
    of = np.array([labels.index(str(c)) for c, _ in pairs])
    sums = np.bincount(of, weights=diffs, minlength=len(labels))
    counts = np.bincount(of, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(labels), size=(resamples, len(labels)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "metric_difference": float(diffs.mean()),
        "low": float(low),
        "high": float(high),
        "better": float(np.mean(diffs < 0)),
        "worse": float(np.mean(diffs > 0)),
        "tasks": len(diffs),
        "clusters": len(labels),
    }


def versus(
    per_task: dict[str, list[dict[str, Any]]],
    metric: str = "regret",
    key: str = "task",
    cluster: str | None = "domain",
    baseline: str = BASELINE,
) -> dict[str, dict[str, float]]:
    """Every recommender against ``baseline`` on ``metric`` (see ``paired_difference``),
    rows matched by ``key``, resampled by ``cluster``."""
    if baseline not in per_task:
        return {}
    return {
        m: paired_difference(rows, per_task[baseline], metric, key, cluster)
        for m, rows in per_task.items()
        if m != baseline
    }


def _fold_context(zoo: Zoo, fold: Fold, k: int) -> dict[int, dict[str, Any]]:
    """For each query of ``fold``: is it out of the fold's zoo's distribution (``novelty``),
    and how well the intervals fitted on the fold's zoo hold its true errors (``intervals``)?"""
    sub = zoo.subset(fold.visible(zoo), list(fold.experts))
    shared = shared_images(sub)
    novelty, intervals = Novelty.fit(sub, shared), ErrorIntervals(sub, shared, k)
    out = {}
    for t in fold.queries:
        truth = zoo.errors[t, list(fold.experts)]
        held = coverage(intervals.predict(zoo.embeddings[t]), truth)
        out[t] = {**novelty.of(sub, zoo.embeddings[t]), **held}
    return out


def _row_labels(zoo: Zoo, t: int, novel: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": zoo.tasks[t].name,
        "domain": zoo.tasks[t].domain,
        "out_of_distribution": novel["out_of_distribution"],
    }


def _row(
    zoo: Zoo, t: int, fold: Fold, ranking: list[Ranked], seconds: float, novel: dict[str, Any]
) -> dict[str, Any]:
    return {
        "task": zoo.tasks[t].name,
        "domain": zoo.tasks[t].domain,
        "source": zoo.tasks[t].source,
        "fold": fold.name,
        "hidden": len(fold.held_out),
        "pick": ranking[0].expert,
        "experts": len(fold.experts),
        **_metrics(zoo, t, fold, ranking),
        "seconds": seconds,
        # Experts run over the query's images: those whose LogME the ranking reports.
        "forward_passes": sum("logme" in r.evidence for r in ranking),
        "out_of_distribution": novel["out_of_distribution"],
        "nearest_distance": novel["nearest_distance"],
    }


def novelty_summary(per_task: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """How often the out-of-distribution flag fires, and whether it marks the queries on which
    ``learned`` loses to LogME (its regret is higher)."""
    rows = per_task.get("learned") or next(iter(per_task.values()), [])
    out: dict[str, float] = {
        "queries": len(rows),
        "flagged": float(np.mean([r["out_of_distribution"] for r in rows])) if rows else 0.0,
    }
    if "learned" in per_task and "logme" in per_task:
        theirs = {r["task"]: r["regret"] for r in per_task["logme"]}
        loses = [(r["out_of_distribution"], r["regret"] > theirs[r["task"]]) for r in rows]
        for flag, name in ((True, "flagged"), (False, "unflagged")):
            picked = [lost for f, lost in loses if f == flag]
            out[f"learned_loses_when_{name}"] = float(np.mean(picked)) if picked else float("nan")
    return out


def evaluate_protocol(
    zoo: Zoo,
    protocol: str,
    methods: list[str],
    k: int = 5,
    logme: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Progress | None = None,
    min_images: int = MIN_SCORED_IMAGES,
) -> dict[str, Any]:
    """Summary, per-domain summaries and per-query rows of every method under ``protocol``.

    A method's seconds per recommendation include its experts' forward passes where it has
    any: LogME's measured seconds for the task, pro rata for a shortlist."""
    per_task: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    covered: list[dict[str, Any]] = []
    all_folds = folds(zoo, protocol, min_images)
    for i, fold in enumerate(all_folds):
        rankings = fold_rankings(zoo, fold, methods, k, None if logme is None else logme[0])
        novel = _fold_context(zoo, fold, k)
        for t in fold.queries:
            held = {key: novel[t][key] for key in ("covered", "width", "absolute_error")}
            covered.append({**held, **_row_labels(zoo, t, novel[t])})
        for method, by_task in rankings.items():
            for t, (ranking, seconds) in by_task.items():
                row = _row(zoo, t, fold, ranking, seconds, novel[t])
                if logme is not None and row["forward_passes"]:
                    share = row["forward_passes"] / len(zoo.experts)
                    row["seconds"] = seconds + float(logme[1][t]) * share
                per_task[method].append(row)
        if progress is not None:
            progress(f"{PROTOCOL_TITLES[protocol]}: {fold.name}", i + 1, len(all_folds))
    domains = sorted({t.domain for t in zoo.tasks})
    return {
        "recommenders": {m: summarise(rows) for m, rows in per_task.items()},
        "versus": versus(per_task),
        "versus_domain_best": versus(per_task, baseline="domain-best"),
        "versus_logme": versus(per_task, baseline="logme"),
        "novelty": novelty_summary(per_task),
        "intervals": interval_summary(covered),
        "domains": {
            m: {d: summarise([r for r in rows if r["domain"] == d]) for d in domains}
            for m, rows in per_task.items()
        },
        "folds": len(all_folds),
        "queries": sum(len(f.queries) for f in all_folds),
        "hidden_per_fold": float(np.mean([len(f.held_out) for f in all_folds])),
        "per_task": per_task,
    }


def evaluate(
    zoo: Zoo,
    methods: list[str],
    k: int = 5,
    progress: Progress | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    min_images: int = MIN_SCORED_IMAGES,
) -> dict[str, Any]:
    """Every method under every protocol, with what describes the zoo. Queries are the tasks
    whose truth rests on at least ``min_images`` held-out images (``folds.scored``)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(
            f"unknown recommenders: {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}"
        )
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols: {', '.join(sorted(unknown))}")
    images = any(recommenders.method(m).needs == "images" for m in methods)
    scores = logme_scores(zoo, progress) if images else None
    # One BLAS thread: threaded dot products and SVDs round their last bit by the core count
    # (81 of 152 demo distances differed between 1 and 2 threads), so this keeps the report
    # the same on every machine. Every fold asks for the same pairs of embeddings again:
    # each distance is computed once.
    with threadpool_limits(limits=1, user_api="blas"), memoised_distances():
        results = {
            protocol: evaluate_protocol(zoo, protocol, methods, k, scores, progress, min_images)
            for protocol in protocols
        }
    knn = Task2VecKNN(zoo, k)
    recall = recall_at_k(knn.index, list(enumerate(zoo.embeddings)), k=min(10, len(zoo.tasks) - 1))
    best = zoo.errors.argmin(axis=1)
    imagenet = [i for i, e in enumerate(zoo.experts) if "imagenet" in e.tags]
    return {
        "protocols": results,
        "zoo": {
            "tasks": len(zoo.tasks),
            "experts": len(zoo.experts),
            "domains": sorted({t.domain for t in zoo.tasks}),
            "architectures": sorted({e.architecture for e in zoo.experts}),
            "probe": zoo.probe,
            "protocol": zoo.protocol.describe(),
            "min_scored_images": min_images,
            "index_recall_at_10": recall,
            "imagenet_expert_not_best_share": (
                float(np.mean(~np.isin(best, imagenet))) if imagenet else None
            ),
        },
    }
