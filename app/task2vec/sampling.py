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
    least one image, so a class-sorted dataset is never cut to its first classes. Every choice
    follows one random order of the images, so renaming the classes selects the same images.
    Returned sorted, which keeps batches in dataset order.
    """
    n = labels.shape[0]
    if max_samples >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    if max_samples < len(classes):
        raise ValueError(
            f"max_samples={max_samples} is smaller than the number of classes ({len(classes)})"
        )
    order = torch.randperm(n, generator=generator).numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    exact = counts * (max_samples / n)
    quota = np.maximum(np.floor(exact).astype(np.int64), 1)
    # Leftover slots go to the largest remainders; ties fall to the class met first in the
    # random order, never to the class with the smallest name.
    tie_break = np.array([rank[labels == c].min() for c in classes])
    by_remainder = np.lexsort((tie_break, -(exact - np.floor(exact))))
    leftover = max_samples - int(quota.sum())
    for c in by_remainder:
        if leftover <= 0:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
            leftover -= 1
    while leftover < 0:  # the at-least-one rule overshot: take from the largest quota
        c = np.lexsort((tie_break, -quota))[0]
        quota[c] -= 1
        leftover += 1
    position = np.searchsorted(classes, labels)
    taken = np.zeros(len(classes), dtype=np.int64)
    chosen = []
    for i in order:
        c = position[i]
        if taken[c] < quota[c]:
            taken[c] += 1
            chosen.append(i)
    return np.sort(np.array(chosen, dtype=np.int64))


def balanced_draws(labels: np.ndarray, num_samples: int, generator: torch.Generator) -> np.ndarray:
    """``num_samples`` indices drawn with replacement, each class equally likely.

    The reference's sampler: weights proportional to 1 / class count.
    """
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator).numpy()
