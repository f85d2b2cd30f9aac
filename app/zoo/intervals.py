"""Predicted errors with intervals: what each expert's error on a new task will be, and how sure.

A ranking says which expert is best; a person deciding whether any expert is good enough needs
the error itself. The prediction is the distance-weighted mean of the expert's log-error over
the query's k nearest zoo tasks (``Task2VecKNN`` on log-errors, in the zoo protocol's units),
and the interval is split-conformal: the zoo's own tasks, each predicted with every task that
shares an image with it hidden (as a fold of the evaluation hides them), give the residuals,
and the interval is the prediction widened by the ``level`` quantile of those residuals.

The residuals are *normalised* (Papadopoulos et al., 2002; Lei et al., 2018): each is divided
by a scale known before the answer, so an interval is narrow where the neighbours agree and
the query is close, and wide where they disagree or the query is far from anything the zoo
holds. The scale is the neighbours' weighted spread of the expert's log-error (plus the zoo's
median spread, so that unanimous neighbours do not give a zero-width interval), times the
query's nearest distance over the zoo's median nearest distance when that ratio exceeds one:
an out-of-distribution query gets a proportionally wider interval.

Coverage holds on average over queries drawn like the zoo's tasks; a query unlike them (another
domain) is where it is tested, in the evaluation, and reported as measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.task2vec.embedding import Embedding
from app.zoo.index import Neighbour
from app.zoo.recommenders.neighbours import Task2VecKNN
from app.zoo.zoo import Zoo

#: The share of true errors an interval should hold.
INTERVAL_LEVEL = 0.8
#: The least spread an interval's scale assumes, in log-error: a 5% relative change in an
#: error, about what a test split of a few hundred images can tell apart. It keeps the scale
#: positive when a small zoo's neighbours agree exactly.
SMALLEST_SPREAD = 0.05
#: Added to an error before its log: one error point, so a perfect score is not −∞.
LOG_OFFSET = 0.01


@dataclass(frozen=True)
class Predicted:
    """Per expert (the zoo's order): expected error and the interval's ends, as fractions."""

    error: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float


class ErrorIntervals:
    """Each expert's expected error on a task from its embedding, with a conformal interval."""

    def __init__(
        self,
        zoo: Zoo,
        shared: Sequence[frozenset[int]] | None = None,
        k: int = 5,
        level: float = INTERVAL_LEVEL,
    ) -> None:
        """Calibrate on ``zoo``: ``shared[t]`` are the tasks hidden when task ``t`` is
        predicted (``folds.shared_images``; by default the task alone)."""
        self.zoo, self.level = zoo, level
        self.logs = np.log(zoo.errors + LOG_OFFSET)
        self.knn = Task2VecKNN(zoo, k, scores=self.logs)
        hidden = [sorted(shared[t]) if shared is not None else [t] for t in range(len(zoo.tasks))]
        found = [self._neighbours(zoo.embeddings[t], hidden[t]) for t in range(len(zoo.tasks))]
        usable = [t for t, f in enumerate(found) if f]
        nearest = np.array([found[t][0].distance for t in usable])
        self.reference_distance = float(np.median(nearest)) if len(nearest) else 1.0
        spreads = [self._spread(found[t]) for t in usable]
        median = float(np.median(np.concatenate(spreads))) if spreads else 1.0
        self.spread_floor = max(median, SMALLEST_SPREAD)
        scores = [
            np.abs(self.logs[t] - self._mean(found[t])) / self._scale(found[t]) for t in usable
        ]
        self.quantile = self._conformal_quantile(scores)

    def _neighbours(self, embedding: Embedding, hidden: list[int]) -> list[Neighbour]:
        return self.knn.index.search(embedding, self.knn.k, exclude=hidden)

    @staticmethod
    def _weights(found: list[Neighbour]) -> np.ndarray:
        weights = np.array([1.0 / (n.distance + 1e-3) for n in found])
        normalised: np.ndarray = weights / weights.sum()
        return normalised

    def _mean(self, found: list[Neighbour]) -> np.ndarray:
        rows = [n.id for n in found]
        mean: np.ndarray = self._weights(found) @ self.logs[rows]
        return mean

    def _spread(self, found: list[Neighbour]) -> np.ndarray:
        rows = [n.id for n in found]
        deviations = (self.logs[rows] - self._mean(found)) ** 2
        spread: np.ndarray = np.sqrt(self._weights(found) @ deviations)
        return spread

    def _scale(self, found: list[Neighbour]) -> np.ndarray:
        far = max(1.0, found[0].distance / max(self.reference_distance, 1e-12))
        scale: np.ndarray = (self._spread(found) + self.spread_floor) * far
        return scale

    def _conformal_quantile(self, scores: list[np.ndarray]) -> float:
        """The ``level`` quantile of the calibration scores with the finite-sample correction:
        the smallest score at or above a share ⌈(n+1)·level⌉ / n of them, n the number of
        tasks (tasks, not pairs, are the exchangeable draws); infinite when the zoo has too
        few tasks to reach it."""
        if not scores:
            return float("inf")
        n = len(scores)
        rank = np.ceil((n + 1) * self.level) / n
        if rank > 1:
            return float("inf")
        return float(np.quantile(np.concatenate(scores), rank, method="inverted_cdf"))

    def nearest(self, embedding: Embedding) -> list[Neighbour]:
        """The k zoo tasks nearest to ``embedding``, nearest first: what a prediction rests on."""
        return self._neighbours(embedding, [])

    def predict(self, embedding: Embedding, found: list[Neighbour] | None = None) -> Predicted:
        """Every expert's expected error on the task of ``embedding`` and its interval
        (``found``: its ``nearest`` tasks, when the caller has searched already)."""
        found = self.nearest(embedding) if found is None else found
        mean, half = self._mean(found), self.quantile * self._scale(found)

        def error(log: np.ndarray) -> np.ndarray:
            clipped: np.ndarray = np.clip(np.exp(log) - LOG_OFFSET, 0.0, 1.0)
            return clipped

        return Predicted(error(mean), error(mean - half), error(mean + half), self.level)

    def evidence(
        self, embedding: Embedding, found: list[Neighbour] | None = None
    ) -> dict[str, dict[str, float | list[float]]]:
        """Per expert name: the fields a ranking item carries (fractions of the images)."""
        p = self.predict(embedding, found)
        return {
            expert.name: {
                "predicted_error": round(float(p.error[e]), 4),
                "error_interval": [round(float(p.low[e]), 4), round(float(p.high[e]), 4)],
                "interval_level": p.level,
            }
            for e, expert in enumerate(self.zoo.experts)
        }


def coverage(predicted: Predicted, truth: np.ndarray) -> dict[str, float]:
    """How many of ``truth``'s errors (per expert, the zoo's order) the intervals hold, and
    how wide the intervals are in error points."""
    inside = (truth >= predicted.low) & (truth <= predicted.high)
    return {
        "covered": float(inside.mean()),
        "width": float(100.0 * (predicted.high - predicted.low).mean()),
        "absolute_error": float(100.0 * np.abs(predicted.error - truth).mean()),
    }


def interval_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Coverage over queries (each weighs alike, whatever its expert count), split by the
    out-of-distribution flag, with the mean width and the mean absolute error of the
    prediction, in error points."""

    def mean(key: str, picked: list[dict[str, Any]]) -> float:
        return float(np.mean([r[key] for r in picked])) if picked else float("nan")

    flagged = [r for r in rows if r.get("out_of_distribution")]
    unflagged = [r for r in rows if not r.get("out_of_distribution")]
    return {
        "level": INTERVAL_LEVEL,
        "queries": len(rows),
        "covered": mean("covered", rows),
        "covered_flagged": mean("covered", flagged),
        "covered_unflagged": mean("covered", unflagged),
        "width": mean("width", rows),
        "width_flagged": mean("width", flagged),
        "width_unflagged": mean("width", unflagged),
        "absolute_error": mean("absolute_error", rows),
    }
