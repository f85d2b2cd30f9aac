"""A map of tasks in two dimensions, from their distances alone: classical (Torgerson) MDS,
and the placing of one more task on a fitted map without moving the tasks already on it.

A person reads the zoo from such a map (do a domain's tasks sit together? where does an
uploaded task fall?), so the new task must land on the zoo's own layout: refitting with it
would move every other point. The landmark-MDS out-of-sample formula (de Silva & Tenenbaum
2004, the same as Gower's 1968 adding of a point) places it from its distances to the fitted
tasks; a fitted task's own distances place it exactly where the fit put it.

Pure numpy: the service computes the distances and keeps one atlas per zoo version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The map's dimensions.
AXES = 2


@dataclass(frozen=True)
class Atlas:
    """A fitted map: ``coordinates`` (n, 2) of the fitted tasks, and what ``place`` needs."""

    coordinates: np.ndarray
    #: (n, 2) unit eigenvectors of the double-centred squared distances (0 on an axis the
    #: distances leave flat) and their eigenvalues (0 where not positive).
    vectors: np.ndarray
    values: np.ndarray
    #: (n,) the mean squared distance from each fitted task to all of them (δ̄).
    mean_squared: np.ndarray

    @classmethod
    def fit(cls, sym: np.ndarray) -> Atlas:
        """Classical MDS of a symmetric distance matrix (zero diagonal): the top two
        eigenpairs of B = −½·J·D²·J (J centres). A distance that is not Euclidean gives B
        negative eigenvalues, which a map cannot show; an axis whose eigenvalue is not
        positive is flat (all 0). Each axis points where its largest entry is positive, so
        the same distances always draw the same map."""
        d = np.asarray(sym, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != d.shape[1]:
            raise ValueError(f"a distance matrix is square; got shape {d.shape}")
        if not np.all(np.isfinite(d)):
            raise ValueError("distances must be finite")
        n = d.shape[0]
        squared = ((d + d.T) / 2) ** 2
        centred = np.eye(n) - 1.0 / n if n else np.zeros((0, 0))
        b = -0.5 * centred @ squared @ centred
        values, vectors = np.linalg.eigh((b + b.T) / 2) if n else (np.zeros(0), np.zeros((0, 0)))
        order = np.argsort(values)[::-1][:AXES]
        top, axes = np.zeros(AXES), np.zeros((n, AXES))
        top[: order.size], axes[:, : order.size] = values[order], vectors[:, order]
        tolerance = 1e-12 * max(1.0, float(np.abs(values).max(initial=0.0)))
        flat = top <= tolerance
        top[flat], axes[:, flat] = 0.0, 0.0
        for axis in range(AXES):
            if n and axes[np.argmax(np.abs(axes[:, axis])), axis] < 0:
                axes[:, axis] *= -1
        return cls(
            coordinates=axes * np.sqrt(top),
            vectors=axes,
            values=top,
            mean_squared=squared.mean(axis=0) if n else np.zeros(0),
        )

    def __len__(self) -> int:
        return int(self.coordinates.shape[0])

    def place(self, distances_to_zoo: np.ndarray) -> tuple[float, float]:
        """Where a task lands given its distance to each fitted task (in their order):
        x = −½·L#·(δ − δ̄), with δ its squared distances and L# the pseudo-inverse transpose
        of the fitted layout (each axis's eigenvector over the root of its eigenvalue)."""
        delta = np.asarray(distances_to_zoo, dtype=np.float64).reshape(-1)
        if delta.shape[0] != len(self):
            raise ValueError(f"{delta.shape[0]} distances for a map of {len(self)} tasks")
        if not np.all(np.isfinite(delta)):
            raise ValueError("distances must be finite")
        scale = np.zeros(AXES)
        shown = self.values > 0
        scale[shown] = 1.0 / np.sqrt(self.values[shown])
        xy = -0.5 * (self.vectors * scale).T @ (delta**2 - self.mean_squared)
        return float(xy[0]), float(xy[1])
