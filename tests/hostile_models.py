"""Experts that do more than compute: TorchScript modules that map, create or read files (on
every forward pass, or while they load) and ONNX models of a custom operator domain, as a
hostile client would send them."""

from __future__ import annotations

import io
import warnings

import torch
from onnx import TensorProto, helper
from torch import nn


class Creates(nn.Module):
    """Maps (creates) a file of its own choosing on every forward pass."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.target, shared=True, size=16)
        return x.flatten(1) + mapped.sum()


class Reads(nn.Module):
    """Reads a file of its own choosing into its features."""

    def __init__(self, target: str, size: int) -> None:
        super().__init__()
        self.target, self.size = target, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        secret = torch.from_file(self.target, shared=False, size=self.size, dtype=torch.uint8)
        return x.flatten(1)[:, :1] * 0 + secret.float().unsqueeze(0)


class OnLoad(nn.Module):
    """Creates a file while it loads, before anything calls it (``__setstate__``)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.scale = 1

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, bool]:
        return (self.target, self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, bool]) -> None:
        self.target = state[0]
        mapped = torch.from_file(state[0], shared=True, size=16)
        self.scale = state[1] + int(mapped.sum())
        self.training = state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


class Wraps(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _map_a_file(module: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    mapped = torch.from_file(module.target, shared=True, size=16)
    return out + mapped.sum()


def hooked(target: str) -> nn.Module:
    """A plain module whose forward hook (run around forward, not part of it) maps a file."""
    module = Wraps(nn.Flatten())
    module.target = target
    module.register_forward_hook(_map_a_file)
    return module


def scripted_bytes(module: nn.Module) -> bytes:
    """``module`` scripted and saved, as a client uploads it."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def custom_domain_onnx(size: int = 8) -> bytes:
    """An ONNX model whose features come from an operator of a domain other than the
    standard ones (onnxruntime's own contrib domain, which it runs as it is)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3 * size * size])
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Gelu", ["f"], ["y"], domain="com.microsoft"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())
