"""Image provenance: which images of a source experts may train on, and which a zoo measures on.

A matrix entry is only honest if the expert never saw the images it is measured on. So every
source of images is split once, by a seeded rule stored with the zoo (``ImageSplit``), into
disjoint pools:

* the **expert pool**: the only images an expert trained on a zoo task ever sees;
* the **evaluation pool**: the only images zoo tasks are cut from (their embedding and their
  row of the performance matrix). It is divided further, one disjoint slice per domain the
  source feeds (plain and altered tasks of one source never share an image), so that holding
  a whole domain out leaves no image of it in the rest of the zoo.

The rule is a pure function of (seed, share, source name, source size), so the split is the
same on every machine and every rebuild, and a test can recompute it. Fashion-MNIST's test
split (t10k) is never a source of the zoo: it is kept for checks from outside the zoo.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from app.task2vec.errors import ConfigError

#: The name of the expert pool; evaluation slices are named by their domain.
EXPERT_POOL = "experts"


@dataclass(frozen=True)
class ImageSplit:
    """A seeded split of every source into an expert pool and per-domain evaluation slices."""

    seed: int = 0
    #: Share of each source's images reserved for training experts.
    expert_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.expert_share < 1.0:
            raise ConfigError(f"expert_share must lie in (0, 1), got {self.expert_share}")

    def order(self, source: str, count: int) -> np.ndarray:
        """The source's images in the split's random order: a function of the seed and the
        source's name alone, so adding another source moves nothing."""
        salt = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
        return np.random.default_rng([self.seed, salt]).permutation(count)

    def pools(self, source: str, count: int, domains: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Sorted image indices of the expert pool and of each domain's evaluation slice."""
        if not domains:
            raise ConfigError(f"source {source!r} feeds no domain")
        order = self.order(source, count)
        cut = round(self.expert_share * count)
        evaluation = order[cut:]
        pools = {EXPERT_POOL: np.sort(order[:cut])}
        for i, domain in enumerate(domains):
            pools[domain] = np.sort(evaluation[i :: len(domains)])
        return pools
