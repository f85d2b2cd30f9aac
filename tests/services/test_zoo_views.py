"""The served zoo's views for a person (tests/api/test_zoo_map.py serves them): the distance
matrix every map is laid out from, a task's distances to the zoo, and the map kept per
version."""

from __future__ import annotations

import numpy as np
import pytest

from app.services import zoo_views
from app.services.cache import LRUCache
from app.services.serving import ZooStates
from app.settings import Settings
from app.task2vec.distances import symmetric_hessians
from app.zoo.atlas import Atlas
from app.zoo.zoo import Zoo


def test_the_zoo_distances_are_the_symmetric_distance_of_every_pair(tiny_built: Zoo) -> None:
    distances = zoo_views.zoo_distances(tiny_built)
    n = len(tiny_built.tasks)
    assert distances.shape == (n, n)
    np.testing.assert_array_equal(distances, distances.T)
    assert (np.diag(distances) == 0).all()
    h = [e.hessian.astype(np.float64) for e in tiny_built.embeddings]
    assert distances[1, 5] == pytest.approx(symmetric_hessians(h[1], h[5]))
    # A zoo task's own embedding is its row of the matrix.
    row = zoo_views.distances_to_zoo(tiny_built, tiny_built.embeddings[3])
    np.testing.assert_allclose(row, distances[3], atol=1e-12)


def test_a_map_is_drawn_once_per_version_and_places_a_zoo_task_on_itself(
    tiny_built: Zoo, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zoo_views, "_MAPS", LRUCache(4))
    fits: list[int] = []
    fit = Atlas.fit
    monkeypatch.setattr(Atlas, "fit", lambda sym: fits.append(len(sym)) or fit(sym))
    state = ZooStates(background=False, fitted=()).current(settings)
    first = zoo_views.map_view(state)
    placed = zoo_views.map_view(state, ("mine", state.zoo.embeddings[2]))
    assert fits == [len(state.zoo.tasks)]
    assert placed["tasks"] == first["tasks"]
    here = placed["placed"]
    assert (here["x"], here["y"]) == pytest.approx(
        (first["tasks"][2]["x"], first["tasks"][2]["y"]), abs=1e-5
    )
    distances = zoo_views.distances_view(state)
    assert np.array(distances["distances"]).shape == (len(state.zoo.tasks),) * 2
    assert fits == [len(state.zoo.tasks)]  # the distances come with the drawn map
