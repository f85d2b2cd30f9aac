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
  squared row norms directly (the per-example-gradient-norm trick, ``sq_norms.py``), so the
  backward pass does not even compute weight gradients. The estimate is a sum over draws, so
  the draws are regrouped (``DrawPlan``): each distinct image runs forward once, and draws
  that ask for the same backward pass (the same image and sampled label) share it, with their
  count as its weight. 2,048 draws from 1,000 images (ResNet-34 on Fashion-MNIST) became 874
  forward and 1,151 backward rows.
  The expectation over the model's labels ŷ ~ p_w(y|x) can be taken three ways (``labels``):
  ``sampled`` draws one ŷ per image (the method as published); ``gaussian`` backpropagates
  v = (diag p − ppᵀ)^½ z, z ~ N(0, I), which has the same covariance as e_ŷ − p and so the same
  expectation, without the rare large spikes a confident model's sampled labels produce;
  ``exact`` sums over all classes weighted by p (one backward pass per class), leaving only
  the noise of which images are drawn.
* ``variational.variational_fisher`` is the paper's robust Fisher: it learns, per filter, the
  largest weight noise the task tolerates; its inverse is the curvature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from app.task2vec.errors import ConfigError
from app.task2vec.lanes import Turnstile, cpu_lanes
from app.task2vec.probes import ProbeNetwork
from app.task2vec.sq_norms import SquaredNormHooks, filter_size

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LabelExpectation = Literal["sampled", "gaussian", "exact"]
Progress = Callable[[int], None]


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
    hooks = SquaredNormHooks([m for _, m in modules])

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
        _filterwise(name, total / len(draws) / filter_size(module))
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
    # image → {what a draw asks for: [its target, how many draws ask for it]}
    per_image: dict[int, dict[Any, list[Any]]] = {}
    for lo in range(0, len(draws), batch_size):
        idx = draws[lo : lo + batch_size]
        if labels == "sampled":
            batch_logits = logits[torch.as_tensor(idx, device=logits.device)]
            picked = sample_model_labels(batch_logits, generator).cpu().tolist()
            for image, label in zip(idx.tolist(), picked, strict=True):
                per_image.setdefault(image, {}).setdefault(label, [label, 0])[1] += 1
        elif labels == "gaussian":  # every projection differs
            z = torch.randn((len(idx), logits.shape[1]), generator=generator)
            for row, image in enumerate(idx.tolist()):
                targets = per_image.setdefault(image, {})
                targets[len(targets)] = [z[row], 1]
        else:
            for image in idx.tolist():
                per_image.setdefault(image, {}).setdefault(None, [None, 0])[1] += 1
    by_rounds: dict[int, list[int]] = {}
    for image in sorted(per_image):
        by_rounds.setdefault(len(per_image[image]), []).append(image)
    chunks = []
    for rounds in sorted(by_rounds):
        images = by_rounds[rounds]
        for lo in range(0, len(images), batch_size):
            group = images[lo : lo + batch_size]
            entries = [list(per_image[image].values()) for image in group]
            chunk_targets: list[torch.Tensor | None] = []
            chunk_weights: list[torch.Tensor] = []
            for r in range(rounds):
                asked, counts = zip(*(row[r] for row in entries), strict=True)
                if labels == "exact":
                    chunk_targets.append(None)
                elif labels == "gaussian":
                    chunk_targets.append(torch.stack(asked))
                else:
                    chunk_targets.append(torch.tensor(asked, dtype=torch.long))
                chunk_weights.append(torch.tensor(counts, dtype=torch.float32))
            covered = int(sum(w.sum().item() for w in chunk_weights))
            chunks.append(_Chunk(np.array(group), chunk_targets, chunk_weights, covered))
    return DrawPlan(chunks)


def _filterwise(name: str, values: torch.Tensor) -> LayerFisher:
    hessian = values.detach().cpu().numpy().astype(np.float32)
    return LayerFisher(name, hessian, np.ones_like(hessian))
