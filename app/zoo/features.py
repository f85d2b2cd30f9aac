"""Experts' features on a dataset, and the forward pass that admits an expert.

A dataset is decoded once (``LabelledImages`` holds uint8 pixels); ``extract_many`` walks it
once for any number of experts, resizing each batch once per input size and normalising it per
expert, so another expert on a task costs its forward passes and nothing else. Whatever the
expert returns per image (a vector, a map, a TorchScript or ONNX output) is flattened.

On the way the expert's tensors and its inputs are put in channels-last order, oneDNN's fast
path on the CPU (``for_inference``). BatchNorm is not folded into the convolutions: folding
needs a torch.fx trace, which patches ``nn.Module.__call__`` for the whole process while it
runs, so another thread's forward pass at that moment fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from app.task2vec.datasets import LabelledImages, iter_batches, to_probe_input
from app.task2vec.errors import ProbeWeightsError, Task2VecError
from app.zoo.architectures import OnnxModule
from app.zoo.experts import ExpertSpec, load_expert, normalise

#: The widest feature vector an expert may give (the matrix's classifier is fit on it).
MAX_FEATURES = 65_536
#: Images in the admission forward pass: enough to see batch handling, cheap at any size.
CHECK_IMAGES = 4


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")  # ONNX experts hold no tensors; they take CPU inputs


def for_inference(model: nn.Module) -> nn.Module:
    """The same module with channels-last tensors (in place, and a no-op the second time);
    TorchScript and ONNX experts run as they are."""
    if isinstance(model, torch.jit.ScriptModule | OnnxModule):
        return model
    return model.to(memory_format=torch.channels_last)


def _flat(spec: ExpertSpec, out: object, images: int) -> torch.Tensor:
    """(N, D) float features from whatever the expert returned for ``images`` images."""
    if not isinstance(out, torch.Tensor):
        raise ProbeWeightsError(
            f"expert {spec.name!r} returns {type(out).__name__}; it must return one tensor"
        )
    if out.ndim < 2 or out.shape[0] != images:
        raise ProbeWeightsError(
            f"expert {spec.name!r} returns shape {tuple(out.shape)} for {images} images; "
            "it must return (N, D) features or (N, ...) maps"
        )
    return out.flatten(1).float()


@torch.no_grad()
def extract_many(
    experts: Sequence[tuple[ExpertSpec, nn.Module]],
    data: LabelledImages,
    batch_size: int = 128,
) -> list[np.ndarray]:
    """(N, D_e) float32 features of every image of ``data`` under each expert, in one pass."""
    sizes: dict[int, list[int]] = {}
    for e, (spec, _) in enumerate(experts):
        sizes.setdefault(spec.input_size, []).append(e)
    models = [for_inference(model) for _, model in experts]
    devices = [_device_of(model) for model in models]
    out: list[list[torch.Tensor]] = [[] for _ in experts]
    for idx in iter_batches(np.arange(len(data)), batch_size):
        for size, members in sizes.items():
            x = to_probe_input(data.images[idx], size)
            for e in members:
                spec = experts[e][0]
                images = normalise(x.to(devices[e]), spec)
                features = models[e](images.contiguous(memory_format=torch.channels_last))
                out[e].append(_flat(spec, features, len(idx)).cpu())
    return [torch.cat(parts).numpy() for parts in out]


def extract_features(
    spec: ExpertSpec, model: nn.Module, data: LabelledImages, batch_size: int = 128
) -> np.ndarray:
    """(N, D) float32 features of every image of ``data`` under one expert."""
    return extract_many([(spec, model)], data, batch_size)[0]


@torch.no_grad()
def check_forward(spec: ExpertSpec, model: nn.Module) -> int:
    """Run the expert on a few images at its input size before it is kept; return D.

    Refused, with the reason: a forward pass that raises, an output that is not (N, ...) for N
    images, features wider than ``MAX_FEATURES``, NaN or infinite features, or a row that
    depends on the other images of the batch (a module left in training mode)."""
    generator = torch.Generator().manual_seed(0)
    size = spec.input_size
    x = torch.rand(CHECK_IMAGES, 3, size, size, generator=generator)
    x[0] = 0.5  # a flat grey image: a degenerate input must still give finite features
    device = _device_of(model)
    try:
        out = model(normalise(x, spec).to(device))
        alone = model(normalise(x[1:2], spec).to(device))
    except Task2VecError:
        raise
    except Exception as exc:  # any error of the user's model is the model's problem
        text = " ".join(str(exc).split())[:300]
        raise ProbeWeightsError(
            f"expert {spec.name!r} fails on {CHECK_IMAGES} images of {size}x{size} px: "
            f"{type(exc).__name__}: {text}"
        ) from None
    features = _flat(spec, out, CHECK_IMAGES)
    dim = features.shape[1]
    if not 1 <= dim <= MAX_FEATURES:
        raise ProbeWeightsError(
            f"expert {spec.name!r} gives {dim} features per image; 1 to {MAX_FEATURES} allowed"
        )
    if not bool(torch.isfinite(features).all()):
        raise ProbeWeightsError(f"expert {spec.name!r} gives NaN or infinite features")
    single = _flat(spec, alone, 1)
    scale = float(features[1].abs().max()) + 1e-6
    if single.shape != (1, dim) or float((single[0] - features[1]).abs().max()) > 1e-3 * scale:
        raise ProbeWeightsError(
            f"expert {spec.name!r}: an image's features depend on the other images of its "
            "batch (is the module in training mode?)"
        )
    return int(dim)


def load_checked(spec: ExpertSpec) -> nn.Module:
    """The expert, loaded and admitted by ``check_forward``."""
    model = load_expert(spec)
    check_forward(spec, model)
    return model
