"""Rendering an evaluation: the markdown tables and plots of ``task2vec zoo evaluate``, and the
tables that ``task2vec zoo check`` and ``bench.outside`` print. ``evaluate.py`` computes the
figures; nothing here changes one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from app.task2vec.distances import distance_matrix
from app.zoo.evaluate import BASELINE
from app.zoo.folds import PROTOCOL_TITLES
from app.zoo.zoo import Zoo


def versus_table(
    compared: dict[str, dict[str, float]], metric: str = "regret", baseline: str = BASELINE
) -> list[str]:
    lines = [
        f"| recommender | {metric} − {baseline}'s, mean | 95% paired bootstrap "
        "| better on | worse on |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in compared.items():
        if not row.get("tasks"):
            continue
        lines.append(
            f"| {name} | {row['metric_difference']:+.2f} | [{row['low']:+.2f}, {row['high']:+.2f}] "
            f"| {row['better']:.0%} | {row['worse']:.0%} |"
        )
    return lines


def summary_table(summary: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| recommender | rel. error increase (%), mean | median | regret (points) | weighted τ "
        "| top-1 | seconds | forward passes | tasks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        if not row.get("tasks"):
            lines.append(f"| {name} | – | – | – | – | – | – | – | 0 |")
            continue
        lines.append(
            f"| {name} | {row['rel_error_increase']:.1f} | {row['median_rel_error_increase']:.1f} "
            f"| {row['regret']:.2f} | {row['weighted_tau']:.3f} | {row['top1']:.2f} "
            f"| {row['seconds']:.4f} | {row.get('forward_passes', float('nan')):.1f} "
            f"| {int(row['tasks'])} |"
        )
    return lines


def _domain_table(domains: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    methods = list(domains)
    names = sorted({d for per in domains.values() for d in per})
    lines = [
        "| domain | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for d in names:
        cells = []
        for m in methods:
            row = domains[m].get(d, {})
            cells.append(
                f"{row['rel_error_increase']:.1f}%, τ {row['weighted_tau']:.2f}"
                if row.get("tasks")
                else "–"
            )
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def write_report(zoo: Zoo, results: dict[str, Any], out: Path) -> None:
    """results.json, report.md and three plots in ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the machine has

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    distances = distance_matrix(zoo.embeddings)
    sym = (distances + distances.T) / 2
    domains = sorted({t.domain for t in zoo.tasks})
    colours = [domains.index(t.domain) for t in zoo.tasks]
    _plot_task_map(zoo, sym, domains, colours, out / "task_map.png")
    _plot_distances(sym, colours, out / "distance_matrix.png")
    _plot_error_increase(results["protocols"], out / "error_increase.png")
    (out / "report.md").write_text("\n".join(_report_lines(zoo, results, domains)))


def _plot_task_map(
    zoo: Zoo, sym: np.ndarray, domains: list[str], colours: list[int], path: Path
) -> None:
    """The tasks laid out in two dimensions (MDS of the symmetric distance), by domain: do
    tasks of one domain sit together?"""
    import matplotlib.pyplot as plt
    from sklearn.manifold import MDS

    mds = MDS(n_components=2, metric="precomputed", init="classical_mds", random_state=0)
    xy = mds.fit_transform(sym)
    fig, ax = plt.subplots(figsize=(7, 6))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=colours, cmap="tab10", s=30)
    ax.legend(scatter.legend_elements()[0], domains, title="domain", fontsize="small")
    ax.set_title(f"Task embeddings ({zoo.probe}), MDS of the symmetric distance")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_distances(sym: np.ndarray, colours: list[int], path: Path) -> None:
    """The distance matrix with tasks grouped by domain: blocks on the diagonal when a
    domain's tasks are near one another."""
    import matplotlib.pyplot as plt

    order = np.argsort(colours, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(sym[np.ix_(order, order)], cmap="viridis")
    fig.colorbar(image, ax=ax, label="symmetric distance")
    ax.set_title("Task distance matrix (tasks grouped by domain)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_error_increase(protocols: dict[str, Any], path: Path) -> None:
    """Each recommender's mean relative error increase over the oracle, one bar per
    protocol side by side."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(protocols))
    for i, (protocol, result) in enumerate(protocols.items()):
        names = list(result["recommenders"])
        values = [result["recommenders"][n].get("rel_error_increase", np.nan) for n in names]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=PROTOCOL_TITLES[protocol])
        ax.set_xticks(np.arange(len(names)) + width * (len(protocols) - 1) / 2, names)
    ax.set_ylabel("mean relative error increase over the oracle (%)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _novelty_lines(novelty: dict[str, float] | None) -> list[str]:
    if not novelty or not novelty.get("queries"):
        return []
    line = f"Out of the zoo's distribution: {novelty['flagged']:.0%} of the queries"
    if "learned_loses_when_flagged" in novelty:
        line += (
            f"; learned loses to logme on {novelty['learned_loses_when_flagged']:.0%} of those "
            f"and on {novelty['learned_loses_when_unflagged']:.0%} of the others"
        )
    return [line + ".", ""]


def interval_lines(intervals: dict[str, float] | None) -> list[str]:
    """One sentence on how many true errors the predicted-error intervals held."""
    if not intervals or not intervals.get("queries"):
        return []
    line = (
        f"Predicted errors: {intervals['level']:.0%} intervals held {intervals['covered']:.0%} "
        f"of the true errors (mean width {intervals['width']:.1f} points, mean absolute error "
        f"{intervals['absolute_error']:.1f} points)"
    )
    if not np.isnan(intervals["covered_flagged"]):
        line += (
            f"; {intervals['covered_flagged']:.0%} on the out-of-distribution queries (width "
            f"{intervals['width_flagged']:.1f}), {intervals['covered_unflagged']:.0%} on the "
            f"others (width {intervals['width_unflagged']:.1f})"
        )
    return [line + ".", ""]


def _report_lines(zoo: Zoo, results: dict[str, Any], domains: list[str]) -> list[str]:
    """report.md: the zoo and protocol, then per protocol the summary, the comparison with
    the baseline and the per-domain table, the index's recall and the plots."""
    described = zoo.protocol.describe()
    lines = [
        f"# Evaluation: {len(zoo.tasks)} tasks in {len(domains)} domains, "
        f"{len(zoo.experts)} experts",
        "",
        f"Probe: {zoo.probe}. Protocol: {described['classifier']}; {described['split']}. "
        f"Image provenance: {described['provenance']}.",
        "",
        "A fold holds out its tasks, every zoo task that shares an image with one of them and "
        "every expert trained on one of those. Queries are the tasks whose truth rests on at "
        f"least {results['zoo'].get('min_scored_images', 1)} held-out images. Intervals: 95% "
        "paired bootstrap, resampling domains (clusters of queries), seeded.",
    ]
    for protocol, result in results["protocols"].items():
        lines += [
            "",
            f"## {PROTOCOL_TITLES[protocol]} ({result['folds']} folds, "
            f"{result.get('queries', '?')} queries, "
            f"{result.get('hidden_per_fold', float('nan')):.1f} tasks hidden per fold)",
            "",
            *summary_table(result["recommenders"]),
            "",
            f"Against {BASELINE} on the same tasks (regret in error points; below zero is better):",
            "",
            *versus_table(result["versus"]),
            "",
            "Against domain-best (the query's domain label, which a user does not have):",
            "",
            *versus_table(result.get("versus_domain_best", {}), baseline="domain-best"),
            "",
            "Against logme (which runs every expert over the images):",
            "",
            *versus_table(result.get("versus_logme", {}), baseline="logme"),
            "",
            *_novelty_lines(result.get("novelty")),
            *interval_lines(result.get("intervals")),
            "Per domain (mean relative error increase, weighted τ):",
            "",
            *_domain_table(result["domains"]),
        ]
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
    return lines
