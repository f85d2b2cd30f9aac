"""Zoo task recipes and the demo/tiny presets."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from app.task2vec.errors import DatasetError
from app.task2vec.probes import checkpoint_cache_dir, load_probe
from app.zoo.presets import recipe, tiny
from app.zoo.provenance import EXPERT_POOL
from app.zoo.tasks import TRANSFORMS, TaskSpec, materialize, source_indices


def test_demo_preset_spans_domains_sizes_and_groupings() -> None:
    zoo = recipe("demo")
    tasks = zoo.tasks
    assert len(tasks) >= 150
    assert len({t.name for t in tasks}) == len(tasks)
    assert len({t.key() for t in tasks}) == len(tasks)
    domains = collections.Counter(t.domain for t in tasks)
    assert len(domains) >= 6
    assert min(domains.values()) >= 10
    assert min(t.size / len(t.groups) for t in tasks) <= 10  # a few images per class
    assert max(t.size for t in tasks) >= 1000
    assert any(any(len(g) > 1 for g in t.groups) for t in tasks)  # semantic groupings
    assert {t.transform for t in tasks} >= {None, *TRANSFORMS}
    assert len(zoo.experts) >= 24
    families = {e.architecture.split("-")[0] for e in zoo.experts}
    assert families == {"cnn", "mlp", "resnet18", "efficientnet_lite0"}
    assert any(e.weights == "finetune" for e in zoo.experts)
    names = {t.name for t in tasks}
    assert all(e.source_task is None or e.source_task in names for e in zoo.experts)


def test_every_demo_task_fits_its_pools() -> None:
    """Each demo recipe, and each expert's training draw, fits the pool it is cut from."""
    zoo = recipe("demo")
    for task in zoo.tasks:
        assert len(source_indices(task, zoo.protocol.split)) == task.size
    by_name = {t.name: t for t in zoo.tasks}
    for expert in zoo.experts:
        if expert.source_task is not None:
            source = by_name[expert.source_task]
            assert len(source_indices(source, zoo.protocol.split, EXPERT_POOL)) == source.size
    starter = recipe("starter")
    assert {t.name for t in starter.tasks} <= names_of(zoo.tasks)
    assert starter.protocol == zoo.protocol


def names_of(tasks: list[TaskSpec]) -> set[str]:
    return {t.name for t in tasks}


def test_transforms_keep_shape_and_type() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 12, 12), dtype=np.uint8)
    colour = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    for name, transform in TRANSFORMS.items():
        for images in (grey, colour):
            out = transform(images, np.random.default_rng(1))
            assert out.shape == images.shape, name
            assert out.dtype == np.uint8, name
            assert not np.array_equal(out, images), name


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


def test_demo_zoo_uses_resnet34_when_its_imagenet_weights_are_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert recipe("demo").embed_config.probe == "efficientnet_lite0"
    url = torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url
    cached = checkpoint_cache_dir() / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), cached)
    config = recipe("demo").embed_config
    assert config.probe == "resnet34"
    assert config.probe_weights == "imagenet"
    probe = load_probe(config.probe, weights=config.probe_weights, allow_download=False)
    assert probe.weights_source == f"imagenet:{cached.name}"
    chance = recipe("demo-chance")
    assert (chance.embed_config.probe, chance.embed_config.probe_weights) == (
        "resnet34",
        "random:0",
    )
    assert chance.tasks == recipe("demo").tasks
