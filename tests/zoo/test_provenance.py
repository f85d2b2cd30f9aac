"""Image provenance: no matrix entry is measured on an image any expert trained on."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from app.data import offline
from app.zoo.build import PROVENANCE_FILE
from app.zoo.presets import recipe
from app.zoo.provenance import EXPERT_POOL, ImageSplit
from app.zoo.tasks import SOURCES, TaskSpec, materialize, source_indices
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def built(tiny_built: Zoo) -> Zoo:
    return tiny_built


def test_split_pools_are_disjoint_seeded_and_cover_the_source() -> None:
    split = ImageSplit(seed=3, expert_share=0.5)
    pools = split.pools("mnist", 1000, ("plain", "altered"))
    assert set(pools) == {EXPERT_POOL, "plain", "altered"}
    together = np.concatenate(list(pools.values()))
    assert sorted(together.tolist()) == list(range(1000))  # disjoint and complete
    assert len(pools[EXPERT_POOL]) == 500
    assert abs(len(pools["plain"]) - len(pools["altered"])) <= 1
    again = ImageSplit(seed=3, expert_share=0.5).pools("mnist", 1000, ("plain", "altered"))
    assert all(np.array_equal(pools[k], again[k]) for k in pools)
    other = ImageSplit(seed=4).pools("mnist", 1000, ("plain", "altered"))
    assert not np.array_equal(pools[EXPERT_POOL], other[EXPERT_POOL])
    # Another source's name draws another order: adding a source moves nothing of this one.
    assert not np.array_equal(split.order("mnist", 1000), split.order("digits", 1000))


def test_a_task_and_its_experts_draw_from_disjoint_pools() -> None:
    split = ImageSplit()
    spec = TaskSpec("t", "mnist", ((0,), (1,), (2,)), ("0", "1", "2"), 200)
    evaluation = source_indices(spec, split)
    training = source_indices(spec, split, EXPERT_POOL)
    assert len(evaluation) == len(training) == 200
    assert not set(evaluation.tolist()) & set(training.tolist())
    altered = TaskSpec("a", "mnist", ((0,), (1,), (2,)), ("0", "1", "2"), 200, transform="noisy")
    assert altered.domain == "handwritten digits, altered"
    assert not set(source_indices(altered, split).tolist()) & set(evaluation.tolist())
    # The data is what the indices say, transformed when the recipe says so.
    images, _, _ = SOURCES["mnist"].load()
    data = materialize(spec, split=split)
    assert np.array_equal(data.images[..., 0], images[evaluation])
    noisy = materialize(altered, split=split)
    assert not np.array_equal(noisy.images[..., 0], images[source_indices(altered, split)])


def test_a_pool_too_small_for_the_recipe_is_refused() -> None:
    spec = TaskSpec("big", "digits", ((0,), (1,)), ("0", "1"), 300)
    with pytest.raises(Exception, match="asks for 300 images"):
        source_indices(spec, ImageSplit())


def test_no_matrix_entry_is_measured_on_an_image_an_expert_trained_on(built: Zoo) -> None:
    """Across the whole built zoo: every task's evaluation images against every trained
    expert's training images, by source image index."""
    assert built.folder is not None
    record = json.loads((built.folder / PROVENANCE_FILE).read_text())
    assert record["split"] == {"seed": 0, "expert_share": 0.5}
    trained: dict[str, set[int]] = defaultdict(set)
    for name, used in record["experts"].items():
        assert used["indices"], name
        trained[used["source"]].update(used["indices"])
    assert set(record["experts"]) == {e.name for e in built.experts if e.source_task}
    overlaps = {
        name: len(trained[used["source"]] & set(used["indices"]))
        for name, used in record["tasks"].items()
    }
    assert set(overlaps) == {t.name for t in built.tasks}
    assert all(n == 0 for n in overlaps.values()), overlaps
    # And the record is what the zoo's tasks are made of.
    for t, task in enumerate(built.tasks):
        assert (
            record["tasks"][task.name]["indices"]
            == source_indices(task, built.protocol.split).tolist()
        )
        assert len(built.task_data(t)) == task.size


def test_the_fashion_mnist_test_split_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zoo's sources work with t10k absent: it stays reserved for outside checks."""
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(offline.FASHION_MNIST_DIR / name, tmp_path / name)
    monkeypatch.setattr(offline, "FASHION_MNIST_DIR", tmp_path)
    images, _, _ = SOURCES["fashion_mnist"].load()
    assert images.shape[0] == 60_000
    for task in recipe("demo").tasks:
        if task.source == "fashion_mnist":
            source_indices(task, ImageSplit())
    with pytest.raises(Exception, match="not installed"):
        offline.fashion_mnist("test")
