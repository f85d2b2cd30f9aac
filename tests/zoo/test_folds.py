"""The folds of the meta-evaluation on the tiny zoo: no query keeps an image in the zoo it is
compared against, small tasks are never scored, and the bootstrap resamples whole clusters."""

from __future__ import annotations

import numpy as np
import pytest

from app.zoo.evaluate import paired_difference
from app.zoo.folds import PROTOCOLS, folds, scored, shared_images
from app.zoo.tasks import source_indices
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    return tiny_built


def _images(zoo: Zoo, t: int) -> set[tuple[str, int]]:
    task = zoo.tasks[t]
    return {(task.source, int(i)) for i in source_indices(task, zoo.protocol.split)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_visible_task_shares_an_image_with_a_query(zoo: Zoo, protocol: str) -> None:
    images = [_images(zoo, t) for t in range(len(zoo.tasks))]
    for fold in folds(zoo, protocol, min_images=1):
        for q in fold.queries:
            assert q in fold.held_out
            for v in fold.visible(zoo):
                assert not images[q] & images[v], (fold.name, zoo.tasks[q].name, zoo.tasks[v].name)


def test_leave_one_task_out_hides_more_than_the_task_on_this_zoo(zoo: Zoo) -> None:
    """The tiny zoo's tasks of one domain overlap, so the rule is not vacuous here, and each
    task fold hides exactly the tasks that share an image with its query."""
    shared = shared_images(zoo)
    images = [_images(zoo, t) for t in range(len(zoo.tasks))]
    for t in range(len(zoo.tasks)):
        assert shared[t] == {u for u in range(len(zoo.tasks)) if images[t] & images[u]}
    task_folds = folds(zoo, "task", min_images=1)
    assert any(len(f.held_out) > 1 for f in task_folds)
    for fold in task_folds:
        (query,) = fold.queries
        assert set(fold.held_out) == shared[query]
        hidden = {zoo.tasks[t].name for t in fold.held_out}
        for e, expert in enumerate(zoo.experts):
            assert (e in fold.experts) == (expert.source_task not in hidden)


def test_leave_one_source_out_holds_out_each_image_set_whole(zoo: Zoo) -> None:
    by_source = {f.name: f for f in folds(zoo, "source", min_images=1)}
    assert set(by_source) == {t.source for t in zoo.tasks}
    for name, fold in by_source.items():
        assert {zoo.tasks[t].source for t in fold.held_out} == {name}
        assert all(zoo.tasks[t].source != name for t in fold.visible(zoo))


def test_only_tasks_with_enough_held_out_images_are_scored(zoo: Zoo) -> None:
    sizes = {t.size for t in zoo.tasks}
    assert min(sizes) < 100 <= max(sizes)  # 30% held out: under and over 30 images
    queried = {q for f in folds(zoo, "task") for q in f.queries}
    assert queried == {t for t, task in enumerate(zoo.tasks) if task.size >= 100}
    assert all(scored(zoo.tasks[t], zoo) for t in queried)
    # The small tasks stay in the zoo: visible to the folds of the others.
    small = set(range(len(zoo.tasks))) - queried
    assert any(small & set(f.visible(zoo)) for f in folds(zoo, "task"))


def _rows(values: dict[str, list[float]]) -> list[dict[str, object]]:
    return [
        {"task": f"{domain}-{i}", "domain": domain, "regret": v}
        for domain, vs in values.items()
        for i, v in enumerate(vs)
    ]


def test_the_clustered_bootstrap_resamples_domains_not_queries() -> None:
    """Two domains of 30 queries each: better by 2 points on one, worse by 1 on the other.
    Queries resampled singly, the interval excludes zero; domains resampled whole (there are
    two), it spans both domains' means, as two independent observations should."""
    rng = np.random.default_rng(0)
    baseline = _rows({"a": [5.0] * 30, "b": [5.0] * 30})
    rows = _rows({"a": list(3.0 + rng.normal(0, 0.1, 30)), "b": list(6.0 + rng.normal(0, 0.1, 30))})
    single = paired_difference(rows, baseline, cluster=None)
    clustered = paired_difference(rows, baseline)
    assert single["metric_difference"] == clustered["metric_difference"]
    assert single["high"] < 0.0
    assert clustered["clusters"] == 2
    assert clustered["low"] < -1.9
    assert clustered["high"] > 0.9
    assert paired_difference(rows, baseline) == clustered  # seeded
