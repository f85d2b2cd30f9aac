"""The learned scorer uses the task embedding: a zoo whose best expert follows the task's
domain, against the same zoo with its embeddings dealt out to the wrong tasks. Its fit reads at
most ``fit_tasks`` tasks (every one of a smaller zoo), and a ranking reads no zoo row but its
neighbours' and the experts' source tasks'."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import ConfigError
from app.zoo.evaluate import evaluate
from app.zoo.experts import ExpertSpec
from app.zoo.matrix import EvaluationProtocol
from app.zoo.recommenders import LearnedScorer, Query, shuffled_embeddings
from app.zoo.recommenders.learned import _principal_axes, _randomized_axes, fit_sample
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import COMPARABLE_KEYS, Zoo


def _domain_zoo(tasks_per_domain: int = 12, dim: int = 300, seed: int = 0) -> Zoo:
    """Three domains, each with its own embedding profile; expert d is the best on domain d
    (with noise), and a fourth, generic expert sits in the middle everywhere."""
    rng = np.random.default_rng(seed)
    config = EmbedConfig(probe="synthetic")
    meta = {key: asdict(config)[key] for key in COMPARABLE_KEYS}
    centres = rng.normal(0, 1, (3, dim))
    tasks, embeddings, rows = [], [], []
    for d in range(3):
        for i in range(tasks_per_domain):
            size = int(rng.choice([100, 400, 1600]))
            # Uploaded tasks: they have no source images, so no two of them overlap.
            name = f"d{d}-{i}"
            tasks.append(
                TaskSpec(
                    name,
                    "upload",
                    ((0,), (1,)),
                    ("a", "b"),
                    size,
                    dataset=f"{name}.npz",
                    domain_name=f"domain-{d}",
                )
            )
            h = np.exp(centres[d] + rng.normal(0, 0.3, dim)).astype(np.float32)
            embeddings.append(
                Embedding(h, np.ones_like(h), {**meta, "num_images": size, "num_classes": 2})
            )
            errors = rng.uniform(0.25, 0.4, 4)
            errors[d] = rng.uniform(0.02, 0.08)
            errors[3] = rng.uniform(0.1, 0.2)
            rows.append(errors)
    experts = [ExpertSpec(f"expert-{d}", "cnn-8x2", "random:0", 28) for d in range(4)]
    return Zoo(config, tasks, embeddings, experts, np.array(rows), EvaluationProtocol())


def _top1(zoo: Zoo, query_zoo: Zoo) -> float:
    hits = []
    everyone = list(range(len(zoo.experts)))
    for t in range(len(zoo.tasks)):
        seen = query_zoo.subset([j for j in range(len(zoo.tasks)) if j != t], everyone)
        ranking = LearnedScorer(seen, k=3)(seen, Query(query_zoo.embeddings[t]))
        hits.append(ranking[0].expert == zoo.experts[zoo.best_expert(t)].name)
    return float(np.mean(hits))


def test_learned_scorer_beats_its_shuffled_embedding_control() -> None:
    zoo = _domain_zoo(tasks_per_domain=8)
    assert _top1(zoo, zoo) >= 0.9
    for seed in range(2):
        assert _top1(zoo, shuffled_embeddings(zoo, seed)) <= 0.6


def test_evaluation_reports_the_shuffled_control() -> None:
    zoo = _domain_zoo(tasks_per_domain=6)
    methods = ["learned", "learned-shuffled", "global-best"]
    results = evaluate(zoo, methods, k=3, protocols=("task",))
    summary = results["protocols"]["task"]["recommenders"]
    assert summary["learned"]["top1"] > summary["learned-shuffled"]["top1"]
    assert summary["learned"]["rel_error_increase"] < summary["global-best"]["rel_error_increase"]


def test_shuffled_embeddings_leave_no_task_its_own() -> None:
    zoo = _domain_zoo(tasks_per_domain=2)
    control = shuffled_embeddings(zoo, seed=1)
    assert not any(a is b for a, b in zip(zoo.embeddings, control.embeddings, strict=True))
    assert sorted(id(e) for e in control.embeddings) == sorted(id(e) for e in zoo.embeddings)


def _svd_axes(x: np.ndarray, components: int) -> np.ndarray:
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    axes: np.ndarray = vt[:components].T / singular[:components]
    return axes


def _assert_same_axes(got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    signs = np.sign((expected * got).sum(axis=0))
    np.testing.assert_allclose(got * signs, expected, atol=atol)


def test_the_principal_axes_are_the_svds_up_to_sign() -> None:
    x = np.random.default_rng(0).normal(size=(30, 500))
    x -= x.mean(axis=0)
    _assert_same_axes(_principal_axes(x, 4), _svd_axes(x, 4), atol=1e-12)


def test_the_randomized_axes_are_the_svds_up_to_sign() -> None:
    rng = np.random.default_rng(0)
    # Four clear directions above the noise, as a zoo's domains give.
    x = rng.normal(size=(200, 4)) * [40, 30, 20, 10] @ rng.normal(size=(4, 500))
    x += rng.normal(size=(200, 500))
    x -= x.mean(axis=0)
    expected = _svd_axes(x, 4)
    _assert_same_axes(_randomized_axes(x, 4, seed=0), expected, atol=1e-6 * np.abs(expected).max())


class _Counted(list[Any]):
    """A zoo's list that remembers which positions were read."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.read: set[int] = set()

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            self.read.update(range(len(self))[i])
        else:
            self.read.add(int(i) % len(self))
        return super().__getitem__(i)

    def __iter__(self) -> Iterator[Any]:
        self.read.update(range(len(self)))
        return super().__iter__()


def _with_sources(zoo: Zoo, tasks: dict[int, int]) -> Zoo:
    """``zoo`` with expert e trained on task ``tasks[e]``."""
    experts = [
        replace(x, source_task=zoo.tasks[tasks[e]].name) if e in tasks else x
        for e, x in enumerate(zoo.experts)
    ]
    return Zoo(zoo.embed_config, zoo.tasks, zoo.embeddings, experts, zoo.errors, zoo.protocol)


def test_below_the_bound_the_fit_is_on_every_task() -> None:
    zoo = _with_sources(_domain_zoo(tasks_per_domain=8), {0: 3})
    scorer = LearnedScorer(zoo, k=3, fit_tasks=len(zoo.tasks))
    assert scorer.sample == list(range(len(zoo.tasks)))
    # The principal axes of all the tasks' log-embeddings...
    logs = np.stack([scorer._task_view(e)[2:] for e in zoo.embeddings])
    np.testing.assert_allclose(logs.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(logs.std(axis=0), 1, rtol=1e-5)
    # ...and a ridge over every task's rows, each task hidden from its own neighbours.
    x = np.vstack([scorer.features(e, [j]) for j, e in enumerate(zoo.embeddings)])
    y = np.concatenate(list(scorer.target))
    np.testing.assert_allclose(scorer.model.coef_, Ridge(alpha=1.0).fit(x, y).coef_, atol=1e-12)
    bigger = LearnedScorer(zoo, k=3, fit_tasks=10 * len(zoo.tasks))
    np.testing.assert_array_equal(bigger.model.coef_, scorer.model.coef_)


def _uneven_zoo() -> Zoo:
    """Domains of 10, 6 and 2 tasks; expert 0 trained on task 0, expert 1 on task 12."""
    zoo = _domain_zoo(tasks_per_domain=10)
    kept = [*range(10), *range(10, 16), *range(20, 22)]
    return _with_sources(zoo.subset(kept, list(range(len(zoo.experts)))), {0: 0, 1: 12})


def test_above_the_bound_the_fit_reads_a_sample_stratified_by_domain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    zoo = _uneven_zoo()
    zoo.index()  # the index's own copy of the rows is not the scorer's reading
    zoo.embeddings = _Counted(zoo.embeddings)
    fitted: list[tuple[int, ...]] = []
    fit = Ridge.fit

    def counted_fit(self: Ridge, x: np.ndarray, y: np.ndarray) -> Ridge:
        fitted.append(x.shape)
        return fit(self, x, y)

    monkeypatch.setattr(Ridge, "fit", counted_fit)
    scorer = LearnedScorer(zoo, k=3, fit_tasks=9)
    assert len(scorer.sample) == 9
    assert [zoo.tasks[t].domain for t in scorer.sample].count("domain-0") == 5
    assert [zoo.tasks[t].domain for t in scorer.sample].count("domain-1") == 3
    assert [zoo.tasks[t].domain for t in scorer.sample].count("domain-2") == 1
    assert zoo.embeddings.read <= set(scorer.sample) | {0, 12}
    assert fitted[0][0] == 9 * len(zoo.experts)
    assert scorer.sample == fit_sample(zoo, 9, seed=0)
    assert any(fit_sample(zoo, 9, seed=s) != scorer.sample for s in range(1, 4))


def test_fit_tasks_below_two_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        LearnedScorer(_domain_zoo(tasks_per_domain=2), fit_tasks=1)


def test_a_ranking_reads_only_its_neighbours_rows() -> None:
    whole = _uneven_zoo()
    zoo = whole.subset(list(range(1, len(whole.tasks))), list(range(len(whole.experts))))
    query = whole.embeddings[0]
    scorer = LearnedScorer(zoo, k=3, fit_tasks=9)
    expected = scorer(zoo, Query(query))
    near = {n.id for n in zoo.index().search(query, 3)}
    scorer.knn.z = np.where(
        np.isin(np.arange(len(zoo.tasks)), list(near))[:, None], scorer.knn.z, np.nan
    )
    zoo.embeddings, zoo.tasks = _Counted(zoo.embeddings), _Counted(zoo.tasks)
    assert scorer(zoo, Query(query)) == expected
    assert zoo.embeddings.read == set()
    assert zoo.tasks.read == set()
