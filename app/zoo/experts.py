"""Experts: the feature extractors the service ranks.

An expert is a name, an architecture, weights, its input size and normalisation, an optional
source task (the task it was trained on) and free-form tags. Whatever the architecture,
``load_expert`` returns a module that maps normalised images to a flat feature vector, and
``app.zoo.features`` turns a dataset into experts' features — for the performance matrix,
LogME and brute-force evaluation alike.

Architectures: the probe networks (``efficientnet_lite0``, ``resnet18``, ``resnet34``, whose
pooled features are their penultimate layer: frozen ImageNet or random weights, or trained
further on a zoo task), ``cnn-<width>x<depth>``, small convolutional networks, and
``mlp-<width>x<depth>``, fully connected networks on the raw pixels; ``train_expert`` trains
any of them on a task. Experts a team already has — torchvision and timm classifiers by name,
TorchScript modules, ONNX models — are built by ``app.zoo.architectures``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from app.task2vec.datasets import LabelledImages, iter_batches, to_probe_input
from app.task2vec.errors import ConfigError
from app.task2vec.probes import PROBES, ProbeNetwork, load_probe, read_state_dict
from app.task2vec.sampling import balanced_draws
from app.zoo import architectures

_CNN = re.compile(r"^cnn-(\d+)x(\d+)$")
_MLP = re.compile(r"^mlp-(\d+)x(\d+)$")


@dataclass(frozen=True)
class ExpertSpec:
    """Everything needed to load an expert and feed it images."""

    name: str
    architecture: str
    weights: str
    input_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source_task: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


class SmallCNN(nn.Module):
    """``depth`` blocks of conv-BN-ReLU, each halving the resolution; global average pool.

    The feature dimension is ``width * 2**(depth-1)``.
    """

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        if not (1 <= width <= 256 and 1 <= depth <= 6):
            raise ConfigError(f"cnn-{width}x{depth}: width 1-256 and depth 1-6 only")
        layers: list[nn.Module] = []
        channels = 3
        for block in range(depth):
            out = width * 2**block
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2) if block < depth - 1 else nn.Identity(),
            ]
            channels = out
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)


class SmallMLP(nn.Module):
    """``depth`` fully connected ReLU layers of ``width`` units on the flattened pixels.

    It sees no spatial structure: an expert whose features are plainly not a CNN's, and that
    only works at the input size it was built for. The feature dimension is ``width``.
    """

    def __init__(self, width: int, depth: int, input_size: int) -> None:
        super().__init__()
        if not (1 <= width <= 4096 and 1 <= depth <= 6 and 1 <= input_size <= 64):
            raise ConfigError(f"mlp-{width}x{depth}: width 1-4096, depth 1-6, input 1-64 px only")
        layers: list[nn.Module] = [nn.Flatten()]
        inputs = 3 * input_size * input_size
        for _ in range(depth):
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def _scratch_network(architecture: str, input_size: int) -> SmallCNN | SmallMLP:
    """The small architectures named ``cnn-WxD`` / ``mlp-WxD``, randomly initialised."""
    if (match := _CNN.match(architecture)) is not None:
        return SmallCNN(int(match[1]), int(match[2]))
    if (match := _MLP.match(architecture)) is not None:
        return SmallMLP(int(match[1]), int(match[2]), input_size)
    raise ConfigError(
        f"unknown expert architecture {architecture!r}; use one of "
        f"{', '.join(PROBES)}, cnn-<width>x<depth>, mlp-<width>x<depth>, "
        f"{', '.join(architectures.FAMILIES)}"
    )


def known(architecture: str) -> bool:
    """Whether ``architecture`` is spelled as one the experts can be built as (the name is
    checked further when the expert loads)."""
    return (
        architecture in PROBES
        or architectures.handles(architecture)
        or bool(_CNN.match(architecture) or _MLP.match(architecture))
    )


def default_normalisation(architecture: str) -> architectures.Normalisation:
    """Mean and std when a registration names none: ImageNet's, except for the small
    networks, which the service trains on images scaled to [-1, 1]."""
    if _CNN.match(architecture) or _MLP.match(architecture):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return architectures.IMAGENET_NORMALISATION


class _ProbeFeatures(nn.Module):
    """A probe network used as an expert: its pooled penultimate features."""

    def __init__(self, probe: ProbeNetwork) -> None:
        super().__init__()
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.trunk(x)


def load_expert(spec: ExpertSpec) -> nn.Module:
    """The expert as a frozen, eval-mode module: normalised images → (N, D) features."""
    if spec.architecture in PROBES:
        probe = load_probe(spec.architecture, weights=spec.weights, image_size=spec.input_size)
        model: nn.Module = _ProbeFeatures(probe)
    elif architectures.handles(spec.architecture):
        model = architectures.build(spec.name, spec.architecture, Path(spec.weights))
    else:
        # The architecture is built on the meta device (no memory), the weights are read and
        # their shapes checked against it before any real tensor exists; a fitting state
        # dict then becomes the module's tensors (assign): a large architecture named with
        # small or wrong weights costs nothing.
        with torch.device("meta"):
            model = _scratch_network(spec.architecture, spec.input_size)
        state = read_state_dict(Path(spec.weights))
        architectures.check_fits(spec.name, spec.architecture, model.state_dict(), state)
        model.load_state_dict(state, assign=True)
    model.eval()
    for parameter in model.parameters():  # (a ScriptModule has no requires_grad_)
        parameter.requires_grad_(False)
    return model


@cache
def parameter_count(architecture: str, input_size: int) -> int | None:
    """The parameters of the features an expert of this architecture computes (a probe's
    trunk, a small network whole): its size, for a person comparing experts. Built on the
    meta device, so it costs no memory and reads no weights. None for the families whose
    architecture lives in the weights file or a library's builder (TorchScript, ONNX,
    torchvision, timm)."""
    with torch.device("meta"):
        if architecture in PROBES:
            _, layers, _ = PROBES[architecture].build(input_size)
            return sum(p.numel() for layer in layers for p in layer.parameters())
        if architectures.handles(architecture):
            return None
        try:
            network = _scratch_network(architecture, input_size)
        except ConfigError:
            return None
        return sum(p.numel() for p in network.parameters())


def normalise(images: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """Images in [0, 1] as the expert expects them: its mean and std per channel."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def train_expert(
    spec: ExpertSpec,
    data: LabelledImages,
    *,
    init: str = "random",
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``spec``'s network (and a throwaway head) on ``data``; return its weights in the
    form ``load_expert`` reads.

    Small architectures start from a seeded random draw; a probe architecture starts from
    ``init`` (``"imagenet"``: fine-tuning, or ``"random"``: from scratch), with every layer
    trained and BatchNorm in train mode. Class-balanced draws and Adam at a constant rate: a
    plain, seeded recipe whose only purpose is an expert that is good on its source task and
    on tasks like it.
    """
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    probe = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.architecture in PROBES:
            weights = "imagenet" if init == "imagenet" else f"random:{seed}"
            probe = load_probe(spec.architecture, weights=weights, image_size=spec.input_size)
            probe.requires_grad_(True)
            model: nn.Module = _ProbeFeatures(probe)
            feature_dim = probe.feature_dim
        else:
            scratch = _scratch_network(spec.architecture, spec.input_size)
            model, feature_dim = scratch, scratch.feature_dim
        model = model.to(device)
        head = nn.Linear(feature_dim, data.num_classes).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
    labels = torch.as_tensor(data.labels)
    steps = max(1, len(data) // batch_size)
    model.train()
    for _ in range(epochs):
        draws = balanced_draws(data.labels, steps * batch_size, generator)
        for idx in iter_batches(draws, batch_size):
            x = normalise(to_probe_input(data.images[idx], spec.input_size).to(device), spec)
            loss = F.cross_entropy(head(model(x)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
    model.eval()
    if probe is not None:
        return probe.source_state_dict()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
