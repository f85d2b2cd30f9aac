"""Leave-one-task-out evaluation on the tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.zoo.build import ZooBuilder
from app.zoo.evaluate import evaluate, write_report
from app.zoo.presets import recipe
from app.zoo.recommenders import LearnedScorer, Query
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return ZooBuilder(recipe("tiny"), tmp_path_factory.mktemp("data")).build()


def test_evaluation_reports_every_metric_and_writes_the_report(zoo: Zoo, tmp_path: Path) -> None:
    methods = ["global-best", "task2vec-knn", "task2vec-asym", "learned", "brute-force"]
    results = evaluate(zoo, methods, k=3)
    summary = results["recommenders"]
    assert set(summary) == set(methods)
    # The oracle is exact by construction: it re-evaluates every expert with the protocol.
    assert summary["brute-force"]["rel_error_increase"] == pytest.approx(0.0)
    assert summary["brute-force"]["top1"] == 1.0
    for row in summary.values():
        assert set(row) == {
            "rel_error_increase",
            "median_rel_error_increase",
            "weighted_tau",
            "top1",
            "seconds",
        }
        assert row["rel_error_increase"] >= 0.0
    assert len(results["per_task"]["learned"]) == len(zoo.tasks)
    assert 0.0 <= results["zoo"]["imagenet_expert_not_best_share"] <= 1.0
    assert results["zoo"]["index_recall_at_10"] >= 0.95

    write_report(zoo, results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["recommenders"] == summary
    for name in ("report.md", "task_map.png", "distance_matrix.png", "error_increase.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_learned_scorer_never_sees_the_held_out_row(zoo: Zoo) -> None:
    target = 2
    scorer = LearnedScorer(zoo, k=3, exclude=target)
    altered = Zoo(
        zoo.embed_config,
        zoo.tasks,
        zoo.embeddings,
        zoo.experts,
        np.where(np.arange(len(zoo.tasks))[:, None] == target, 1.0 - zoo.errors, zoo.errors),
        zoo.protocol,
    )
    again = LearnedScorer(altered, k=3, exclude=target)
    query = Query(zoo.embeddings[target], exclude=target)
    assert [r.score for r in scorer(zoo, query)] == pytest.approx(
        [r.score for r in again(altered, query)]
    )
