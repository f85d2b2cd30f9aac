"""Experts: the feature extractors the service ranks.

An expert is a name, an architecture, weights, its input size and normalisation, an optional
source task (the task it was trained on) and free-form tags. Whatever the architecture,
``load_expert`` returns a module that maps normalised images to a flat feature vector, and
``extract_features`` is the one function that turns a dataset into an expert's features —
used for the performance matrix, LogME and brute-force evaluation alike.

Architectures: the probe networks (``efficientnet_lite0``, ``resnet18``, ``resnet34``, whose
pooled features are their penultimate layer) and ``cnn-<width>x<depth>``, small convolutional
networks trained from scratch on a zoo task (``train_cnn``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.task2vec.datasets import LabelledImages, iter_batches, to_probe_input
from app.task2vec.errors import ConfigError, ProbeWeightsError
from app.task2vec.probes import PROBES, load_probe, read_state_dict
from app.task2vec.sampling import balanced_draws

_CNN = re.compile(r"^cnn-(\d+)x(\d+)$")


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


def _cnn(architecture: str) -> SmallCNN:
    match = _CNN.match(architecture)
    if match is None:
        raise ConfigError(
            f"unknown expert architecture {architecture!r}; use one of "
            f"{', '.join(PROBES)} or cnn-<width>x<depth>"
        )
    return SmallCNN(int(match[1]), int(match[2]))


class _ProbeFeatures(nn.Module):
    """A probe network used as an expert: its pooled penultimate features."""

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__()
        self.probe = load_probe(spec.architecture, weights=spec.weights, image_size=spec.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.trunk(x)


def load_expert(spec: ExpertSpec) -> nn.Module:
    """The expert as a frozen, eval-mode module: normalised images → (N, D) features."""
    if spec.architecture in PROBES:
        model: nn.Module = _ProbeFeatures(spec)
    else:
        model = _cnn(spec.architecture)
        state = read_state_dict(Path(spec.weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ProbeWeightsError(
                f"expert {spec.name!r}: the weights do not fit {spec.architecture} ({exc})"
            ) from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _normalise(images: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@torch.no_grad()
def extract_features(
    spec: ExpertSpec,
    model: nn.Module,
    data: LabelledImages,
    batch_size: int = 128,
    device: torch.device | None = None,
) -> np.ndarray:
    """(N, D) float32 features of every image of ``data`` under the expert."""
    device = device or next(model.parameters()).device
    out = []
    for idx in iter_batches(np.arange(len(data)), batch_size):
        x = to_probe_input(data.images[idx], spec.input_size).to(device)
        out.append(model(_normalise(x, spec)).float().cpu())
    return torch.cat(out).numpy()


def train_cnn(
    spec: ExpertSpec,
    data: LabelledImages,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``spec``'s small CNN (and a throwaway head) on ``data``; return the CNN's weights.

    Class-balanced draws and Adam at a constant rate: a plain, seeded recipe whose only
    purpose is an expert that is good on its source task and on tasks like it.
    """
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _cnn(spec.architecture).to(device)
        head = nn.Linear(model.feature_dim, data.num_classes).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
    labels = torch.as_tensor(data.labels)
    steps = max(1, len(data) // batch_size)
    model.train()
    for _ in range(epochs):
        draws = balanced_draws(data.labels, steps * batch_size, generator)
        for idx in iter_batches(draws, batch_size):
            x = _normalise(to_probe_input(data.images[idx], spec.input_size).to(device), spec)
            loss = F.cross_entropy(head(model(x)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
    model.eval()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
