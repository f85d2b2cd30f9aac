"""Experts a team already has: torchvision and timm classifiers by name, TorchScript modules
and ONNX models, each turned into a module that maps normalised images (N, 3, S, S) to
features (N, D).

Which layer gives the features:

- ``torchvision/<builder>`` (every classification builder of ``torchvision.models``): the input
  of the classifier's last linear layer, which is replaced by the identity. That is the pooled
  trunk for ResNet, ResNeXt, Wide ResNet, RegNet, ShuffleNet, GoogLeNet, Inception v3,
  DenseNet, EfficientNet, MNASNet, MobileNet v2, ConvNeXt (after its LayerNorm), ViT (the class
  token) and Swin; the penultimate fully connected layer (after its activation) for AlexNet, VGG,
  MobileNet v3 and MaxViT; SqueezeNet, whose classifier is a convolution, gives its last fire
  module average-pooled. The weights are the builder's state dict with default arguments; the
  classifier's own tensors may be present (a full checkpoint) or absent.
- ``timm/<name>``: ``timm.create_model(name, num_classes=0)``, timm's pooled pre-logits
  features; the classifier's tensors may be present or absent. ``preset`` normalisation is the
  model's ``pretrained_cfg`` mean and std.
- ``torchscript``: the module's own output, flattened per image.
- ``onnx``: the model's first output, flattened per image, run by onnxruntime (CUDA where the
  machine has it, else CPU). The model takes one float input (N, 3, S, S); a fixed batch
  dimension is honoured by running images in chunks of that size.

Weights and models are never unpickled: state dicts are read ``weights_only`` or as
safetensors; TorchScript archives hold TorchScript code, which runs in TorchScript's
interpreter (no Python) and is accepted only when it uses known pure operators; ONNX files are
protobufs, accepted with the standard operator domains and no external data
(``app.zoo.graph_checks``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from app.task2vec.errors import ConfigError, ProbeWeightsError
from app.task2vec.probes import IMAGENET_MEAN, IMAGENET_STD, read_state_dict
from app.zoo.graph_checks import check_onnx, check_torchscript, check_torchscript_archive

TORCHVISION = "torchvision/"
TIMM = "timm/"
TORCHSCRIPT = "torchscript"
ONNX = "onnx"

#: The families this module builds, as a registration names them.
FAMILIES = (f"{TORCHVISION}<builder>", f"{TIMM}<name>", TORCHSCRIPT, ONNX)

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET_NORMALISATION: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)


def handles(architecture: str) -> bool:
    """Whether ``architecture`` names one of these families."""
    return architecture in (TORCHSCRIPT, ONNX) or architecture.startswith((TORCHVISION, TIMM))


def preset_normalisation(architecture: str) -> Normalisation:
    """The model's own mean and std: timm's ``pretrained_cfg``, ImageNet's for the rest."""
    if architecture.startswith(TIMM):
        cfg = _on_meta(_timm_builder(architecture)).pretrained_cfg
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) == len(std) == 3:
            return (
                (float(mean[0]), float(mean[1]), float(mean[2])),
                (float(std[0]), float(std[1]), float(std[2])),
            )
    return IMAGENET_NORMALISATION


def build(name: str, architecture: str, weights: Path) -> nn.Module:
    """The expert ``name`` of ``architecture`` with ``weights``: a frozen, eval-mode module
    from normalised images to features (a 4-d output is flattened by the caller)."""
    if architecture == ONNX:
        return OnnxModule(name, weights)
    if architecture == TORCHSCRIPT:
        return _torchscript(name, weights)
    if architecture.startswith(TORCHVISION):
        make, head = _torchvision_builder(architecture)
    elif architecture.startswith(TIMM):
        make = _timm_builder(architecture)
        head = str(_on_meta(make).pretrained_cfg.get("classifier") or "")
    else:
        raise ConfigError(f"{architecture!r} is not one of {', '.join(FAMILIES)}")
    state = read_state_dict(weights)
    if head:  # a full checkpoint's classifier is not part of the features
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    return _assign(name, architecture, make, state)


# --------------------------------------------------------------------------------------------
# torchvision and timm


#: The factories a layer makes its parameters and buffers with.
_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})


class _TensorsOnMeta(TorchFunctionMode):
    """New tensors made by the layers' factories go to the meta device; the tensors a builder
    computes with (``torch.arange``, ``torch.tensor``: RegNet's widths) stay real."""

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _on_meta(make: Any) -> Any:
    """Build on the meta device (no memory: a large architecture named with small weights
    costs nothing before the shapes are compared). A builder that computes with tensors while
    building (RegNet) gets its parameters on the meta device and its arithmetic on the CPU;
    one that fails even so is built on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        try:
            with torch.device("meta"):
                return make()
        except NotImplementedError:
            pass
        try:
            with _TensorsOnMeta():
                return make()
        except NotImplementedError:
            return make()


def _torchvision_builder(architecture: str) -> tuple[Any, str]:
    """The headless builder and the name of the head it lost (its tensors are dropped)."""
    from torchvision import models

    builder = architecture.removeprefix(TORCHVISION)
    if builder not in models.list_models(module=models):
        raise ConfigError(
            f"{architecture!r}: torchvision has no classification builder {builder!r} "
            "(see torchvision.models.list_models(module=torchvision.models))"
        )
    if builder.startswith("squeezenet"):  # the classifier is a convolution: pool before it
        head = "classifier"
    else:
        probe = _on_meta(lambda: models.get_model(builder, weights=None))
        head = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)][-1]

    def make() -> nn.Module:
        model: nn.Module = models.get_model(builder, weights=None)
        parent, _, leaf = head.rpartition(".")
        pooled = builder.startswith("squeezenet")
        setattr(
            model.get_submodule(parent), leaf, nn.AdaptiveAvgPool2d(1) if pooled else nn.Identity()
        )
        return model

    return make, head


def _timm_builder(architecture: str) -> Any:
    try:
        import timm
    except ImportError as exc:  # an optional dependency where the platform lacks wheels
        raise ConfigError(f"{architecture!r}: timm is not installed here") from exc
    name = architecture.removeprefix(TIMM)
    if not timm.is_model(name):
        raise ConfigError(f"{architecture!r}: timm has no model {name!r} (see timm.list_models())")
    return lambda: timm.create_model(name, pretrained=False, num_classes=0)


def _assign(
    name: str, architecture: str, make: Callable[[], nn.Module], state: dict[str, torch.Tensor]
) -> nn.Module:
    """The state dict becomes the module's tensors, after its names, shapes and dtypes are
    compared with the module's, built on the meta device. Buffers no state dict carries
    (non-persistent ones) leave the module half on the meta device: it is then built for real
    and loaded, its size now known to be the weights'."""
    model: nn.Module = _on_meta(make)
    check_fits(name, architecture, model.state_dict(), state)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = make()
        model.load_state_dict(state)
    return model


def check_fits(
    name: str,
    architecture: str,
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
) -> None:
    """The state dict has exactly the architecture's tensors, shapes and dtypes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key}: {tuple(state[key].shape)} {state[key].dtype}, needs "
        f"{tuple(want.shape)} {want.dtype}"
        for key, want in expected.items()
        if key in state and (state[key].shape != want.shape or state[key].dtype != want.dtype)
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            "; ".join(wrong[:5]),
        ]
        raise ProbeWeightsError(
            f"expert {name!r}: the weights do not fit {architecture} "
            f"({'; '.join(p for p in parts if p)})"
        )


# --------------------------------------------------------------------------------------------
# TorchScript and ONNX


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _torchscript(name: str, path: Path) -> nn.Module:
    """The module, once its archive and every operator it uses are checked
    (``graph_checks``): nothing of it has run before then."""
    check_torchscript_archive(name, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module: nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location="cpu"
            )
    except Exception as exc:
        raise ProbeWeightsError(
            f"expert {name!r}: not a TorchScript module ({_short(exc)})"
        ) from None
    check_torchscript(name, module)
    return module


class OnnxModule(nn.Module):
    """An ONNX model behind the module interface the experts share: tensors in, tensors out.

    Its threads follow torch's (a worker's numeric thread setting holds for it too)."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        check_onnx(name, path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ProbeWeightsError(f"expert {name!r}: not an ONNX model ({_short(exc)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)":
            found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
            raise ProbeWeightsError(
                f"expert {name!r}: an ONNX expert takes one float input, images (N, 3, S, S); "
                f"this model takes {found or 'none'}"
            )
        self.input = inputs[0].name
        first = inputs[0].shape[0] if inputs[0].shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        chunk = self.batch or len(images)
        out = []
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            if len(part) < chunk:  # a fixed batch size: pad the last chunk, keep its rows
                pad = np.zeros((chunk - len(part), *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            result = np.asarray(self.session.run(None, {self.input: part})[0], np.float32)
            if result.ndim == 0 or result.shape[0] != chunk:  # not one row per image
                return torch.from_numpy(result)  # the caller names the shape
            out.append(result[: len(images) - start])
        return torch.from_numpy(np.concatenate(out)).to(x.device)
