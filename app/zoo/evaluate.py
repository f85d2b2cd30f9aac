"""Meta-evaluation: leave-one-task-out over a zoo, the way the Task2Vec paper measured.

For every zoo task, every recommender ranks the experts with that task's row of the
performance matrix (and its index entry) hidden; the ranking is compared with the task's true
errors:

* relative error increase of the top pick over the best expert (the oracle), in percent:
  100·(err_chosen − err_best) / err_best. A zero oracle error is floored at one held-out image
  (1 / held-out count), so a perfect oracle does not divide by zero;
* weighted Kendall τ (``scipy.stats.weightedtau``, hyperbolic weights) between the scores and
  the true accuracies, over the experts the recommender ranks;
* top-1: the pick is (one of) the best;
* seconds per recommendation (a trained model's fitting is not counted).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import weightedtau

from app.task2vec.distances import distance_matrix
from app.zoo.index import recall_at_k
from app.zoo.recommenders import (
    LearnedScorer,
    Query,
    Ranked,
    Recommender,
    Task2VecKNN,
    recommenders,
)
from app.zoo.tasks import materialize
from app.zoo.zoo import Zoo

NEEDS_IMAGES = {"logme", "brute-force"}
#: The learned scorer trained and queried with the embeddings dealt out to the wrong tasks:
#: what it scores without task information. The gap to ``learned`` is what the embeddings add.
SHUFFLED_CONTROL = "learned-shuffled"
Progress = Callable[[str, int, int], None]


def _metrics(zoo: Zoo, task: int, ranking: list[Ranked]) -> dict[str, float]:
    errors = zoo.errors[task]
    column = {e.name: i for i, e in enumerate(zoo.experts)}
    chosen = errors[column[ranking[0].expert]]
    best = float(errors.min())
    floor = max(best, zoo.protocol.resolution(zoo.tasks[task].size))
    ranked = [column[r.expert] for r in ranking]
    scores = np.array([r.score for r in ranking])
    accuracy = 1.0 - errors[ranked]
    tau = float(weightedtau(scores, accuracy).statistic) if len(ranked) > 1 else float("nan")
    return {
        "rel_error_increase": 100.0 * (chosen - best) / floor,
        "weighted_tau": tau,
        "top1": float(chosen <= best),
    }


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


def evaluate(
    zoo: Zoo,
    methods: list[str],
    k: int = 5,
    progress: Progress | None = None,
) -> dict[str, Any]:
    available = recommenders(zoo, k)
    unknown = set(methods) - set(available) - {"learned", SHUFFLED_CONTROL}
    if unknown:
        raise ValueError(f"unknown recommenders: {', '.join(sorted(unknown))}")
    per_task: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    control = shuffled_embeddings(zoo) if SHUFFLED_CONTROL in methods else zoo
    for t, task in enumerate(zoo.tasks):
        data = materialize(task) if NEEDS_IMAGES & set(methods) else None
        for method in methods:
            seen = control if method == SHUFFLED_CONTROL else zoo
            query = Query(seen.embeddings[t], data, exclude=t)
            if method in ("learned", SHUFFLED_CONTROL):
                rank: Recommender = LearnedScorer(seen, k, exclude=t)
            else:
                rank = available[method]
            started = time.perf_counter()
            ranking = rank(seen, query)
            seconds = time.perf_counter() - started
            per_task[method].append({**_metrics(zoo, t, ranking), "seconds": seconds})
        if progress is not None:
            progress("evaluate", t + 1, len(zoo.tasks))
    summary = {
        method: {
            **{
                key: float(np.nanmean([row[key] for row in rows]))
                for key in ("rel_error_increase", "weighted_tau", "top1", "seconds")
            },
            # The mean is driven by the few tasks an expert solves perfectly (a tiny floor).
            "median_rel_error_increase": float(np.median([r["rel_error_increase"] for r in rows])),
        }
        for method, rows in per_task.items()
    }
    knn = available["task2vec-knn"]
    assert isinstance(knn, Task2VecKNN)
    recall = recall_at_k(knn.index, list(enumerate(zoo.embeddings)), k=min(10, len(zoo.tasks) - 1))
    best = zoo.errors.argmin(axis=1)
    imagenet = [i for i, e in enumerate(zoo.experts) if "imagenet" in e.tags]
    return {
        "recommenders": summary,
        "per_task": {
            m: [{"task": zoo.tasks[i].name, **row} for i, row in enumerate(rows)]
            for m, rows in per_task.items()
        },
        "zoo": {
            "tasks": len(zoo.tasks),
            "experts": len(zoo.experts),
            "probe": zoo.probe,
            "protocol": zoo.protocol.describe(),
            "index_recall_at_10": recall,
            "imagenet_expert_not_best_share": (
                float(np.mean(~np.isin(best, imagenet))) if imagenet else None
            ),
        },
    }


def write_report(zoo: Zoo, results: dict[str, Any], out: Path) -> None:
    """results.json, report.md and three plots in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import MDS

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))

    distances = distance_matrix(zoo.embeddings)
    sym = (distances + distances.T) / 2
    domains = sorted({t.domain for t in zoo.tasks})
    colours = [domains.index(t.domain) for t in zoo.tasks]
    mds = MDS(n_components=2, metric="precomputed", init="classical_mds", random_state=0)
    xy = mds.fit_transform(sym)
    fig, ax = plt.subplots(figsize=(7, 6))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=colours, cmap="tab10", s=30)
    ax.legend(scatter.legend_elements()[0], domains, title="domain")
    ax.set_title(f"Task embeddings ({zoo.probe}), MDS of the symmetric distance")
    fig.savefig(out / "task_map.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    order = np.argsort(colours, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(sym[np.ix_(order, order)], cmap="viridis")
    fig.colorbar(image, ax=ax, label="symmetric distance")
    ax.set_title("Task distance matrix (tasks grouped by domain)")
    fig.savefig(out / "distance_matrix.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    summary = results["recommenders"]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [summary[n]["rel_error_increase"] for n in names], color="tab:blue")
    ax.set_ylabel("mean relative error increase over the oracle (%)")
    ax.tick_params(axis="x", rotation=30)
    fig.savefig(out / "error_increase.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    lines = [
        f"# Leave-one-task-out evaluation: {len(zoo.tasks)} tasks, {len(zoo.experts)} experts",
        "",
        f"Probe: {zoo.probe}. Protocol: {zoo.protocol.describe()['classifier']}; "
        f"{zoo.protocol.describe()['split']}.",
        "",
        "| recommender | rel. error increase (%), mean | median | weighted τ | top-1 | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['rel_error_increase']:.2f} | "
            f"{row['median_rel_error_increase']:.2f} | {row['weighted_tau']:.3f} | "
            f"{row['top1']:.2f} | {row['seconds']:.4f} |"
        )
    lines += [
        "",
        "Nearest-task search: recall@10 of the FAISS candidate stage (4x oversampling, exact "
        f"re-rank) against exact search: {results['zoo']['index_recall_at_10']:.3f}.",
    ]
    share = results["zoo"]["imagenet_expert_not_best_share"]
    if share is not None:
        lines += ["", f"Tasks on which the ImageNet expert is not the best: {share:.0%}."]
    lines += ["", "![task map](task_map.png)", "![distances](distance_matrix.png)"]
    lines += ["![error increase](error_increase.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
