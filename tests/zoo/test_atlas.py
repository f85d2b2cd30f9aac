"""The task map: classical MDS of a distance matrix, and the placing of a new task on it."""

from __future__ import annotations

import numpy as np
import pytest

from app.zoo.atlas import Atlas


def _distances(points: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    others = points if others is None else others
    return np.asarray(np.linalg.norm(points[:, None, :] - others[None, :, :], axis=-1))


def test_a_flat_point_set_is_drawn_with_its_own_distances() -> None:
    points = np.random.default_rng(0).normal(size=(12, 2)) * [3.0, 1.0]
    atlas = Atlas.fit(_distances(points))
    assert atlas.coordinates.shape == (12, 2)
    # Up to rotation and reflection, the map is the point set: the same distances.
    np.testing.assert_allclose(_distances(atlas.coordinates), _distances(points), atol=1e-9)
    # A new point of the plane lands where its distances put it.
    new = np.array([[0.5, -2.0]])
    x, y = atlas.place(_distances(new, points)[0])
    np.testing.assert_allclose(
        _distances(np.array([[x, y]]), atlas.coordinates), _distances(new, points), atol=1e-9
    )


def test_a_fitted_task_is_placed_where_the_fit_put_it() -> None:
    """Also for a distance that is not Euclidean in two dimensions (here: in eight)."""
    rng = np.random.default_rng(1)
    sym = _distances(rng.normal(size=(10, 8))) ** 0.7
    atlas = Atlas.fit(sym)
    for i in range(10):
        np.testing.assert_allclose(atlas.place(sym[i]), atlas.coordinates[i], atol=1e-9)


def test_the_same_distances_draw_the_same_map() -> None:
    sym = _distances(np.random.default_rng(2).normal(size=(7, 3)))
    order = np.arange(7)[::-1]
    first, reordered = Atlas.fit(sym), Atlas.fit(sym[np.ix_(order, order)])
    np.testing.assert_allclose(reordered.coordinates[::-1], first.coordinates, atol=1e-9)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_a_map_of_too_few_tasks_has_flat_axes(n: int) -> None:
    sym = _distances(np.arange(n, dtype=np.float64).reshape(-1, 1))
    atlas = Atlas.fit(sym)
    assert atlas.coordinates.shape == (n, 2)
    assert np.all(np.isfinite(atlas.coordinates))
    np.testing.assert_allclose(atlas.coordinates[:, 1], 0.0)
    if n:
        assert np.all(np.isfinite(atlas.place(sym[0])))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        Atlas.fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        Atlas.fit(np.array([[0.0, np.nan], [np.nan, 0.0]]))
    atlas = Atlas.fit(_distances(np.eye(3)))
    with pytest.raises(ValueError, match="2 distances for a map of 3"):
        atlas.place(np.zeros(2))
