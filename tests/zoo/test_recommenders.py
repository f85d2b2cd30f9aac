"""Recommenders on the tiny zoo, and LogME against its definition."""

from __future__ import annotations

import numpy as np
import pytest

from app.task2vec.errors import ConfigError
from app.zoo import recommenders
from app.zoo.evaluate import with_logme
from app.zoo.recommenders import (
    Query,
    Task2VecKNN,
    brute_force,
    global_best,
    logme,
    task2vec_asym,
)
from app.zoo.recommenders.transferability import _log_evidence
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    return tiny_built


def _dense_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    n, dim = f.shape
    a = alpha * np.eye(dim) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return float(
        dim / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((f @ m - y) ** 2)
        - alpha / 2 * m @ m
        - np.linalg.slogdet(a)[1] / 2
    )


@pytest.mark.parametrize(("n", "dim"), [(60, 8), (12, 30)])  # N > D, and N < D
def test_logme_evidence_matches_the_dense_definition(n: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, dim))
    y = (rng.random(n) > 0.5).astype(float)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z2 = (u.T @ y) ** 2
    for alpha, beta in [(0.5, 2.0), (3.0, 0.7)]:
        fast = _log_evidence(s**2, z2, float(y @ y - z2.sum()), n, dim, alpha, beta)
        assert fast == pytest.approx(_dense_log_evidence(f, y, alpha, beta), rel=1e-8)


def test_logme_prefers_informative_features() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    informative = rng.normal(size=(120, 16)) + np.eye(3)[labels] @ rng.normal(size=(3, 16)) * 3
    noise = rng.normal(size=(120, 16))
    assert logme(informative, labels) > logme(noise, labels)


def test_logme_of_features_that_carry_nothing_is_finite_and_below_informative_ones() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 30)
    informative = rng.normal(size=(60, 8)) + np.eye(2)[labels] @ rng.normal(size=(2, 8)) * 3
    with np.errstate(all="raise"):  # no 0/0 on the way
        dead = logme(np.zeros((60, 8)), labels)
        useful = logme(informative, labels)
    assert np.isfinite(dead)
    assert dead < useful


def test_every_recommender_ranks_every_expert_it_can(zoo: Zoo) -> None:
    zoo = with_logme(zoo)  # the hybrid fits its rule on it
    target = 3
    data = zoo.task_data(target)
    task = zoo.tasks[target]
    query = Query(zoo.embeddings[target], data, domain=task.domain, source=task.source)
    names = {e.name for e in zoo.experts}
    for name in recommenders.REGISTRY:
        ranking = recommenders.build(name, zoo)(zoo, query)
        scores = [r.score for r in ranking]
        assert scores == sorted(scores, reverse=True), name
        if name == "task2vec-asym":
            assert {r.expert for r in ranking} == {e.name for e in zoo.experts if e.source_task}
        else:
            assert {r.expert for r in ranking} == names, name


def test_a_subset_zoo_hides_the_held_out_task(zoo: Zoo) -> None:
    others = [t for t in range(len(zoo.tasks)) if t != 2]
    seen = zoo.subset(others, list(range(len(zoo.experts))))
    query = Query(zoo.embeddings[2])
    ranking = Task2VecKNN(seen, k=3)(seen, query)
    assert all(n["task"] != zoo.tasks[2].name for n in ranking[0].evidence["neighbours"])
    assert global_best(seen, query)[0].evidence["tasks"] == len(zoo.tasks) - 1


def test_brute_force_reproduces_the_matrix_row(zoo: Zoo) -> None:
    target = 1
    ranking = brute_force(zoo, Query(data=zoo.task_data(target)))
    by_name = {r.expert: r.evidence["error"] for r in ranking}
    expected = {e.name: zoo.errors[target, i] for i, e in enumerate(zoo.experts)}
    assert by_name == pytest.approx(expected)


def test_missing_inputs_are_named(zoo: Zoo) -> None:
    with pytest.raises(ConfigError, match="needs the task's embedding"):
        task2vec_asym(zoo, Query())
    with pytest.raises(ConfigError, match="needs the task's images"):
        brute_force(zoo, Query())
