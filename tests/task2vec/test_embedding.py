"""End-to-end embedding: layout, determinism, and the properties the method claims."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from app.data.offline import fashion_mnist, mnist_5k
from app.task2vec import EmbedConfig, Embedding, embed, from_arrays
from app.task2vec.datasets import LabelledImages
from app.task2vec.distances import symmetric
from app.task2vec.errors import ConfigError

FAST = EmbedConfig(
    probe="resnet18",
    probe_weights="random:0",
    image_size=32,
    max_samples=48,
    fisher_samples=16,
    batch_size=8,
    head_epochs=1,
    device="cpu",
)


def _reference_filter_counts(arch: str, skip_to: str | None = None) -> list[int]:
    """Filters per conv/BN module in torchvision's own named_modules order (fc excluded)."""
    model = getattr(torchvision.models, arch)()
    counts, started = [], skip_to is None
    for name, module in model.named_modules():
        started = started or name == skip_to
        if started and isinstance(module, nn.Conv2d | nn.BatchNorm2d):
            counts.append(int(module.weight.shape[0]))
    return counts


@pytest.mark.parametrize(
    ("arch", "skip", "method", "dim", "first_module"),
    [
        ("resnet18", 0, "montecarlo", 9_600, "conv1"),
        ("resnet34", 0, "montecarlo", 17_024, "conv1"),
        ("resnet34", 6, "montecarlo", 13_824, "layer3"),
        ("resnet34", 0, "variational", 8_512, "conv1"),
    ],
)
def test_layout_matches_the_reference(
    tiny_task: LabelledImages, arch: str, skip: int, method: str, dim: int, first_module: str
) -> None:
    config = replace(FAST, probe=arch, skip_layers=skip, method=method)  # type: ignore[arg-type]
    e = embed(tiny_task, config)
    assert e.dim == dim == e.scale.shape[0]
    sizes = [size for _, size in e.meta["layout"]]
    reference = _reference_filter_counts(arch, None if skip == 0 else first_module)
    if method == "variational":
        model = getattr(torchvision.models, arch)()
        reference = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sizes == reference
    if method == "montecarlo":
        assert np.all(e.scale == 1.0)
    else:  # one prior scale per layer, repeated over its filters
        start = 0
        for size in sizes:
            assert len(set(e.scale[start : start + size].tolist())) == 1
            start += size


def test_same_seed_same_embedding_bit_for_bit(tiny_task: LabelledImages) -> None:
    for config in (FAST, replace(FAST, probe_weights="random", fisher_estimator="batch")):
        a, b = embed(tiny_task, config), embed(tiny_task, config)
        assert np.array_equal(a.hessian, b.hessian)
        c = embed(tiny_task, replace(config, seed=1))
        assert not np.array_equal(a.hessian, c.hessian)


def test_embedding_round_trips_through_a_file(tiny_task: LabelledImages, tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = embed(tiny_task, replace(FAST, method="variational"))
    e.save(tmp_path / "e.npz")
    loaded = Embedding.load(tmp_path / "e.npz")
    assert np.array_equal(loaded.hessian, e.hessian)
    assert np.array_equal(loaded.scale, e.scale)
    assert loaded.meta["method"] == "variational"
    assert loaded.meta["seed"] == 0
    assert loaded.meta["samples"] == 48
    assert loaded.meta["wall_time_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["e.npz"]  # no temporary files left


def test_max_samples_is_a_stratified_subset_not_the_first_images() -> None:
    # Class-sorted data: the first 20 images are all class 0.
    labels = np.repeat(np.arange(4), 30)
    data = from_arrays(np.zeros((120, 12, 12), np.uint8), labels)
    e = embed(data, replace(FAST, max_samples=20))
    assert e.meta["samples"] == 20
    assert e.meta["num_classes"] == 4


def test_train_batchnorm_only_with_the_reference_estimator(tiny_task: LabelledImages) -> None:
    with pytest.raises(ConfigError, match="train mode"):
        embed(tiny_task, replace(FAST, batchnorm="train"))
    e = embed(tiny_task, replace(FAST, batchnorm="train", fisher_estimator="batch"))
    assert e.meta["batchnorm"] == "train"


def test_bad_options_are_refused_with_a_reason(tiny_task: LabelledImages) -> None:
    with pytest.raises(ConfigError, match="skip-layers"):
        embed(tiny_task, replace(FAST, skip_layers=8))
    with pytest.raises(ConfigError, match="max-samples"):
        embed(tiny_task, replace(FAST, max_samples=2))
    with pytest.raises(ConfigError, match="at least one batch"):
        embed(tiny_task, replace(FAST, fisher_estimator="batch", fisher_samples=4))
    with pytest.raises(ConfigError, match="variational method needs"):
        embed(tiny_task, replace(FAST, method="variational", fisher_samples=4))
    with pytest.raises(ConfigError, match="per-sample Monte Carlo estimator only"):
        embed(tiny_task, replace(FAST, fisher_estimator="batch", fisher_labels="exact"))


def test_skip_layers_gives_the_same_embedding_cached_or_recomputed(
    tiny_task: LabelledImages,
) -> None:
    cached = embed(tiny_task, replace(FAST, skip_layers=6))
    recomputed = embed(tiny_task, replace(FAST, skip_layers=6, feature_cache_mb=0))
    assert cached.meta["cached_layer_input"] is True
    assert recomputed.meta["cached_layer_input"] is False
    np.testing.assert_allclose(recomputed.hessian, cached.hessian, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Properties of the method on real images with the ImageNet probe that ships offline.

REAL = EmbedConfig(
    probe="efficientnet_lite0",
    image_size=64,
    max_samples=400,
    fisher_samples=512,
    head_epochs=3,
    fisher_labels="gaussian",
    device="cpu",
)


def _fashion(classes: list[int], n: int = 400) -> LabelledImages:
    x, y, _ = fashion_mnist("test")
    keep = np.flatnonzero(np.isin(y, classes))[:n]
    return from_arrays(x[keep], y[keep])


@pytest.mark.slow
def test_relabelling_the_classes_leaves_the_embedding_unchanged() -> None:
    task = _fashion([0, 1, 2, 3, 4])
    permutation = np.array([3, 0, 4, 1, 2])
    relabelled = from_arrays(task.images, permutation[task.labels])

    # With the exact expectation over model labels nothing random depends on the class
    # indices: the head is permuted, the Fisher is the same.
    exact = replace(REAL, max_samples=150, fisher_samples=150, fisher_labels="exact")
    assert symmetric(embed(task, exact), embed(relabelled, exact)) < 1e-3

    # With random model labels the two differ by seed noise only, while the same images
    # with shuffled labels (a different task) lie far away.
    a, b = embed(task, REAL), embed(relabelled, REAL)
    reseeded = embed(task, replace(REAL, seed=1))
    rng = np.random.default_rng(0)
    shuffled = embed(from_arrays(task.images, rng.permutation(task.labels)), REAL)
    assert symmetric(a, b) <= symmetric(a, reseeded)
    assert symmetric(a, b) < 0.5 * symmetric(a, shuffled)


@pytest.mark.slow
def test_similar_tasks_are_closer_than_different_domains() -> None:
    clothes = embed(_fashion([0, 2, 4, 6]), REAL)  # tops
    shoes = embed(_fashion([5, 7, 9, 8]), REAL)  # footwear and bags
    x, y, _ = mnist_5k()  # sorted by class: take 100 of each of four digits
    keep = np.concatenate([np.flatnonzero(y == d)[:100] for d in (0, 1, 2, 3)])
    digits = embed(from_arrays(x[keep], y[keep]), REAL)
    between_fashion = symmetric(clothes, shoes)
    assert between_fashion < symmetric(clothes, digits)
    assert between_fashion < symmetric(shoes, digits)


def test_gpu_path_is_used_when_asked_for_and_present(tiny_task: LabelledImages) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            embed(tiny_task, replace(FAST, device="cuda"))
        return
    on_gpu = embed(tiny_task, replace(FAST, device="cuda"))
    on_cpu = embed(tiny_task, FAST)
    assert on_gpu.meta["device"] == "cuda"
    assert on_gpu.dim == on_cpu.dim
    # Same draws and labels (sampled on the CPU generator); only float rounding differs.
    assert symmetric(on_gpu, on_cpu) < 1e-3


@pytest.mark.parametrize("estimator", ["per-sample", "batch"])
def test_every_stage_reports_its_progress(tiny_task: LabelledImages, estimator: str) -> None:
    """Each stage reports (done, total) as it goes, from 0 to all of it: a job's progress
    moves through the Fisher stage too, batch by batch."""
    reports: dict[str, list[tuple[int, int]]] = {}
    config = replace(FAST, fisher_estimator=estimator)  # type: ignore[arg-type]
    embed(
        tiny_task,
        config,
        progress=lambda stage, done, total: reports.setdefault(stage, []).append((done, total)),
    )
    assert {"features", "head", "fisher"} <= set(reports)
    fisher = reports["fisher"]
    assert fisher[0] == (0, 16)
    assert fisher[-1] == (16, 16)
    assert [done for done, _ in fisher] == sorted(done for done, _ in fisher)
    assert any(0 < done < 16 for done, _ in fisher)  # batches of 8: halfway is reported
