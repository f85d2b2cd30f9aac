"""Seeded draws over a task's images: stratified subsets and class-balanced sampling.

Both are pure functions of the labels and a ``torch.Generator``, so an embedding is a function
of (data, options, seed) alone.
"""

from __future__ import annotations

import numpy as np
import torch


def stratified_subset(
    labels: np.ndarray, max_samples: int, generator: torch.Generator
) -> np.ndarray:
    """Indices of a random, class-stratified subset of at most ``max_samples`` images.

    Each class keeps its share of the data (largest remainders get the leftover slots) and at
    least one image, so a class-sorted dataset is never cut to its first classes. Returned
    sorted, which keeps batches in dataset order.
    """
    n = labels.shape[0]
    if max_samples >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    if max_samples < len(classes):
        raise ValueError(
            f"max_samples={max_samples} is smaller than the number of classes ({len(classes)})"
        )
    exact = counts * (max_samples / n)
    quota = np.maximum(np.floor(exact).astype(np.int64), 1)
    leftover = max_samples - int(quota.sum())
    if leftover > 0:
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        for c in order:
            if leftover == 0:
                break
            if quota[c] < counts[c]:
                quota[c] += 1
                leftover -= 1
    while leftover < 0:  # the at-least-one rule overshot: take from the largest quotas
        c = int(np.argmax(quota))
        quota[c] -= 1
        leftover += 1
    chosen: list[np.ndarray] = []
    for c, take in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == c)
        perm = torch.randperm(len(members), generator=generator).numpy()
        chosen.append(members[perm[:take]])
    return np.sort(np.concatenate(chosen))


def balanced_draws(labels: np.ndarray, num_samples: int, generator: torch.Generator) -> np.ndarray:
    """``num_samples`` indices drawn with replacement, each class equally likely.

    The reference's sampler: weights proportional to 1 / class count.
    """
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator).numpy()
