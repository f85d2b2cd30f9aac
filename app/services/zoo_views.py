"""Views of the served zoo for a person to look at: its tasks on a map (classical MDS of the
symmetric Task2Vec distance), with an uploaded task placed on it, and its error matrix.

A map is a pure function of the zoo version, and its distances cost n² comparisons of
embeddings, so it is computed once per version in each process and kept; placing a task
costs n comparisons and is done per request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.services.cache import LRUCache
from app.services.serving import ZooState
from app.task2vec.distances import symmetric_hessians
from app.task2vec.embedding import Embedding
from app.zoo.atlas import Atlas
from app.zoo.zoo import Zoo

METHOD = "classical MDS of the symmetric Task2Vec distance"
#: Decimals of the coordinates and errors answered: more says nothing a plot can show.
DECIMALS = 6
ERROR_DECIMALS = 4


@dataclass(frozen=True)
class ZooMap:
    """One version's map: the atlas and the zoo's tasks on it, as answered."""

    atlas: Atlas
    tasks: list[dict[str, Any]]
    domains: list[str]
    distances: np.ndarray  # the symmetric distance between every two tasks


#: Maps by zoo version content: a process serves one version at a time, and keeps a few
#: while a swap is under way.
_MAPS: LRUCache[str, ZooMap] = LRUCache(4)
_drawing = threading.Lock()


def _hessian(embedding: Embedding) -> np.ndarray:
    return embedding.hessian.astype(np.float64)


def zoo_distances(zoo: Zoo) -> np.ndarray:
    """The symmetric distance between every two zoo tasks (the distance ``neighbours`` ranks
    by), with a zero diagonal."""
    hessians = [_hessian(e) for e in zoo.embeddings]
    n = len(hessians)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = symmetric_hessians(hessians[i], hessians[j])
    return out


def distances_to_zoo(zoo: Zoo, embedding: Embedding) -> np.ndarray:
    """The symmetric distance from a task's embedding to each zoo task, in the zoo's order:
    the index's exact search over every task (an embedding made otherwise than the zoo's is
    refused, as for its neighbours)."""
    zoo.check_compatible(embedding)
    out = np.empty(len(zoo.tasks))
    for found in zoo.index().exact_search(embedding, k=len(zoo.tasks)):
        out[found.id] = found.distance
    return out


def zoo_map(state: ZooState) -> ZooMap:
    """The served version's map, drawn on first use in this process (one drawing at a time:
    concurrent first requests wait for it rather than each drawing it)."""
    key = state.version.content
    found = _MAPS.get(key)
    if found is not None:
        return found
    with _drawing:
        found = _MAPS.get(key)
        if found is None:
            found = _draw(state.zoo)
            _MAPS.put(key, found)
    return found


def _draw(zoo: Zoo) -> ZooMap:
    distances = zoo_distances(zoo)
    atlas = Atlas.fit(distances)
    tasks = [
        {
            "name": task.name,
            "domain": task.domain,
            "x": round(float(x), DECIMALS),
            "y": round(float(y), DECIMALS),
            "best_expert": zoo.experts[zoo.best_expert(i)].name,
        }
        for i, (task, (x, y)) in enumerate(zip(zoo.tasks, atlas.coordinates, strict=True))
    ]
    return ZooMap(atlas, tasks, sorted({t.domain for t in zoo.tasks}), distances)


def map_view(state: ZooState, placed: tuple[str, Embedding] | None = None) -> dict[str, Any]:
    """The answer of ``GET /v1/zoo/map``: the zoo's tasks on the map and, given a task's id
    and embedding, where that task lands on it."""
    drawn = zoo_map(state)
    where = None
    if placed is not None:
        task_id, embedding = placed
        x, y = drawn.atlas.place(distances_to_zoo(state.zoo, embedding))
        where = {"task_id": task_id, "x": round(x, DECIMALS), "y": round(y, DECIMALS)}
    return {
        "zoo_version": state.version.content,
        "method": METHOD,
        "domains": drawn.domains,
        "tasks": drawn.tasks,
        "placed": where,
    }


def matrix_view(state: ZooState) -> dict[str, Any]:
    """The answer of ``GET /v1/zoo/matrix``: each zoo task's held-out error with each
    expert's features, a row per task (None for a cell not measured)."""
    zoo = state.zoo
    return {
        "zoo_version": state.version.content,
        "tasks": [{"name": t.name, "domain": t.domain} for t in zoo.tasks],
        "experts": [
            {"name": e.name, "architecture": e.architecture, "source_task": e.source_task}
            for e in zoo.experts
        ],
        "errors": [
            [None if np.isnan(v) else round(float(v), ERROR_DECIMALS) for v in row]
            for row in zoo.errors
        ],
    }


def distances_view(state: ZooState) -> dict[str, Any]:
    """The answer of ``GET /v1/zoo/distances``: the symmetric distance between every two zoo
    tasks, the matrix the map is laid out from (the evaluation report's distance figure)."""
    drawn = zoo_map(state)
    return {
        "zoo_version": state.version.content,
        "tasks": [{"name": t.name, "domain": t.domain} for t in state.zoo.tasks],
        "distances": np.round(drawn.distances, ERROR_DECIMALS).tolist(),
    }
