"""Experts: loading, feature extraction, training a small CNN, and the evaluation protocol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.task2vec.errors import ConfigError, ProbeWeightsError
from app.zoo.experts import (
    ExpertSpec,
    SmallCNN,
    SmallMLP,
    _scratch_network,
    load_expert,
    parameter_count,
    train_expert,
)
from app.zoo.features import extract_features
from app.zoo.matrix import EvaluationProtocol, holdout_error
from app.zoo.tasks import TaskSpec, materialize

SHOES = TaskSpec("shoes", "fashion_mnist", ((5,), (7,), (9,)), ("sandal", "sneaker", "boot"), 300)
DIGITS = TaskSpec("digits", "mnist", tuple((d,) for d in range(4)), ("0", "1", "2", "3"), 300)


def test_imagenet_expert_features_separate_real_classes() -> None:
    spec = ExpertSpec("imagenet", "efficientnet_lite0", "imagenet", 64)
    model = load_expert(spec)
    data = materialize(SHOES)
    features = extract_features(spec, model, data)
    assert features.shape == (300, 1280)
    assert features.dtype == np.float32
    assert holdout_error(features, data.labels) < 0.25  # chance is 0.67


def test_a_trained_cnn_beats_its_untrained_self_on_its_source_task(tmp_path: Path) -> None:
    spec = ExpertSpec("cnn", "cnn-8x2", str(tmp_path / "cnn.pt"), 28, source_task="digits")
    data = materialize(DIGITS)
    torch.save(train_expert(spec, data, epochs=3), spec.weights)
    trained = extract_features(spec, load_expert(spec), data)
    assert trained.shape == (300, 16)

    untrained_path = tmp_path / "untrained.pt"
    torch.manual_seed(0)
    from app.zoo.experts import SmallCNN

    torch.save(SmallCNN(8, 2).state_dict(), untrained_path)
    untrained_spec = ExpertSpec("raw", "cnn-8x2", str(untrained_path), 28)
    untrained = extract_features(untrained_spec, load_expert(untrained_spec), data)
    assert holdout_error(trained, data.labels) < holdout_error(untrained, data.labels)


def test_training_is_seeded(tmp_path: Path) -> None:
    spec = ExpertSpec("cnn", "cnn-4x1", "", 16)
    data = materialize(DIGITS)
    a, b = train_expert(spec, data, epochs=1), train_expert(spec, data, epochs=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_experts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown expert architecture"):
        load_expert(ExpertSpec("x", "vit", "", 32))
    with pytest.raises(ProbeWeightsError, match="does not exist"):
        load_expert(ExpertSpec("x", "cnn-8x2", str(tmp_path / "none.pt"), 28))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ProbeWeightsError, match="do not fit cnn-8x2"):
        load_expert(ExpertSpec("x", "cnn-8x2", str(tmp_path / "bad.pt"), 28))
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ProbeWeightsError, match="not a PyTorch state dict"):
        load_expert(ExpertSpec("x", "cnn-8x2", str(tmp_path / "junk.pt"), 28))


def test_holdout_error_is_deterministic_and_tracks_separability() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    separable = rng.normal(0, 1, (200, 5)) + labels[:, None] * 4.0
    noise = rng.normal(0, 1, (200, 5))
    protocol = EvaluationProtocol()
    assert holdout_error(separable, labels, protocol) < 0.05
    assert holdout_error(noise, labels, protocol) > 0.3
    assert holdout_error(noise, labels, protocol) == holdout_error(noise, labels, protocol)
    assert "30% held out" in protocol.describe()["split"]


@pytest.mark.slow
def test_weights_are_checked_before_a_large_architecture_is_built(tmp_path: Path) -> None:
    """mlp-4096x6 at 64 px has 134M parameters (536 MB): named with small weights, it is
    refused by the shapes without allocating them (peak memory of a fresh process)."""
    weights = tmp_path / "small.pt"
    torch.save(SmallMLP(8, 1, 8).state_dict(), weights)
    code = (
        "import resource, sys\n"
        "from app.zoo.experts import ExpertSpec, load_expert\n"
        "from app.task2vec.errors import ProbeWeightsError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"spec = ExpertSpec('big', 'mlp-4096x6', {str(weights)!r}, 64)\n"
        "try:\n"
        "    load_expert(spec)\n"
        "except ProbeWeightsError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "else:\n"
        "    raise SystemExit('loaded')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert int(out.stdout) < 100_000  # KiB: far below the 536 MB the weights would take
    assert "do not fit mlp-4096x6" in out.stderr
    assert "body.1.weight: (8, 192)" in out.stderr


def test_an_experts_size_is_counted_without_its_weights() -> None:
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    trunk = sum(p.numel() for p in resnet.parameters()) - sum(
        p.numel() for p in resnet.fc.parameters()
    )
    assert parameter_count("resnet18", 64) == trunk  # the classifier is not a feature
    cnn = SmallCNN(16, 3)
    assert parameter_count("cnn-16x3", 28) == sum(p.numel() for p in cnn.parameters())
    assert parameter_count("mlp-32x1", 16) == sum(
        p.numel() for p in _scratch_network("mlp-32x1", 16).parameters()
    )
    assert parameter_count("torchscript", 28) is None  # its architecture is in its file
    assert parameter_count("cnn-999x9", 28) is None  # not an architecture that builds
