"""Zoo task recipes and the demo/tiny presets."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from app.task2vec.errors import DatasetError
from app.zoo.presets import demo, tiny
from app.zoo.tasks import TaskSpec, materialize


def test_demo_preset_spans_domains_sizes_and_groupings() -> None:
    tasks = demo()
    assert len(tasks) >= 60
    assert len({t.name for t in tasks}) == len(tasks)
    assert len({t.key() for t in tasks}) == len(tasks)
    domains = collections.Counter(t.domain for t in tasks)
    assert len(domains) >= 2
    assert min(t.size for t in tasks) <= 100
    assert max(t.size for t in tasks) >= 2000
    assert any(any(len(g) > 1 for g in t.groups) for t in tasks)  # semantic groupings


def test_materialize_groups_classes_into_labels_reproducibly() -> None:
    spec = TaskSpec("shoes-vs-bags", "fashion_mnist", ((5, 7, 9), (8,)), ("shoes", "bag"), 200)
    data = materialize(spec)
    again = materialize(spec)
    assert len(data) == 200
    assert data.classes == ("bag", "shoes")
    assert data.class_counts().tolist() == [50, 150]  # the groups' shares of the source
    assert np.array_equal(data.images, again.images)
    other_seed = materialize(TaskSpec(**{**spec.__dict__, "seed": 1}))
    assert not np.array_equal(data.images, other_seed.images)


def test_tiny_preset_materialises() -> None:
    for spec in tiny():
        data = materialize(spec)
        assert len(data) == spec.size
        assert data.num_classes == len(spec.groups)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TaskSpec("x", "cifar", ((0,), (1,)), ("a", "b"), 10), "unknown task source"),
        (TaskSpec("x", "digits", ((0,),), ("a",), 10), "at least two"),
        (TaskSpec("x", "digits", ((0, 1), (1,)), ("a", "b"), 10), "two groups"),
    ],
)
def test_bad_recipes_are_refused(spec: TaskSpec, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        materialize(spec)
