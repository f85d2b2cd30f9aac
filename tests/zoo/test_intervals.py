"""Predicted errors and their conformal intervals: the arithmetic, the widening far from the
zoo, and the noise query whose intervals must allow chance."""

from __future__ import annotations

import numpy as np
import pytest

from app.task2vec.datasets import from_arrays
from app.task2vec.embedding import embed
from app.zoo.folds import shared_images
from app.zoo.intervals import LOG_OFFSET, ErrorIntervals, Predicted, coverage
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    return tiny_built


@pytest.fixture(scope="module")
def intervals(zoo: Zoo) -> ErrorIntervals:
    return ErrorIntervals(zoo, shared_images(zoo), k=3)


def test_the_conformal_quantile_takes_the_finite_sample_rank(intervals: ErrorIntervals) -> None:
    # Nine tasks at 80%: rank ⌈10·0.8⌉/9 = 8/9 of the pooled scores, taken upwards.
    scores = [np.array([float(i)]) for i in range(1, 10)]
    assert intervals._conformal_quantile(scores) == 8.0
    # Three tasks cannot reach 80% (⌈4·0.8⌉ = 4 > 3): no finite interval is honest.
    assert intervals._conformal_quantile(scores[:3]) == float("inf")


def test_each_zoo_task_predicted_without_its_overlaps_is_covered_at_the_level(
    zoo: Zoo, intervals: ErrorIntervals
) -> None:
    """The calibration itself: the tasks it was fit on are covered at least at the level
    (pooled over experts), when each is predicted with the tasks it shares images with hidden,
    as the calibration predicted it."""
    shared = shared_images(zoo)
    inside = []
    for t in range(len(zoo.tasks)):
        found = intervals._neighbours(zoo.embeddings[t], sorted(shared[t]))
        mean, half = intervals._mean(found), intervals.quantile * intervals._scale(found)
        inside.append(np.abs(intervals.logs[t] - mean) <= half)
    assert np.concatenate(inside).mean() >= intervals.level


def test_an_interval_holds_its_prediction_within_zero_and_one(
    zoo: Zoo, intervals: ErrorIntervals
) -> None:
    p = intervals.predict(zoo.embeddings[0])
    assert np.all(p.low <= p.error)
    assert np.all(p.error <= p.high)
    assert np.all(p.low >= 0)
    assert np.all(p.high <= 1)
    fields = intervals.evidence(zoo.embeddings[0])
    assert set(fields) == {e.name for e in zoo.experts}
    first = fields[zoo.experts[0].name]
    assert first["error_interval"][0] <= first["predicted_error"] <= first["error_interval"][1]
    assert first["interval_level"] == 0.8


def test_noise_gets_wider_intervals_that_allow_chance(zoo: Zoo, intervals: ErrorIntervals) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 3, 120)
    noise = embed(from_arrays(images, labels), zoo.embed_config)
    far, near = intervals.predict(noise), intervals.predict(zoo.embeddings[0])
    width = lambda p: np.log(p.high + LOG_OFFSET) - np.log(p.low + LOG_OFFSET)  # noqa: E731
    assert np.all(width(far) > width(near))
    # Random labels: every expert is at chance (2/3 wrong). No interval may promise better.
    assert np.all(far.high >= 2 / 3)


def test_coverage_counts_the_errors_inside_and_the_width_in_points() -> None:
    p = Predicted(
        error=np.array([0.1, 0.2]), low=np.array([0.05, 0.1]), high=np.array([0.2, 0.3]), level=0.8
    )
    measured = coverage(p, np.array([0.2, 0.35]))
    assert measured["covered"] == 0.5  # the first end is inside, the second is not
    assert measured["width"] == pytest.approx(17.5)
    assert measured["absolute_error"] == pytest.approx(12.5)
