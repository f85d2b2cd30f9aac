"""The served zoo for a person to look at, on SQLite and the real PostgreSQL: its tasks on a
map (with an uploaded task placed among them) and its error matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import zoo_views
from app.services.cache import LRUCache
from app.settings import Settings
from app.zoo.atlas import Atlas
from app.zoo.presets import tiny
from tests.helpers import create_key, npz_upload, run_job
from workers import tasks


def _embedded(client: TestClient, settings: Settings, headers: dict[str, str] | None = None) -> str:
    """A task of tiny zoo task 1's own images, embedded."""
    upload = client.post("/v1/tasks", headers=headers, files={"file": ("a.npz", npz_upload(1))})
    assert upload.status_code == 202, upload.text
    run_job(settings, upload.json()["job_id"])
    task_id: str = upload.json()["task_id"]
    return task_id


def test_the_map_shows_every_zoo_task_once_per_version(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zoo_views, "_MAPS", LRUCache(4))
    fits: list[int] = []
    fit = Atlas.fit

    def counted(sym: np.ndarray) -> Atlas:
        fits.append(sym.shape[0])
        return fit(sym)

    monkeypatch.setattr(Atlas, "fit", counted)
    answer = client.get("/v1/zoo/map")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["zoo_version"] == client.get("/v1/zoo").json()["version"]
    assert body["method"] == "classical MDS of the symmetric Task2Vec distance"
    assert body["placed"] is None
    served = {t["name"]: t for t in client.get("/v1/zoo/tasks").json()["items"]}
    assert [t["name"] for t in body["tasks"]] == [t.name for t in tiny()]
    for task in body["tasks"]:
        assert task["domain"] == served[task["name"]]["domain"]
        assert task["best_expert"] == served[task["name"]]["best_expert"]
        assert np.isfinite([task["x"], task["y"]]).all()
    assert body["domains"] == sorted({t["domain"] for t in body["tasks"]})
    # A spread-out layout, not every task on one point.
    assert np.ptp([t["x"] for t in body["tasks"]]) > 0
    assert client.get("/v1/zoo/map").json() == body
    assert fits == [8]  # drawn once for the version, whatever the requests


def test_an_uploaded_zoo_task_lands_on_itself(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    task_id = _embedded(client, settings)
    answer = client.get("/v1/zoo/map", params={"task": task_id})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    own = next(t for t in body["tasks"] if t["name"] == tiny()[1].name)
    placed = body["placed"]
    assert placed["task_id"] == task_id
    assert placed["x"] == pytest.approx(own["x"], abs=1e-4)
    assert placed["y"] == pytest.approx(own["y"], abs=1e-4)

    missing = client.get("/v1/zoo/map", params={"task": "nope"})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    queued = client.post("/v1/tasks", files={"file": ("b.npz", npz_upload(2))}).json()
    not_ready = client.get("/v1/zoo/map", params={"task": queued["task_id"]})
    assert not_ready.status_code == 409
    assert not_ready.json()["type"].endswith("/embedding-not-ready")


def test_another_tenants_task_is_not_found_on_the_map(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    keyed = settings.model_copy(update={"api_keys": "required"})
    monkeypatch.setattr(tasks, "get_settings", lambda: keyed)
    acme = {
        "Authorization": f"Bearer {create_key(keyed, 'acme', ['tasks:read', 'tasks:write'])[1]}"
    }
    globex = {"Authorization": f"Bearer {create_key(keyed, 'globex', ['tasks:read'])[1]}"}
    writer = {"Authorization": f"Bearer {create_key(keyed, 'acme', ['tasks:write'])[1]}"}
    with TestClient(create_app(keyed)) as client:
        task_id = _embedded(client, keyed, acme)
        assert client.get("/v1/zoo/map").status_code == 401
        assert client.get("/v1/zoo/map", headers=acme, params={"task": task_id}).status_code == 200
        theirs = client.get("/v1/zoo/map", headers=globex, params={"task": task_id})
        assert theirs.status_code == 404
        assert theirs.json()["type"].endswith("/not-found")
        # The zoo's map is any key's; a task's place on it is tasks:read's.
        assert client.get("/v1/zoo/map", headers=writer).status_code == 200
        refused = client.get("/v1/zoo/map", headers=writer, params={"task": task_id})
        assert refused.status_code == 403


def test_the_matrix_is_the_served_zoos_errors(client: TestClient) -> None:
    answer = client.get("/v1/zoo/matrix")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["zoo_version"] == client.get("/v1/zoo").json()["version"]
    assert [t["name"] for t in body["tasks"]] == [t.name for t in tiny()]
    experts = {e["id"]: e for e in client.get("/v1/experts").json()["items"]}
    assert len(body["experts"]) == len(experts) == 3
    for expert in body["experts"]:
        assert expert["architecture"] == experts[expert["name"]]["architecture"]
        assert expert["source_task"] == experts[expert["name"]]["source_task"]
    errors = np.array(body["errors"], dtype=np.float64)
    assert errors.shape == (8, 3)
    assert ((errors >= 0) & (errors <= 1)).all()
    np.testing.assert_array_equal(errors, np.round(errors, 4))
    # Each task's best expert is the column of its smallest error.
    served = {t["name"]: t for t in client.get("/v1/zoo/tasks").json()["items"]}
    names = [e["name"] for e in body["experts"]]
    for task, row in zip(body["tasks"], errors, strict=True):
        assert row[names.index(served[task["name"]]["best_expert"])] == row.min()


def test_the_distances_are_the_maps_own(client: TestClient) -> None:
    answer = client.get("/v1/zoo/distances")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["zoo_version"] == client.get("/v1/zoo").json()["version"]
    assert [t["name"] for t in body["tasks"]] == [t.name for t in tiny()]
    distances = np.array(body["distances"])
    assert distances.shape == (8, 8)
    np.testing.assert_array_equal(distances, distances.T)
    assert (np.diag(distances) == 0).all()
    assert (distances[~np.eye(8, dtype=bool)] > 0).all()
    # The map is laid out from these distances: its tasks come in the same order.
    map_tasks = client.get("/v1/zoo/map").json()["tasks"]
    assert [t["name"] for t in map_tasks] == [t["name"] for t in body["tasks"]]
