"""Seeded subsets and balanced draws."""

from __future__ import annotations

import numpy as np
import torch

from app.task2vec.sampling import balanced_draws, stratified_subset


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_stratified_subset_keeps_class_shares_and_is_seeded() -> None:
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    subset = stratified_subset(labels, 100, _gen())
    assert len(subset) == 100
    assert np.bincount(labels[subset]).tolist() == [60, 30, 10]
    assert np.array_equal(subset, stratified_subset(labels, 100, _gen()))
    assert not np.array_equal(subset, stratified_subset(labels, 100, _gen(1)))
    assert not np.array_equal(subset, np.arange(100))  # never "the first N"
    assert np.all(np.diff(subset) > 0)


def test_every_class_keeps_an_image_and_the_total_holds() -> None:
    labels = np.repeat([0, 1, 2, 3], [997, 1, 1, 1])
    subset = stratified_subset(labels, 10, _gen())
    assert len(subset) == 10
    assert set(labels[subset]) == {0, 1, 2, 3}


def test_subset_does_not_depend_on_class_names() -> None:
    labels = np.repeat([0, 1, 2], 50)
    renamed = np.array([7, 3, 5])[labels]
    assert np.array_equal(
        stratified_subset(labels, 31, _gen()), stratified_subset(renamed, 31, _gen())
    )


def test_balanced_draws_give_each_class_an_equal_share() -> None:
    labels = np.repeat([0, 1], [900, 100])
    draws = balanced_draws(labels, 20_000, _gen())
    share = np.bincount(labels[draws]) / 20_000
    assert abs(share[0] - 0.5) < 0.02
