"""Fisher information of the probe's weights on a task: the three estimators.

The batch and variational estimators see the task through ``batches``: an iterable of (input
of layer ``start``, true labels) pairs in the order of the seeded balanced draws; the
per-sample one through the draws themselves. All return one value per filter (conv) or
channel (BatchNorm) in the probe's module order.

* ``batch_fisher`` reproduces the reference: square of the gradient of the batch-mean loss,
  with labels sampled from the model, averaged over batches. In expectation that is diag(F)/B
  plus the squared mean gradient, so it is noisy and scales with the batch size.
* ``per_sample_fisher`` averages per-sample squared gradients, which converges to diag(F)
  itself. Per-sample gradients are never materialised for the whole network: hooks read each
  layer's input and output gradient during an ordinary backward pass and form the per-sample
  squared row norms directly (the per-example-gradient-norm trick), so the backward pass does
  not even compute weight gradients. The estimate is a sum over draws, so the draws are
  regrouped (``DrawPlan``): each distinct image runs forward once, and draws that ask for
  the same backward pass (the same image and sampled label) share it, with their count as
  its weight. With 2,048 draws from 1,000 images that roughly halves the work.
  The expectation over the model's labels ŷ ~ p_w(y|x) can be taken three ways (``labels``):
  ``sampled`` draws one ŷ per image (the method as published); ``gaussian`` backpropagates
  v = (diag p − ppᵀ)^½ z, z ~ N(0, I), which has the same covariance as e_ŷ − p and so the same
  expectation, without the rare large spikes a confident model's sampled labels produce;
  ``exact`` sums over all classes weighted by p (one backward pass per class), leaving only
  the noise of which images are drawn.
* ``variational_fisher`` is the paper's robust Fisher: it learns, per filter, the largest weight
  noise the task tolerates; its inverse is the curvature.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from app.task2vec.errors import ConfigError
from app.task2vec.lanes import Turnstile, cpu_lanes
from app.task2vec.probes import ProbeNetwork

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LabelExpectation = Literal["sampled", "gaussian", "exact"]
Progress = Callable[[int], None]

#: Elements of the unfolded input (or per-sample gradient) one chunk may hold: bounds the
#: memory the per-sample hooks add on top of the backward pass (256 MB in float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True)
class LayerFisher:
    """Per-filter values for one module: ``hessian`` and the matching ``scale``."""

    name: str
    hessian: np.ndarray
    scale: np.ndarray


def sample_model_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ŷ ~ p_w(y|x): the Fisher needs labels from the model, never the dataset's labels."""
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).view(-1).to(logits.device)


def batch_fisher(
    probe: ProbeNetwork,
    start: int,
    batches: Batches,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> list[LayerFisher]:
    """The reference's Monte Carlo estimator: mean over batches of (batch-mean gradient)².

    Batches run side by side in lanes (``lanes.py``); each draws its model labels from
    ``generator`` in turn, so the labels are those of one batch after another.
    """
    modules = list(probe.embedded_modules(start))
    params = [m.weight for _, m in modules]
    turnstile = Turnstile()

    def one(item: tuple[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], int]:
        step, (x, _) = item
        try:
            logits = probe(x, start=start)
            with turnstile.turn(step):
                labels = sample_model_labels(logits, generator)
            grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
            return [g.double().square().reshape(g.shape[0], -1).mean(dim=1) for g in grads], len(x)
        finally:
            turnstile.release(step)

    sums = [torch.zeros(p.shape[0], dtype=torch.float64, device=p.device) for p in params]
    for p in params:
        p.requires_grad_(True)
    count = 0
    try:
        with cpu_lanes(_device(probe)) as lanes:
            for per_filter, size in lanes.map(one, enumerate(batches)):
                for total, part in zip(sums, per_filter, strict=True):
                    total += part
                count += 1
                if progress is not None:
                    progress(size)
    finally:
        for p in params:
            p.requires_grad_(False)
    if count == 0:
        raise ConfigError("the batch Fisher estimator needs at least one full batch")
    return [
        _filterwise(name, total / count) for (name, _), total in zip(modules, sums, strict=True)
    ]


def _device(probe: ProbeNetwork) -> torch.device:
    return next(probe.parameters()).device


def per_sample_fisher(
    probe: ProbeNetwork,
    start: int,
    inputs: Callable[[np.ndarray], torch.Tensor],
    draws: np.ndarray,
    logits: torch.Tensor,
    generator: torch.Generator,
    batch_size: int,
    progress: Progress | None = None,
    labels: LabelExpectation = "sampled",
) -> list[LayerFisher]:
    """Mean over ``draws`` of the per-sample squared gradient, averaged per filter.

    ``draws`` are image indices (repeats allowed), ``inputs(indices)`` gives those images'
    input of layer ``start`` and ``logits`` holds the model's logits of every image, from
    which the model labels are drawn (``plan_draws``). Each distinct image is run forward
    once, with one backward pass per distinct thing its draws ask for (see ``DrawPlan``).

    Needs BatchNorm in eval mode: with batch statistics a sample's gradient depends on the
    rest of its batch, and per-sample gradients are undefined.
    """
    if labels not in ("sampled", "gaussian", "exact"):
        raise ConfigError(f"unknown label expectation {labels!r}")
    if probe.training:
        raise ConfigError("the per-sample Fisher estimator needs BatchNorm in eval mode")
    if len(draws) == 0:
        raise ConfigError("the per-sample Fisher estimator needs at least one sample")
    plan = plan_draws(draws, logits, labels, generator, batch_size)
    modules = list(probe.embedded_modules(start))
    hooks = _SquaredNormHooks([m for _, m in modules])

    def one(chunk: _Chunk) -> list[torch.Tensor]:
        sums = hooks.zeros()
        with hooks.into(sums):
            x = inputs(chunk.images).detach().requires_grad_(True)
            out = probe(x, start=start)
            passes = list(chunk.losses(out))
            for i, loss in enumerate(passes):
                torch.autograd.grad(loss, [x], retain_graph=i < len(passes) - 1)
        return sums

    try:
        with cpu_lanes(_device(probe)) as lanes:
            for chunk, sums in zip(plan.chunks, lanes.map(one, plan.chunks), strict=True):
                for total, part in zip(hooks.sums, sums, strict=True):
                    total += part
                if progress is not None:
                    progress(chunk.draws)
    finally:
        hooks.remove()
    return [
        _filterwise(name, total / len(draws) / _filter_size(module))
        for (name, module), total in zip(modules, hooks.sums, strict=True)
    ]


@dataclass(frozen=True)
class _Chunk:
    """Distinct images run forward together, and the backward passes over them.

    Round r holds, for every image, its r-th distinct target and how many draws share it:
    a class (``sampled``), a projection vector z (``gaussian``), or none (``exact``: all
    classes, weighted by p). A weight w enters as √w on the output gradient, so the squared
    norms the hooks sum carry it (‖√w·g‖² = w·‖g‖²).
    """

    images: np.ndarray
    targets: list[torch.Tensor | None]
    weights: list[torch.Tensor]
    draws: int

    def losses(self, logits: torch.Tensor) -> Iterator[torch.Tensor]:
        for target, weight in zip(self.targets, self.weights, strict=True):
            root = weight.to(logits.device, logits.dtype).sqrt()
            if target is None:  # exact: E_ŷ ‖g(ŷ)‖² = Σ_c ‖√p_c · g(c)‖², one pass per class
                probs = torch.softmax(logits.detach().float(), dim=-1).to(logits.dtype)
                log_probs = torch.log_softmax(logits, dim=-1)
                for c in range(logits.shape[1]):
                    yield -(root * probs[:, c].sqrt() * log_probs[:, c]).sum()
            elif target.dtype == torch.long:
                target = target.to(logits.device)
                yield (root * F.cross_entropy(logits, target, reduction="none")).sum()
            else:  # gaussian: backpropagate v = (diag p − ppᵀ)^½ z
                probs = torch.softmax(logits.detach().float(), dim=-1)
                rooted = probs.sqrt() * target.to(probs.device)
                v = rooted - probs * rooted.sum(dim=1, keepdim=True)  # Cov(v) = diag(p) − ppᵀ
                yield (logits * (root[:, None] * v.to(logits.dtype))).sum()


@dataclass(frozen=True)
class DrawPlan:
    """The per-sample estimator's work: its draws grouped by image, then by target.

    The estimate is a sum over draws, so the order of the draws does not matter, only what
    each one asks for. An image drawn k times is run forward once, not k times; with
    ``sampled`` labels, draws of one image that got the same label are one backward pass
    with weight 2 (a confident head labels most repeats alike); with ``exact`` labels every
    draw of an image is the same. Images with the same number of distinct targets share
    chunks, so that every backward pass is over full rows.
    """

    chunks: list[_Chunk]

    @property
    def forward_rows(self) -> int:
        return sum(len(c.images) for c in self.chunks)

    @property
    def backward_rows(self) -> int:
        return sum(len(c.images) * len(c.targets) for c in self.chunks)


def plan_draws(
    draws: np.ndarray,
    logits: torch.Tensor,
    labels: LabelExpectation,
    generator: torch.Generator,
    batch_size: int,
) -> DrawPlan:
    """Model labels (or projections) for ``draws``, taken from ``generator`` batch by batch
    in draw order, as when each batch of draws is labelled after its forward pass, then
    grouped (``DrawPlan``)."""
    per_image: dict[int, dict[Any, Any]] = {}
    for lo in range(0, len(draws), batch_size):
        idx = draws[lo : lo + batch_size]
        if labels == "sampled":
            batch_logits = logits[torch.as_tensor(idx, device=logits.device)]
            picked = sample_model_labels(batch_logits, generator).cpu().tolist()
            for image, label in zip(idx.tolist(), picked, strict=True):
                targets = per_image.setdefault(image, {})
                targets[label] = targets.get(label, 0) + 1
        elif labels == "gaussian":
            z = torch.randn((len(idx), logits.shape[1]), generator=generator)
            for row, image in enumerate(idx.tolist()):
                targets = per_image.setdefault(image, {})
                targets[len(targets)] = (z[row], 1)
        else:
            for image in idx.tolist():
                targets = per_image.setdefault(image, {})
                targets[None] = targets.get(None, 0) + 1
    by_rounds: dict[int, list[int]] = {}
    for image in sorted(per_image):
        by_rounds.setdefault(len(per_image[image]), []).append(image)
    chunks = []
    for rounds in sorted(by_rounds):
        images = by_rounds[rounds]
        for lo in range(0, len(images), batch_size):
            group = images[lo : lo + batch_size]
            entries = [list(per_image[image].items()) for image in group]
            chunk_targets: list[torch.Tensor | None] = []
            chunk_weights: list[torch.Tensor] = []
            for r in range(rounds):
                keys = [row[r][0] for row in entries]
                values = [row[r][1] for row in entries]
                if labels == "gaussian":
                    chunk_targets.append(torch.stack([v[0] for v in values]))
                    chunk_weights.append(torch.tensor([float(v[1]) for v in values]))
                else:
                    chunk_targets.append(
                        None if labels == "exact" else torch.tensor(keys, dtype=torch.long)
                    )
                    chunk_weights.append(torch.tensor([float(v) for v in values]))
            draws_covered = int(sum(w.sum().item() for w in chunk_weights))
            chunks.append(_Chunk(np.array(group), chunk_targets, chunk_weights, draws_covered))
    return DrawPlan(chunks)


def _filter_size(module: nn.Conv2d | nn.BatchNorm2d) -> int:
    return math.prod(module.weight.shape[1:])


def _filterwise(name: str, values: torch.Tensor) -> LayerFisher:
    hessian = values.detach().cpu().numpy().astype(np.float32)
    return LayerFisher(name, hessian, np.ones_like(hessian))


class _SquaredNormHooks:
    """Accumulates Σ_n ‖∂ℓ_n/∂w[o]‖² per filter o from forward inputs and output gradients.

    Into ``sums``, or, in a thread inside ``into``, into that thread's own accumulators (a
    lane's chunk), which are then added in a fixed order."""

    def __init__(self, modules: list[nn.Conv2d | nn.BatchNorm2d]) -> None:
        self.modules = modules
        self._local = threading.local()
        self._handles = []
        for index, module in enumerate(modules):
            if isinstance(module, nn.Conv2d):
                _conv_geometry(module)  # refuse unsupported convolutions before any work
            self._handles.append(module.register_forward_hook(self._on_forward(index)))
        self.sums = self.zeros()

    def zeros(self) -> list[torch.Tensor]:
        return [
            torch.zeros(m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
            for m in self.modules
        ]

    @contextmanager
    def into(self, sums: list[torch.Tensor]) -> Iterator[None]:
        self._local.sums = sums
        try:
            yield
        finally:
            del self._local.sums

    def _on_forward(
        self, index: int
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()
            sums = getattr(self._local, "sums", self.sums)

            def on_grad(grad: torch.Tensor) -> None:
                sums[index] += _per_sample_sq_norms(module, x, grad.detach()).sum(0).double()

            output.register_hook(on_grad)  # type: ignore[no-untyped-call]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _per_sample_sq_norms(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.BatchNorm2d):
        return _bn_sq_norms(module, x, delta)
    assert isinstance(module, nn.Conv2d)
    return _conv_sq_norms(module, x, delta)


def _bn_sq_norms(bn: nn.BatchNorm2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, C): per-sample ∂ℓ/∂γ[c] = Σ_p δ[c,p]·x̂[c,p], squared (eval-mode statistics)."""
    assert bn.running_mean is not None
    assert bn.running_var is not None
    mean = bn.running_mean.view(1, -1, 1, 1)
    inv_std = torch.rsqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    return ((x - mean) * inv_std * delta).sum(dim=(2, 3)).square()


def _conv_geometry(conv: nn.Conv2d) -> tuple[nn.Module | None, tuple[int, int]]:
    """(explicit padding module or None, padding passed to the convolution)."""
    pad_module = getattr(conv, "static_padding", None)
    if pad_module is None and type(conv).forward is not nn.Conv2d.forward:
        raise ConfigError(f"per-sample Fisher: unsupported convolution type {type(conv).__name__}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ConfigError("per-sample Fisher supports zero padding given as numbers only")
    padding = (int(conv.padding[0]), int(conv.padding[1]))
    return pad_module, padding


def _conv_sq_norms(conv: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, C_out): ‖g_n[o]‖² with g_n = δ_n X_nᵀ, X_n the unfolded input of sample n.

    With P output positions, K = C_in/groups·k² and C = C_out/groups, the per-sample gradients
    cost P·C·K per sample and the Gram form δ (XᵀX) δᵀ costs P²·(K + C); the cheaper one is
    used. Early layers (many positions, few filters) take the per-sample gradients, from the
    convolution library's own weight-gradient kernel with one group per sample, which needs
    no unfolded copy of the input (5x faster than unfold + matmul for ResNet's layer1 on a
    CPU). Deep layers (few positions, wide filters) take the Gram form.
    """
    pad_module, padding = _conv_geometry(conv)
    if pad_module is not None:
        x = pad_module(x)
    batch = x.shape[0]
    groups = conv.groups
    per_group_out = conv.out_channels // groups
    k = (conv.in_channels // groups) * conv.kernel_size[0] * conv.kernel_size[1]
    positions = delta.shape[2] * delta.shape[3]
    use_gram = positions * (k + per_group_out) < per_group_out * k
    padded = (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    per_sample = (
        groups * (padded * padded + positions * positions)
        if use_gram
        else groups * k * positions + conv.out_channels * k
    )
    chunk = max(1, _CHUNK_ELEMENTS // per_sample)
    results = []
    for lo in range(0, batch, chunk):
        xs, ds = x[lo : lo + chunk], delta[lo : lo + chunk]
        n = xs.shape[0]
        if use_gram:
            gram = _unfolded_gram(xs, conv, padding, groups, tuple(ds.shape[2:]))
            d = ds.reshape(n, groups, per_group_out, positions)
            sq = ((d @ gram) * d).sum(dim=-1).reshape(n, conv.out_channels)
        elif groups > 1:
            # Grouped (depthwise) convolutions: a per-sample grouped convolution would have
            # n·groups groups, which the convolution library runs slowly (30 ms for 64 images
            # of a 1,152-channel depthwise layer at 1x1); see ``_grouped_sq_norms``.
            sq = _grouped_sq_norms(conv, xs, ds, padding)
        else:
            # Samples side by side as channel groups: the weight gradient of that grouped
            # convolution is the stack of the per-sample gradients.
            per_sample_grads = conv2d_weight(  # type: ignore[no-untyped-call]
                xs.reshape(1, n * xs.shape[1], *xs.shape[2:]),
                (n * conv.out_channels, conv.in_channels // groups, *conv.kernel_size),
                ds.reshape(1, n * conv.out_channels, *ds.shape[2:]),
                stride=conv.stride,
                padding=padding,
                dilation=conv.dilation,
                groups=n * groups,
            )
            sq = per_sample_grads.view(n, conv.out_channels, -1).square().sum(dim=-1)
        results.append(sq)
    return torch.cat(results)


def _grouped_sq_norms(
    conv: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, padding: tuple[int, int]
) -> torch.Tensor:
    """(n, C_out) for a grouped convolution, without an unfolded copy (im2col) of the input.

    The per-sample gradient of filter o at kernel offset t is Σ_p δ[o,p]·x[:, p·stride +
    t·dilation] over the filter's input channels. Depthwise (one input channel per filter):
    one strided view of the padded input, channels last so that the products run along
    contiguous channels. Other grouped convolutions: one offset at a time.
    """
    n, channels = x.shape[:2]
    groups = conv.groups
    per_group_out = conv.out_channels // groups
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out_h, out_w = delta.shape[2:]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if per_group_out == 1 and channels == groups:
        last = padded.permute(0, 2, 3, 1).contiguous()  # (n, H, W, C)
        s_n, s_h, s_w, _ = last.stride()
        windows = last.as_strided(  # windows[n, i, j, h, w] = x[n, h·s + i·d, w·s + j·d]
            (n, kh, kw, out_h, out_w, channels),
            (s_n, dh * s_h, dw * s_w, sh * s_h, sw * s_w, 1),
        )
        d = delta.permute(0, 2, 3, 1)  # (n, out_h, out_w, C)
        # Loop over whichever is fewer, output positions or kernel offsets (a reduction over
        # the middle dimensions of the whole product is several times slower than either).
        if out_h * out_w <= kh * kw:
            grads = torch.zeros(n, kh, kw, channels, dtype=delta.dtype, device=delta.device)
            for h in range(out_h):
                for w in range(out_w):
                    grads.addcmul_(windows[:, :, :, h, w], d[:, None, None, h, w])
            return grads.square().sum(dim=(1, 2))
        sq_dw = torch.zeros(n, channels, dtype=delta.dtype, device=delta.device)
        for i in range(kh):
            for j in range(kw):
                sq_dw += (windows[:, i, j] * d).sum(dim=(1, 2)).square()
        return sq_dw
    d = delta.reshape(n, groups, per_group_out, out_h * out_w)
    sq = torch.zeros(n, groups, per_group_out, dtype=delta.dtype, device=delta.device)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            tap = padded[:, :, rows, cols].reshape(n, groups, channels // groups, out_h * out_w)
            sq += (d @ tap.transpose(2, 3)).square().sum(dim=-1)
    return sq.reshape(n, conv.out_channels)


def _unfolded_gram(
    x: torch.Tensor,
    conv: nn.Conv2d,
    padding: tuple[int, int],
    groups: int,
    out_size: tuple[int, ...],
) -> torch.Tensor:
    """(n, groups, P, P): XᵀX of the unfolded input, without unfolding it.

    Entry (p, q) sums, over the kernel offsets, the inner products of the padded input's
    columns at p + offset and q + offset: so the Gram matrix of the padded input, computed once,
    gives it as a sum of k² strided blocks. That costs (H'W')²·C instead of P²·C·k² and makes
    no k²-times larger copy of the input.
    """
    n, channels = x.shape[:2]
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    height, width = padded.shape[2:]
    flat = padded.reshape(n, groups, channels // groups, height * width)
    base = (flat.transpose(2, 3) @ flat).view(n, groups, height, width, height, width)
    out_h, out_w = out_size
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    gram = torch.zeros(n, groups, out_h, out_w, out_h, out_w, dtype=x.dtype, device=x.device)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            gram += base[:, :, rows, cols, rows, cols]
    return gram.view(n, groups, out_h * out_w, out_h * out_w)


# --------------------------------------------------------------------------------------------
# Variational ("robust") Fisher


class _VariationalConv:
    """Per-filter weight noise on one frozen conv, by the local reparameterisation trick.

    out = conv(x, w) + sqrt(conv(x² + 1e-2, σ²)) · ε, with σ² = exp(logvar) per filter and a
    per-layer prior variance λ² = exp(loglambda2).
    """

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator) -> None:
        self.conv = conv
        self.generator = generator
        self.pad_module, self.padding = _conv_geometry(conv)
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
