"""Knowing when the zoo does not know: is a query farther from the zoo than its own tasks are?

The yardstick is the zoo itself. Each zoo task's distance to its nearest *other* task (one that
shares no image with it: a near-copy would make every task look close) says how far apart
related tasks sit in this zoo; a query whose nearest zoo task is farther than ``quantile`` of
those distances (95% by default) lies outside what the zoo has covered. The neighbours'
experts then say little about which expert suits it, so a method that can look at the data
(LogME) should carry more of the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.task2vec.embedding import Embedding
from app.zoo.zoo import Zoo

#: The share of the zoo's own nearest-task distances a query may exceed before it is flagged.
NOVELTY_QUANTILE = 0.95


@dataclass(frozen=True)
class Novelty:
    #: Each zoo task's distance to its nearest task that shares no image with it.
    distances: np.ndarray
    quantile: float
    threshold: float

    @classmethod
    def fit(
        cls,
        zoo: Zoo,
        shared: Sequence[frozenset[int]] | None = None,
        quantile: float = NOVELTY_QUANTILE,
    ) -> Novelty:
        """The zoo's yardstick. ``shared[t]``: the tasks that share images with task ``t``
        (``folds.shared_images``); by default each task shares only with itself."""
        index = zoo.index()
        nearest = []
        for t, embedding in enumerate(zoo.embeddings):
            hidden = sorted(shared[t]) if shared is not None else [t]
            found = index.search(embedding, 1, exclude=hidden)
            if found:
                nearest.append(found[0].distance)
        distances = np.sort(np.array(nearest, dtype=np.float64))
        threshold = float(np.quantile(distances, quantile)) if len(distances) else float("inf")
        return cls(distances, quantile, threshold)

    def check(self, distance: float) -> dict[str, Any]:
        """What to say of a query whose nearest zoo task is ``distance`` away."""
        share = float(np.searchsorted(self.distances, distance, side="right"))
        return {
            "out_of_distribution": bool(distance > self.threshold),
            "nearest_distance": float(distance),
            "threshold": self.threshold,
            "threshold_quantile": self.quantile,
            # The share of zoo tasks whose nearest neighbour is at least as near as this.
            "zoo_quantile": share / max(1, len(self.distances)),
        }

    def of(self, zoo: Zoo, embedding: Embedding) -> dict[str, Any]:
        """``check`` of ``embedding``'s distance to its nearest task of ``zoo``."""
        found = zoo.index().search(embedding, 1)
        return self.check(found[0].distance if found else float("inf"))
