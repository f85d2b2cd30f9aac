"""Meta-evaluation on the tiny zoo: both protocols, nothing of a held-out task leaks, and the
outside check against brute force."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.data.offline import fashion_mnist
from app.task2vec.datasets import from_arrays
from app.task2vec.embedding import Embedding
from app.zoo.check import CHECK_METHODS, check
from app.zoo.evaluate import (
    METHODS,
    PROTOCOLS,
    evaluate,
    fold_rankings,
    folds,
    logme_scores,
    paired_difference,
)
from app.zoo.experts import load_expert
from app.zoo.recommenders import Query, brute_force
from app.zoo.report import write_report
from app.zoo.zoo import Zoo

RANKERS = [m for m in METHODS if m != "learned-shuffled"]


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    return tiny_built


@pytest.fixture(scope="module")
def logme(zoo: Zoo) -> np.ndarray:
    return logme_scores(zoo)[0]


def test_evaluation_reports_both_protocols_and_writes_the_report(zoo: Zoo, tmp_path: Path) -> None:
    methods = list(METHODS)
    results = evaluate(zoo, methods, k=3, min_images=1)
    assert set(results["protocols"]) == set(PROTOCOLS)
    for result in results["protocols"].values():
        summary = result["recommenders"]
        assert set(summary) == set(methods)
        for row in summary.values():
            assert row["tasks"] == len(zoo.tasks)
            assert row["rel_error_increase"] >= 0.0
            assert row["regret"] >= 0.0
        assert set(result["domains"]["learned"]) == {t.domain for t in zoo.tasks}
        intervals = result["intervals"]
        assert intervals["queries"] == len(zoo.tasks)
        assert 0.0 <= intervals["covered"] <= 1.0
        assert intervals["width"] > 0
    per_task = results["protocols"]["domain"]["per_task"]["learned"]
    assert {row["fold"] for row in per_task} == {t.domain for t in zoo.tasks}
    assert 0.0 <= results["zoo"]["imagenet_expert_not_best_share"] <= 1.0
    assert results["zoo"]["index_recall_at_10"] >= 0.95

    write_report(zoo, results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (
        saved["protocols"]["task"]["recommenders"] == results["protocols"]["task"]["recommenders"]
    )
    report = (tmp_path / "report.md").read_text()
    assert "95% paired bootstrap" in report
    assert set(results["protocols"]["task"]["versus"]) == set(methods) - {"global-best"}
    assert "leave-one-task-out" in report
    assert "leave-one-domain-out" in report
    assert "leave-one-source-out" in report
    for name in ("task_map.png", "distance_matrix.png", "error_increase.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_paired_comparison_matches_tasks_and_brackets_the_mean() -> None:
    rng = np.random.default_rng(1)
    baseline = [{"task": f"t{i}", "regret": float(v)} for i, v in enumerate(rng.uniform(2, 4, 40))]
    # Better by 1 point on every task but one, listed in another order, and one task the
    # baseline never saw (left out of the pairing).
    rows = [{"task": r["task"], "regret": r["regret"] - 1.0} for r in reversed(baseline)]
    rows[0]["regret"] += 3.0
    rows.append({"task": "unseen", "regret": 100.0})
    result = paired_difference(rows, baseline, cluster=None)
    assert result["tasks"] == 40
    assert result["metric_difference"] == pytest.approx(-1.0 + 3.0 / 40)
    assert result["low"] < result["metric_difference"] < result["high"] < 0.0
    assert result["better"] == pytest.approx(39 / 40)
    assert result["worse"] == pytest.approx(1 / 40)
    assert paired_difference(rows, baseline, cluster=None) == result  # seeded
    same = paired_difference(baseline, baseline, cluster=None)
    assert same["metric_difference"] == same["low"] == same["high"] == 0.0
    assert same["better"] == same["worse"] == 0.0


def test_a_fold_holds_out_the_experts_trained_on_its_tasks(zoo: Zoo) -> None:
    for protocol in PROTOCOLS:
        for fold in folds(zoo, protocol, 1):
            held = {zoo.tasks[t].name for t in fold.held_out}
            kept = {zoo.experts[e].name for e in fold.experts}
            for e, expert in enumerate(zoo.experts):
                assert (expert.name in kept) == (expert.source_task not in held), (fold, e)
            # The ImageNet expert has no source task: it is always a candidate.
            assert "imagenet-efficientnet-lite0" in kept
    # Some folds do lose an expert: the protocol is not vacuous on this zoo.
    assert any(len(f.experts) < len(zoo.experts) for f in folds(zoo, "task", 1))
    by_domain = {f.name: len(f.experts) for f in folds(zoo, "domain", 1)}
    assert by_domain == {"clothing": 2, "handwritten digits": 2, "8x8 digits": 3}


def _noise_embedding(e: Embedding, rng: np.random.Generator) -> Embedding:
    noise = rng.lognormal(0.0, 2.0, e.hessian.shape).astype(e.hessian.dtype)
    return Embedding(noise, e.scale.copy(), dict(e.meta))


def _corrupted(zoo: Zoo, held: tuple[int, ...], folder: Path) -> Zoo:
    """The zoo with everything derived from the held-out tasks replaced by noise: their
    matrix rows, their embeddings in the zoo, and the weights of the experts trained on them."""
    rng = np.random.default_rng(7)
    errors = zoo.errors.copy()
    errors[list(held)] = rng.uniform(0.0, 1.0, (len(held), errors.shape[1]))
    embeddings = [
        _noise_embedding(e, rng) if t in held else e for t, e in enumerate(zoo.embeddings)
    ]
    names = {zoo.tasks[t].name for t in held}
    experts = []
    for expert in zoo.experts:
        if expert.source_task in names:
            state = load_expert(expert).state_dict()
            noisy = {k: torch.rand_like(v.float()).to(v.dtype) for k, v in state.items()}
            path = folder / f"{expert.name}-noise.pt"
            torch.save(noisy, path)
            expert = replace(expert, weights=str(path))
        experts.append(expert)
    return Zoo(zoo.embed_config, zoo.tasks, embeddings, experts, errors, zoo.protocol)


def _rankings(
    zoo: Zoo, protocol: str, logme: np.ndarray, queries: list[Embedding]
) -> dict[tuple[str, str, int], list[tuple[str, float]]]:
    out = {}
    for fold in folds(zoo, protocol, 1):
        answers = fold_rankings(zoo, fold, RANKERS, 3, logme, dict(enumerate(queries)))
        for method, by_task in answers.items():
            for t, (ranking, _) in by_task.items():
                out[(fold.name, method, t)] = [(r.expert, round(r.score, 9)) for r in ranking]
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nothing_derived_from_a_held_out_task_changes_its_ranking(
    zoo: Zoo, logme: np.ndarray, protocol: str, tmp_path: Path
) -> None:
    """For every fold: noise in place of the held-out tasks' rows, zoo embeddings and experts'
    weights leaves every method's ranking of those tasks exactly as it was. The query is the
    task's own embedding (what the user's images give), passed alongside."""
    queries = list(zoo.embeddings)
    clean = _rankings(zoo, protocol, logme, queries)
    assert {method for _, method, _ in clean} == set(RANKERS)
    for fold in folds(zoo, protocol, 1):
        noisy = _corrupted(zoo, fold.held_out, tmp_path)
        noisy_logme = logme_scores(noisy)[0]
        for t in fold.held_out:
            # LogME of an expert on a task depends on that expert's weights: recomputed with
            # the noisy ones, it differs exactly for the experts the fold holds out.
            changed = [e for e in range(len(zoo.experts)) if noisy_logme[t, e] != logme[t, e]]
            assert set(changed) <= set(range(len(zoo.experts))) - set(fold.experts)
        answers = fold_rankings(noisy, fold, RANKERS, 3, noisy_logme, dict(enumerate(queries)))
        for method, by_task in answers.items():
            for t, (ranking, _) in by_task.items():
                got = [(r.expert, round(r.score, 9)) for r in ranking]
                assert got == clean[(fold.name, method, t)], (fold.name, method, t)


def test_an_outside_check_scores_the_rankings_against_brute_force(zoo: Zoo) -> None:
    """Datasets from outside the zoo (Fashion-MNIST's t10k, which no zoo task or expert
    touches): the truth is every expert evaluated on them, as the oracle recommender does."""
    x, y, _ = fashion_mnist("test")
    rng = np.random.default_rng(3)
    outside = {}
    for name, classes in (("shoes", (5, 7, 9)), ("tops", (0, 2, 4, 6))):
        index = rng.choice(np.flatnonzero(np.isin(y, classes)), 90, replace=False)
        outside[name] = from_arrays(x[index], y[index])
    results = check(zoo, outside, CHECK_METHODS, k=3)

    assert set(results["recommenders"]) == set(CHECK_METHODS)
    assert all(row["tasks"] == 2 for row in results["recommenders"].values())
    for name, data in outside.items():
        oracle = brute_force(zoo, Query(None, data))
        assert results["errors"][name] == {r.expert: r.evidence["error"] for r in oracle}
    for rows in results["per_dataset"].values():
        for row in rows:
            errors = results["errors"][row["dataset"]]
            assert row["best"] == min(errors, key=errors.__getitem__)
            assert row["regret"] == pytest.approx(100 * (errors[row["pick"]] - errors[row["best"]]))
            assert row["top1"] == float(row["regret"] == 0.0)
            assert -1.0 <= row["weighted_tau"] <= 1.0
    assert results["intervals"]["queries"] == 2
    assert 0.0 <= results["intervals"]["covered"] <= 1.0

    with pytest.raises(ValueError, match="unknown recommenders: oracle"):
        check(zoo, outside, ("oracle",))
    with pytest.raises(ValueError, match="at least one labelled dataset"):
        check(zoo, {}, CHECK_METHODS)
