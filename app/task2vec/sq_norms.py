"""Per-sample squared gradient norms of conv and BatchNorm weights, read by hooks during an
ordinary backward pass (the per-example-gradient-norm trick; BackPACK's SumGradSquared).

For each module, a forward hook keeps its input and puts a hook on its output; the output's
gradient then arrives during the backward pass, and with the input it gives, per sample n and
filter o, ‖∂ℓ_n/∂w[o]‖² without materialising per-sample gradients for the whole network and
without the backward pass computing weight gradients at all.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from app.task2vec.errors import ConfigError

#: Elements of the unfolded input (or per-sample gradient) one chunk may hold: bounds the
#: memory the per-sample hooks add on top of the backward pass (256 MB in float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def filter_size(module: nn.Conv2d | nn.BatchNorm2d) -> int:
    """Weights per filter (conv) or channel (BatchNorm)."""
    return math.prod(module.weight.shape[1:])


class SquaredNormHooks:
    """Accumulates Σ_n ‖∂ℓ_n/∂w[o]‖² per filter o from forward inputs and output gradients.

    Into ``sums``, or, in a thread inside ``into``, into that thread's own accumulators (a
    lane's chunk), which are then added in a fixed order."""

    def __init__(self, modules: list[nn.Conv2d | nn.BatchNorm2d]) -> None:
        self.modules = modules
        self._local = threading.local()
        self._handles = []
        for index, module in enumerate(modules):
            if isinstance(module, nn.Conv2d):
                conv_geometry(module)  # refuse unsupported convolutions before any work
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
    """In float32 whatever the passes ran in: under a bfloat16 plan (``plans.py``) the
    layer's input and output gradient may differ in type, and the squares are summed."""
    with torch.autocast(x.device.type, enabled=False):
        x, delta = x.float(), delta.float()
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


def conv_geometry(conv: nn.Conv2d) -> tuple[nn.Module | None, tuple[int, int]]:
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
    pad_module, padding = conv_geometry(conv)
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
    padded = _zero_padded(x, padding)
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
    for rows, cols in _offsets(conv, out_h, out_w):
        tap = padded[:, :, rows, cols].reshape(n, groups, channels // groups, out_h * out_w)
        sq += (d @ tap.transpose(2, 3)).square().sum(dim=-1)
    return sq.reshape(n, conv.out_channels)


def _zero_padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0]))


def _offsets(conv: nn.Conv2d, out_h: int, out_w: int) -> Iterator[tuple[slice, slice]]:
    """For each kernel offset: the rows and columns of the padded input that it meets at the
    output positions, in order."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
        for j in range(kw):
            yield rows, slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)


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
    padded = _zero_padded(x, padding)
    height, width = padded.shape[2:]
    flat = padded.reshape(n, groups, channels // groups, height * width)
    base = (flat.transpose(2, 3) @ flat).view(n, groups, height, width, height, width)
    out_h, out_w = out_size
    gram = torch.zeros(n, groups, out_h, out_w, out_h, out_w, dtype=x.dtype, device=x.device)
    for rows, cols in _offsets(conv, out_h, out_w):
        gram += base[:, :, rows, cols, rows, cols]
    return gram.view(n, groups, out_h * out_w, out_h * out_w)
