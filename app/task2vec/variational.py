"""The paper's robust ("variational") Fisher: per filter, the largest weight noise the task
tolerates, learned on the true labels; its inverse is the curvature.

Each frozen conv gets per-filter weight noise by the local reparameterisation trick, and a
per-layer prior variance; the noise variances and a fresh head are trained with Adam on the
cross-entropy plus β times the complexity term Lz.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.task2vec.fisher import Batches, LayerFisher, Progress
from app.task2vec.probes import ProbeNetwork
from app.task2vec.sq_norms import conv_geometry


class _VariationalConv:
    """Per-filter weight noise on one frozen conv, by the local reparameterisation trick.

    out = conv(x, w) + sqrt(conv(x² + 1e-2, σ²)) · ε, with σ² = exp(logvar) per filter and a
    per-layer prior variance λ² = exp(loglambda2).
    """

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator) -> None:
        self.conv = conv
        self.generator = generator
        self.pad_module, self.padding = conv_geometry(conv)
        w = conv.weight.detach()
        self.logvar = nn.Parameter(
            torch.full(
                (w.shape[0], 1, 1, 1), math.log(0.05 * w.var().item() + 1e-8), device=w.device
            )
        )
        self.loglambda2 = nn.Parameter(
            torch.tensor(math.log(w.square().mean().item() + 1e-8), device=w.device)
        )
        self.handle = conv.register_forward_hook(self._add_noise)

    def _add_noise(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = inputs[0].square() + 1e-2
        if self.pad_module is not None:
            x = self.pad_module(x)
        var = self.logvar.exp().expand_as(self.conv.weight)
        out_var = F.conv2d(
            x, var, None, self.conv.stride, self.padding, self.conv.dilation, self.conv.groups
        )
        noise = torch.randn(
            output.shape, generator=self.generator, device=output.device, dtype=output.dtype
        )
        return output + out_var.sqrt() * noise

    def complexity(self) -> torch.Tensor:
        """This layer's term of Lz: (‖w‖² + Σσ²)/λ² + n·log λ² − Σ log σ² − n."""
        w = self.conv.weight
        n = w.numel()
        per_filter = n // w.shape[0]
        sum_var = self.logvar.exp().sum() * per_filter
        sum_logvar = self.logvar.sum() * per_filter
        return (
            (w.square().sum() + sum_var) / self.loglambda2.exp()
            + n * self.loglambda2
            - sum_logvar
            - n
        )


def variational_fisher(
    probe: ProbeNetwork,
    start: int,
    batches: Batches,
    generator: torch.Generator,
    progress: Progress | None = None,
    beta: float = 1e-7,
) -> list[LayerFisher]:
    """Train per-filter noise variances on the true labels; curvature = 1/σ², scale = 1/λ²."""
    convs = list(probe.conv_modules(start))
    device = next(probe.parameters()).device
    noise_generator = torch.Generator(device=device)
    noise_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    layers = [_VariationalConv(conv, noise_generator) for _, conv in convs]
    head = probe.classifier
    head.requires_grad_(True)
    noise_params: list[torch.Tensor] = [
        p for layer in layers for p in (layer.logvar, layer.loglambda2)
    ]
    groups: list[dict[str, Any]] = [
        {"params": noise_params},
        {"params": list(head.parameters()), "lr": 5e-4},
    ]
    optimizer = torch.optim.Adam(
        groups,
        lr=1e-2,
        betas=(0.9, 0.999),
    )
    try:
        for x, y in batches:
            logits = probe(x, start=start)
            complexity = torch.stack([layer.complexity() for layer in layers]).sum()
            loss = F.cross_entropy(logits, y) + beta * complexity
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            if progress is not None:
                progress(x.shape[0])
    finally:
        for layer in layers:
            layer.handle.remove()
        head.requires_grad_(False)
    results = []
    for (name, _), layer in zip(convs, layers, strict=True):
        logvar = layer.logvar.detach().view(-1).cpu().double()
        hessian = torch.exp(-logvar).numpy().astype(np.float32)
        scale = np.full_like(hessian, math.exp(-layer.loglambda2.item()))
        results.append(LayerFisher(name, hessian, scale))
    return results
