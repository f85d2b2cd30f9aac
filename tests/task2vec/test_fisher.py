"""The Fisher estimators against quantities computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.task2vec import fisher, sq_norms
from app.task2vec.probes import Pool, ProbeNetwork, load_probe


def _explicit_per_sample_sq_norms(
    probe: ProbeNetwork, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """Σ_n ‖∂ℓ_n/∂w[o]‖² from one autograd call per sample: slow, obviously right."""
    modules = [m for _, m in probe.embedded_modules()]
    weights = [m.weight for m in modules]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros(w.shape[0], dtype=torch.float64) for w in weights]
    for n in range(x.shape[0]):
        loss = F.cross_entropy(probe(x[n : n + 1]), y[n : n + 1], reduction="sum")
        grads = torch.autograd.grad(loss, weights)
        for total, g in zip(sums, grads, strict=True):
            total += g.double().reshape(g.shape[0], -1).square().sum(1)
    for w in weights:
        w.requires_grad_(False)
    return sums


@pytest.mark.parametrize(("name", "size"), [("resnet18", 32), ("efficientnet_lite0", 32)])
def test_per_sample_hooks_match_explicit_per_sample_gradients(name: str, size: int) -> None:
    # ResNet: plain convs, both the direct and the Gram branch, in-place residual adds.
    # EfficientNet-Lite: depthwise (grouped) convs and TF "same" padding modules.
    probe = load_probe(name, weights="random:1", image_size=size)
    probe.reset_classifier(5, torch.Generator().manual_seed(0))
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])

    hooks = sq_norms.SquaredNormHooks([m for _, m in probe.embedded_modules()])
    try:
        xg = x.clone().requires_grad_(True)
        loss = F.cross_entropy(probe(xg), y, reduction="sum")
        torch.autograd.grad(loss, [xg])
    finally:
        hooks.remove()
    expected = _explicit_per_sample_sq_norms(probe, x, y)

    assert len(hooks.sums) == len(expected)
    for got, want in zip(hooks.sums, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-10)


def _logistic_probe(w: torch.Tensor) -> ProbeNetwork:
    """x → φ (D channels at 1x1) → per-channel weights w_d → logits [0, Σ_d w_d φ_d].

    The Fisher of w under this model is the slides' closed form for a logistic head:
    F = 1/N Σ_i p_i(1−p_i) φ_i φ_iᵀ, with p_i = σ(wᵀφ_i).
    """
    dim = w.shape[0]
    conv = nn.Conv2d(dim, dim, 1, groups=dim, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.view(dim, 1, 1, 1))
    probe = ProbeNetwork("logistic", [conv, Pool()], dim, (0.0,) * 3, (1.0,) * 3, "test")
    probe.classifier = nn.Linear(dim, 2)
    with torch.no_grad():
        probe.classifier.weight.copy_(torch.stack([torch.zeros(dim), torch.ones(dim)]))
        probe.classifier.bias.zero_()
    probe.eval().requires_grad_(False)
    return probe


@pytest.mark.parametrize(
    ("labels", "tolerance"), [("sampled", 0.03), ("gaussian", 0.03), ("exact", 1e-4)]
)
def test_per_sample_fisher_converges_to_the_closed_form(labels: str, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n, dim, repeats = 200, 6, 100
    phi = torch.relu(torch.randn(n, dim, generator=gen) + 0.5)
    w = torch.randn(dim, generator=gen)
    p = torch.sigmoid(phi @ w)
    closed_form = ((p * (1 - p))[:, None] * phi.square()).mean(0).double()
    # What an estimator that used the true labels (here: all 1) would converge to instead.
    true_label_form = ((1 - p).square()[:, None] * phi.square()).mean(0).double()

    probe = _logistic_probe(w)
    x = phi.view(n, dim, 1, 1)
    layers = fisher.per_sample_fisher(
        probe,
        0,
        lambda idx: x[torch.as_tensor(idx)],
        np.tile(np.arange(n), repeats),  # every image drawn `repeats` times
        probe(x),
        torch.Generator().manual_seed(1),
        batch_size=n,
        labels=labels,  # type: ignore[arg-type]
    )
    estimate = torch.from_numpy(layers[0].hessian).double()

    relative = (estimate - closed_form).abs() / closed_form
    assert relative.max() < tolerance, relative
    # The tolerance is tight enough to tell the two estimators apart.
    assert ((true_label_form - closed_form).abs() / closed_form).min() > 0.15


def test_batch_fisher_is_the_mean_square_of_batch_mean_gradients() -> None:
    probe = load_probe("resnet18", weights="random:2", image_size=32)
    probe.reset_classifier(3, torch.Generator().manual_seed(0))
    images = [
        torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    hs = [probe.trunk(x, 0, 6) for x in images]  # the input of layer3, as the cache holds it
    batches = [(h, torch.zeros(4, dtype=torch.long)) for h in hs]
    layers = fisher.batch_fisher(probe, 6, batches, torch.Generator().manual_seed(5))

    # Recompute by hand with the same label draws.
    gen = torch.Generator().manual_seed(5)
    modules = [m for _, m in probe.embedded_modules(6)]
    weights = [m.weight.requires_grad_(True) for m in modules]
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for h in hs:
        logits = probe(h, start=6)
        yhat = fisher.sample_model_labels(logits, gen)
        grads = torch.autograd.grad(F.cross_entropy(logits, yhat), weights)
        for a, g in zip(acc, grads, strict=True):
            a += g.double().square()
    expected = np.concatenate([(a / 3).reshape(a.shape[0], -1).mean(1).numpy() for a in acc])
    got = np.concatenate([layer.hessian for layer in layers])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)


def test_per_sample_refuses_train_mode_batchnorm() -> None:
    probe = load_probe("resnet18", weights="random", image_size=32)
    probe.reset_classifier(2, torch.Generator().manual_seed(0))
    probe.train()
    with pytest.raises(fisher.ConfigError, match="eval mode"):
        fisher.per_sample_fisher(
            probe,
            0,
            lambda idx: torch.empty(0),
            np.zeros(1, dtype=np.int64),
            torch.zeros(1, 2),
            torch.Generator(),
            batch_size=1,
        )


def _draw_by_draw(
    probe: ProbeNetwork, x: torch.Tensor, draws: np.ndarray, labels: str, batch: int, seed: int
) -> list[torch.Tensor]:
    """Σ over draws of ‖∂ℓ/∂w[o]‖², each draw on its own (one autograd call per draw and
    class), its model label or projection drawn batch by batch in draw order."""
    gen = torch.Generator().manual_seed(seed)
    weights = [m.weight.requires_grad_(True) for _, m in probe.embedded_modules()]
    sums = [torch.zeros(w.shape[0], dtype=torch.float64) for w in weights]

    def add(loss: torch.Tensor) -> None:
        for total, g in zip(sums, torch.autograd.grad(loss, weights), strict=True):
            total += g.double().reshape(g.shape[0], -1).square().sum(1)

    for lo in range(0, len(draws), batch):
        idx = draws[lo : lo + batch]
        with torch.no_grad():
            probs = torch.softmax(probe(x[idx]), dim=-1)
        if labels == "sampled":
            picked = torch.multinomial(probs, 1, generator=gen).view(-1)
        elif labels == "gaussian":
            z = torch.randn(probs.shape, generator=gen)
        for row, image in enumerate(idx):
            logits = probe(x[image : image + 1])[0]
            p = probs[row]
            if labels == "sampled":
                add(-torch.log_softmax(logits, -1)[picked[row]])
            elif labels == "gaussian":
                v = p.sqrt() * z[row] - p * (p.sqrt() * z[row]).sum()
                add((logits * v).sum())
            else:
                for c in range(len(p)):
                    add(-p[c].sqrt() * torch.log_softmax(probe(x[image : image + 1])[0], -1)[c])
    for w in weights:
        w.requires_grad_(False)
    return sums


@pytest.mark.parametrize("labels", ["sampled", "gaussian", "exact"])
def test_per_sample_fisher_equals_the_draws_one_by_one(labels: str) -> None:
    """Running each distinct image forward once, and each distinct (image, label) backward
    once with its multiplicity, gives the plain mean over the draws, with the same labels."""
    probe = load_probe("resnet18", weights="random:3", image_size=32)
    probe.reset_classifier(3, torch.Generator().manual_seed(0))
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    draws = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 0, 6, 1, 1, 3, 2, 2, 0])
    with torch.no_grad():
        logits = probe(x)
    layers = fisher.per_sample_fisher(
        probe,
        0,
        lambda idx: x[torch.as_tensor(idx)],
        draws,
        logits,
        torch.Generator().manual_seed(9),
        batch_size=5,
        labels=labels,  # type: ignore[arg-type]
    )
    expected = _draw_by_draw(probe, x, draws, labels, batch=5, seed=9)
    modules = [m for _, m in probe.embedded_modules()]
    for layer, total, module in zip(layers, expected, modules, strict=True):
        want = (total / len(draws) / sq_norms.filter_size(module)).numpy()
        np.testing.assert_allclose(layer.hessian, want, rtol=5e-4, atol=1e-12)


def test_draw_plan_runs_each_image_forward_once() -> None:
    draws = np.array([4, 4, 4, 1, 2, 2, 9, 4])
    logits = torch.tensor([[30.0, 0.0]] * 10)  # certain: every draw of an image agrees
    plan = fisher.plan_draws(draws, logits, "sampled", torch.Generator().manual_seed(0), 3)
    assert plan.forward_rows == 4  # images 1, 2, 4, 9
    assert plan.backward_rows == 4  # one label each, its draws as the weight
    assert sum(c.draws for c in plan.chunks) == len(draws)
    weights = {
        int(image): float(w)
        for c in plan.chunks
        for image, w in zip(c.images, c.weights[0], strict=True)
    }
    assert weights == {1: 1.0, 2: 2.0, 4: 4.0, 9: 1.0}
    gaussian = fisher.plan_draws(draws, logits, "gaussian", torch.Generator().manual_seed(0), 3)
    assert gaussian.forward_rows == 4
    assert gaussian.backward_rows == len(draws)  # every projection differs
