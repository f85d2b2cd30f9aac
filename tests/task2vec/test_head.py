"""The full-batch head fit against the same fit by autograd and torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.task2vec.head import _Adam, fit_head
from app.task2vec.probes import Pool, ProbeNetwork
from app.task2vec.sampling import balanced_draws


def _probe(dim: int) -> ProbeNetwork:
    layers = [torch.nn.Conv2d(dim, dim, 1), Pool()]  # only the head is fitted
    return ProbeNetwork("features", layers, dim, (0.0,) * 3, (1.0,) * 3, "test")


def test_written_out_adam_is_torch_adam_to_the_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, 7, generator=gen)
    theirs = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([theirs], lr=4e-4, weight_decay=1e-4)
    ours = start.clone()
    adam = _Adam([ours])
    for _ in range(200):
        grad = torch.randn(4, 7, generator=gen)
        theirs.grad = grad.clone()
        optimizer.step()
        adam.step([grad.clone()])
    assert torch.equal(theirs.detach(), ours)


def test_full_batch_head_matches_autograd_on_the_weighted_loss() -> None:
    # In float64: Adam divides by the root of the squared gradients' average, so a weight
    # whose gradient hovers near zero amplifies float32 rounding into drifts of 1e-4.
    gen = torch.Generator().manual_seed(1)
    features = torch.relu(torch.randn(90, 12, generator=gen, dtype=torch.float64))
    features[:, [3, 8]] = 0.0  # features no image has: their weights must stay zero
    labels = torch.cat([torch.zeros(50), torch.ones(30), torch.full((10,), 2)]).long()

    probe = _probe(12)
    accuracy = fit_head(
        probe, features, labels, 3, mode="full-batch", epochs=2, batch_size=64, generator=gen
    )

    # The definition: from zero, Adam on the cross-entropy weighted by 1/class count.
    head = torch.nn.Linear(12, 3).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    counts = torch.bincount(labels).double()
    class_weight = counts.sum() / (3 * counts)
    optimizer = torch.optim.Adam(head.parameters(), lr=4e-4, weight_decay=1e-4)
    for _ in range(2 * (10_000 // 64)):
        loss = F.cross_entropy(head(features), labels, weight=class_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    got = probe.classifier
    torch.testing.assert_close(got.weight, head.weight.detach().float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.bias, head.bias.detach().float(), rtol=1e-6, atol=1e-9)
    assert torch.all(got.weight[:, [3, 8]] == 0)
    assert not got.weight.requires_grad
    expected = (head(features).argmax(1) == labels).double().mean().item()
    assert accuracy == pytest.approx(expected)


def test_sampled_head_is_the_reference_fit_to_the_bit() -> None:
    """The reference's head (random start, balanced minibatches) with the written-out Adam:
    the same weights as torch.optim.Adam on the same draws."""
    gen = torch.Generator().manual_seed(1)
    features = torch.relu(torch.randn(90, 12, generator=gen))
    labels = torch.cat([torch.zeros(50), torch.ones(30), torch.full((10,), 2)]).long()
    probe = _probe(12)
    fit_head(
        probe,
        features,
        labels,
        3,
        mode="sampled",
        epochs=2,
        batch_size=64,
        generator=torch.Generator().manual_seed(5),
    )

    draws_from = torch.Generator().manual_seed(5)
    reference = _probe(12)
    reference.reset_classifier(3, draws_from)
    head = reference.classifier
    optimizer = torch.optim.Adam(head.parameters(), lr=4e-4, weight_decay=1e-4)
    for _ in range(2):
        draws = balanced_draws(labels.numpy(), (10_000 // 64) * 64, draws_from)
        for batch in torch.as_tensor(draws).view(-1, 64):
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.equal(probe.classifier.weight, head.weight.detach())
    assert torch.equal(probe.classifier.bias, head.bias.detach())
