"""Experts a team already has — torchvision and timm classifiers by name, TorchScript modules,
ONNX models — load as feature extractors that give the layer the documentation names, and a
model that does not load, raises, gives NaNs or the wrong shape is refused with the reason."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models

from app.task2vec.datasets import LabelledImages
from app.task2vec.errors import ConfigError, ProbeWeightsError
from app.zoo import architectures, features
from app.zoo.experts import ExpertSpec, default_normalisation, known, load_expert
from app.zoo.features import check_forward, extract_features, extract_many, load_checked
from tests.helpers import NanFeatures, ScalarOutput

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def _spec(architecture: str, weights: Path, size: int = 32) -> ExpertSpec:
    return ExpertSpec("e", architecture, str(weights), size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _small() -> nn.Module:
    """A small feature extractor to export as TorchScript and ONNX."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


def _onnx(module: nn.Module, path: Path, *, batch: int | None = None, size: int = 32) -> Path:
    dynamic = None if batch else {"x": {0: "n"}}
    torch.onnx.export(
        module,
        (torch.rand(batch or 1, 3, size, size),),
        str(path),
        input_names=["x"],
        dynamic_axes=dynamic,
        dynamo=False,
    )
    return path


def test_a_torchvision_classifier_gives_the_input_of_its_last_linear_layer(tmp_path: Path) -> None:
    net = models.get_model("mobilenet_v3_small", weights=None).eval()
    full = tmp_path / "full.safetensors"
    save_file(net.state_dict(), str(full))
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in net.state_dict().items() if "classifier.3" not in k}, headless)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = net.classifier[:-1](torch.flatten(net.avgpool(net.features(x)), 1))
    for weights in (full, headless):  # a full checkpoint or one without the classifier
        expert = load_checked(_spec("torchvision/mobilenet_v3_small", weights))
        with torch.no_grad():
            got = expert(x)
        assert got.shape == (3, 1024)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("builder", "dim"), [("squeezenet1_1", 512), ("regnet_x_400mf", 400)])
def test_builders_without_a_linear_head_or_that_cannot_build_on_meta(
    tmp_path: Path, builder: str, dim: int
) -> None:
    path = tmp_path / "w.pt"
    torch.save(models.get_model(builder, weights=None).state_dict(), path)
    spec = _spec(f"torchvision/{builder}", path)
    assert check_forward(spec, load_expert(spec)) == dim


def test_a_large_torchvision_architecture_named_with_small_weights_costs_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.pt"
    torch.save(_small().state_dict(), path)
    with pytest.raises(ProbeWeightsError, match="do not fit torchvision/vgg19"):
        load_expert(_spec("torchvision/vgg19", path))  # 143M parameters, built on meta


_PEAK = """
import resource, sys, warnings
from pathlib import Path

warnings.simplefilter("ignore")
from app.task2vec.errors import ProbeWeightsError
from app.zoo import architectures

small, builder = Path(sys.argv[1]), sys.argv[2]
try:  # the same refusal on a small RegNet first: every import and cache is warm
    architectures.build("warm", "torchvision/regnet_x_400mf", small)
except ProbeWeightsError:
    pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    architectures.build("big", f"torchvision/{builder}", small)
except ProbeWeightsError as exc:
    print("refused:", exc)
print("growth_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow  # a process of its own
def test_a_regnet_named_with_small_weights_is_refused_without_being_built(
    tmp_path: Path,
) -> None:
    """RegNet's builders compute with tensors (no meta build): its 145M parameters (580 MB)
    must still not be allocated to find that 8 KB of weights do not fit. Measured as the
    peak resident memory of a process of its own, with a bound far below the model's size."""
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(1000, 2)}, path)
    assert path.stat().st_size < 16_000
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path), "regnet_y_32gf"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert "do not fit torchvision/regnet_y_32gf" in lines.get("refused:", ""), done.stdout
    assert int(lines["growth_kib"]) < 150_000, done.stdout  # the model: 580 MB


def test_unknown_builders_and_models_are_named(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({}, path)
    with pytest.raises(ConfigError, match="no classification builder 'fasterrcnn"):
        load_expert(_spec("torchvision/fasterrcnn_resnet50_fpn", path))
    with pytest.raises(ConfigError, match="timm has no model 'no-such-net'"):
        load_expert(_spec("timm/no-such-net", path))
    assert all(map(known, ["timm/resnet18", "onnx", "torchscript", "cnn-4x2", "resnet18"]))
    assert not any(map(known, ["pickle", "torchvisionresnet18", "ONNX", "timm"]))


def test_a_timm_model_and_its_preset_normalisation(tmp_path: Path) -> None:
    import timm

    net = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(path))
    expert = load_checked(_spec("timm/resnet18", path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(expert(x), net.forward_head(net.forward_features(x), True))
    mean, std = architectures.preset_normalisation("timm/resnet18")
    assert mean == pytest.approx(net.pretrained_cfg["mean"])
    assert std == pytest.approx(net.pretrained_cfg["std"])
    assert architectures.preset_normalisation("onnx") == architectures.IMAGENET_NORMALISATION
    assert default_normalisation("torchvision/resnet18") == architectures.IMAGENET_NORMALISATION
    assert default_normalisation("cnn-4x2") == ((0.5,) * 3, (0.5,) * 3)


def test_torchscript_and_onnx_experts_give_the_modules_features(tmp_path: Path) -> None:
    module = _small()
    scripted = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(module), str(scripted))
    dynamic = _onnx(module, tmp_path / "dynamic.onnx")
    fixed = _onnx(module, tmp_path / "fixed.onnx", batch=2)  # 5 images: chunks of 2, padded
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        want = module(x)
    for architecture, path in (("torchscript", scripted), ("onnx", dynamic), ("onnx", fixed)):
        expert = load_checked(_spec(architecture, path))
        with torch.no_grad():
            torch.testing.assert_close(expert(x), want, atol=1e-5, rtol=1e-4)


class _Maps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2, :4, :4]  # (N, 2, 4, 4) maps, flattened to 32 features


class _Fixed(nn.Module):
    """A linear layer on flattened 16 px images: it fails at any other size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _Batch(nn.Module):
    """Features that depend on the rest of the batch (batch statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.mean((2, 3))
        return flat - flat.mean(0, keepdim=True)


def _scripted(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_maps_are_flattened(tmp_path: Path) -> None:
    spec = _spec("torchscript", _scripted(_Maps(), tmp_path / "maps.pt"))
    assert check_forward(spec, load_expert(spec)) == 32


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (NanFeatures(), "NaN or infinite features"),
        (ScalarOutput(), r"returns shape \(\) for 4 images"),
        (_Fixed(), "fails on 4 images of 32x32 px: "),
        (_Batch(), "depend on the other images of its batch"),
    ],
)
def test_a_model_that_raises_gives_nans_or_the_wrong_shape_is_refused(
    tmp_path: Path, module: nn.Module, why: str
) -> None:
    for architecture, path in (
        ("torchscript", _scripted(module, tmp_path / "m.pt")),
        ("onnx", _onnx(module, tmp_path / "m.onnx", size=16 if isinstance(module, _Fixed) else 32)),
    ):
        with pytest.raises(ProbeWeightsError, match=why):
            load_checked(_spec(architecture, path))


def test_files_that_are_not_models_are_refused_with_the_reason(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(ProbeWeightsError, match="not an ONNX model"):
        load_expert(_spec("onnx", junk))
    with pytest.raises(ProbeWeightsError, match="not a TorchScript module"):
        load_expert(_spec("torchscript", junk))
    with pytest.raises(ProbeWeightsError, match="not a PyTorch state dict or a safetensors"):
        load_expert(_spec("torchvision/resnet18", junk))
    two = tmp_path / "two.onnx"

    class _Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    torch.onnx.export(_Two(), (torch.rand(1, 3), torch.rand(1, 3)), str(two), dynamo=False)
    with pytest.raises(ProbeWeightsError, match="takes one float input"):
        load_expert(_spec("onnx", two))


def test_one_pass_serves_every_expert_and_resizes_once_per_input_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    data = LabelledImages(
        rng.integers(0, 255, (40, 20, 20, 3), dtype=np.uint8), np.arange(40) % 2, ["a", "b"]
    )
    module = _small()
    experts = [
        (_spec("torchscript", _scripted(module, tmp_path / "a.pt"), size=16), None),
        (_spec("onnx", _onnx(module, tmp_path / "b.onnx", size=16), size=16), None),
        (_spec("torchscript", tmp_path / "a.pt", size=24), None),
    ]
    loaded = [(spec, load_expert(spec)) for spec, _ in experts]
    alone = [extract_features(spec, model, data, batch_size=16) for spec, model in loaded]
    resized: list[int] = []
    original = features.to_probe_input

    def counting(batch: np.ndarray, size: int) -> torch.Tensor:
        resized.append(size)
        return original(batch, size)

    monkeypatch.setattr(features, "to_probe_input", counting)
    together = extract_many(loaded, data, batch_size=16)
    assert sorted(resized) == [16] * 3 + [24] * 3  # three batches, two sizes
    for one, many in zip(alone, together, strict=True):
        np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_allclose(together[0], together[1], atol=1e-4)  # TorchScript = ONNX


def test_inference_runs_channels_last_and_keeps_the_features(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(models.get_model("resnet18", weights=None).state_dict(), path)
    spec = _spec("torchvision/resnet18", path)
    model = load_expert(spec)
    rng = np.random.default_rng(0)
    data = LabelledImages(
        rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), np.arange(10) % 2, ("a", "b")
    )
    x = torch.as_tensor(data.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = model((x - 0.5) / 0.25).numpy()
    np.testing.assert_allclose(extract_features(spec, model, data), want, rtol=1e-4, atol=1e-5)
    conv = model.conv1.weight  # type: ignore[union-attr]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert features.for_inference(model) is model


def test_extraction_is_safe_beside_another_threads_forward_pass(tmp_path: Path) -> None:
    """Preparing an expert patches nothing process-wide: a forward pass in another thread at
    the same moment runs as usual."""
    path = tmp_path / "w.pt"
    torch.save(models.get_model("resnet18", weights=None).state_dict(), path)
    spec = _spec("torchvision/resnet18", path)
    rng = np.random.default_rng(0)
    data = LabelledImages(
        rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 2, ("a", "b")
    )
    other = _small()
    failures: list[BaseException] = []
    done = threading.Event()

    def forward_passes() -> None:
        try:
            while not done.is_set():
                with torch.no_grad():
                    other(torch.rand(2, 3, 16, 16))
        except BaseException as exc:  # recorded for the assertion below
            failures.append(exc)

    thread = threading.Thread(target=forward_passes)
    thread.start()
    try:
        for _ in range(3):
            extract_features(spec, load_expert(spec), data, batch_size=16)
    finally:
        done.set()
        thread.join()
    assert failures == []
