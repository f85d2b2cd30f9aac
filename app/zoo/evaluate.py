"""Meta-evaluation: how well each recommender ranks a zoo's experts for a task it has not seen.

Two protocols, both built so that the recommender cannot see the answer:

* **leave-one-task-out**: each zoo task in turn is the query;
* **leave-one-domain-out**: all tasks of one domain are held out at once (the case of a user
  whose data looks like nothing in the zoo), each of them queried in turn.

A fold holds out its tasks *and every expert trained on one of them*: a new user's dataset
never has an expert trained on it, so such an expert is neither a candidate, nor the oracle,
nor in the learned scorer's fit. The recommender is handed ``Zoo.subset`` of the remaining
tasks and experts (its own FAISS index, matrix and scorer fit) and the held-out task's
embedding as the query, computed from the task's images as a user's upload would be. Images
cannot leak either: the zoo's ``ImageSplit`` keeps every evaluation image out of every
expert's training set, and domains do not share images.

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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import weightedtau
from threadpoolctl import threadpool_limits

from app.task2vec.distances import memoised_distances
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo.features import extract_features
from app.zoo.index import recall_at_k
from app.zoo.recommenders import (
    LearnedScorer,
    Query,
    Ranked,
    Recommender,
    Task2VecKNN,
    global_best,
    logme,
    ranked,
    task2vec_asym,
)
from app.zoo.zoo import Zoo

#: The learned scorer trained and queried with the embeddings dealt out to the wrong tasks:
#: what it scores without task information. The gap to ``learned`` is what the embeddings add.
SHUFFLED_CONTROL = "learned-shuffled"
METHODS = ("global-best", "task2vec-knn", "task2vec-asym", "learned", SHUFFLED_CONTROL, "logme")
PROTOCOLS = ("task", "domain")
PROTOCOL_TITLES = {"task": "leave-one-task-out", "domain": "leave-one-domain-out"}
METRICS = ("rel_error_increase", "regret", "weighted_tau", "top1", "seconds")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Fold:
    """One round of an evaluation: tasks held out, and the experts that stay candidates."""

    name: str
    held_out: tuple[int, ...]
    experts: tuple[int, ...]

    def visible(self, zoo: Zoo) -> list[int]:
        return [t for t in range(len(zoo.tasks)) if t not in self.held_out]


def folds(zoo: Zoo, protocol: str) -> list[Fold]:
    """The folds of ``protocol`` ("task" or "domain"). Experts trained on a held-out task
    leave with it; experts with no source task in the zoo (ImageNet, random) always stay."""
    groups: list[tuple[str, tuple[int, ...]]]
    if protocol == "task":
        groups = [(task.name, (t,)) for t, task in enumerate(zoo.tasks)]
    elif protocol == "domain":
        domains = sorted({t.domain for t in zoo.tasks})
        if len(domains) < 2:
            raise ValueError("leave-one-domain-out needs a zoo of at least two domains")
        groups = [
            (d, tuple(t for t, task in enumerate(zoo.tasks) if task.domain == d)) for d in domains
        ]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    out = []
    for name, held in groups:
        names = {zoo.tasks[t].name for t in held}
        kept = tuple(e for e, x in enumerate(zoo.experts) if x.source_task not in names)
        out.append(Fold(name, held, kept))
    return out


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


def _fold_recommenders(sub: Zoo, methods: list[str], k: int) -> dict[str, Recommender]:
    """The recommenders of one fold, fit on the fold's zoo alone."""
    made: dict[str, Recommender] = {}
    for method in methods:
        if method == "global-best":
            made[method] = global_best
        elif method == "task2vec-knn":
            made[method] = Task2VecKNN(sub, k)
        elif method == "task2vec-asym":
            made[method] = task2vec_asym
        elif method == "learned":
            made[method] = LearnedScorer(sub, k)
        elif method == SHUFFLED_CONTROL:
            made[method] = LearnedScorer(shuffled_embeddings(sub), k)
    return made


def fold_rankings(
    zoo: Zoo,
    fold: Fold,
    methods: list[str],
    k: int = 5,
    logme: np.ndarray | None = None,
    queries: dict[int, Embedding] | None = None,
) -> dict[str, dict[int, tuple[list[Ranked], float]]]:
    """Every method's ranking (and its seconds) for every task the fold holds out.

    The recommenders see the fold's ``Zoo.subset`` and the held-out task's embedding only
    (``queries[t]``: the embedding of the task's images, as a user's upload would have; by
    default the zoo's copy, which is the same file). ``logme`` is the precomputed
    (tasks, experts) matrix of ``logme_scores``. A method that
    cannot rank in this fold (``task2vec-asym`` with no expert left that has a source task)
    is left out of the fold's answer.
    """
    sub = zoo.subset(fold.visible(zoo), list(fold.experts))
    made = _fold_recommenders(sub, methods, k)
    out: dict[str, dict[int, tuple[list[Ranked], float]]] = {m: {} for m in methods}
    for t in fold.held_out:
        for method in methods:
            if method == "logme":
                if logme is None:
                    raise ConfigError("logme needs the precomputed scores of logme_scores()")
                row = logme[t, list(fold.experts)]
                evidence = [{"logme": float(v)} for v in row]
                out[method][t] = (ranked(sub, row, evidence), float("nan"))
                continue
            seen = sub if method != SHUFFLED_CONTROL else shuffled_embeddings(sub)
            started = time.perf_counter()
            try:
                query = zoo.embeddings[t] if queries is None else queries[t]
                ranking = made[method](seen, Query(query))
            except ConfigError:
                continue
            out[method][t] = (ranking, time.perf_counter() - started)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {"tasks": 0}
    return {
        **{key: _mean([row[key] for row in rows]) for key in METRICS},
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
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of ``metric`` minus the baseline's on the same tasks, with a 95% paired bootstrap
    interval (tasks resampled with replacement, seeded) and the share of tasks on which the
    recommender is better, worse or tied. Below zero is better for regret and error increase.

    Paired because tasks differ far more from each other than recommenders do: the spread of
    a per-task difference is what says whether a gap is real."""
    theirs = {r[key]: r[metric] for r in baseline}
    diffs = np.array([r[metric] - theirs[r[key]] for r in rows if r[key] in theirs])
    if len(diffs) == 0:
        return {"tasks": 0}
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "metric_difference": float(diffs.mean()),
        "low": float(low),
        "high": float(high),
        "better": float(np.mean(diffs < 0)),
        "worse": float(np.mean(diffs > 0)),
        "tasks": len(diffs),
    }


def versus(
    per_task: dict[str, list[dict[str, Any]]], metric: str = "regret", key: str = "task"
) -> dict[str, dict[str, float]]:
    """Every recommender against ``BASELINE`` on ``metric`` (see ``paired_difference``),
    rows matched by ``key``."""
    if BASELINE not in per_task:
        return {}
    return {
        m: paired_difference(rows, per_task[BASELINE], metric, key)
        for m, rows in per_task.items()
        if m != BASELINE
    }


def evaluate_protocol(
    zoo: Zoo,
    protocol: str,
    methods: list[str],
    k: int = 5,
    logme: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Summary, per-domain summaries and per-task rows of every method under ``protocol``."""
    per_task: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    all_folds = folds(zoo, protocol)
    for i, fold in enumerate(all_folds):
        rankings = fold_rankings(zoo, fold, methods, k, None if logme is None else logme[0])
        for method, by_task in rankings.items():
            for t, (ranking, seconds) in by_task.items():
                if method == "logme" and logme is not None:
                    seconds = float(logme[1][t])
                per_task[method].append(
                    {
                        "task": zoo.tasks[t].name,
                        "domain": zoo.tasks[t].domain,
                        "fold": fold.name,
                        "pick": ranking[0].expert,
                        "experts": len(fold.experts),
                        **_metrics(zoo, t, fold, ranking),
                        "seconds": seconds,
                    }
                )
        if progress is not None:
            progress(f"{PROTOCOL_TITLES[protocol]}: {fold.name}", i + 1, len(all_folds))
    domains = sorted({t.domain for t in zoo.tasks})
    return {
        "recommenders": {m: summarise(rows) for m, rows in per_task.items()},
        "versus": versus(per_task),
        "domains": {
            m: {d: summarise([r for r in rows if r["domain"] == d]) for d in domains}
            for m, rows in per_task.items()
        },
        "folds": len(all_folds),
        "per_task": per_task,
    }


def evaluate(
    zoo: Zoo,
    methods: list[str],
    k: int = 5,
    progress: Progress | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> dict[str, Any]:
    """Every method under every protocol, with what describes the zoo."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(
            f"unknown recommenders: {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}"
        )
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols: {', '.join(sorted(unknown))}")
    scores = logme_scores(zoo, progress) if "logme" in methods else None
    # One BLAS thread: threaded dot products and SVDs round their last bit by the core count
    # (81 of 152 demo distances differed between 1 and 2 threads), so this keeps the report
    # the same on every machine. Every fold asks for the same pairs of embeddings again:
    # each distance is computed once.
    with threadpool_limits(limits=1, user_api="blas"), memoised_distances():
        results = {
            protocol: evaluate_protocol(zoo, protocol, methods, k, scores, progress)
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
            "index_recall_at_10": recall,
            "imagenet_expert_not_best_share": (
                float(np.mean(~np.isin(best, imagenet))) if imagenet else None
            ),
        },
    }
