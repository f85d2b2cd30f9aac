"""End to end with real worker processes: the production pair (PostgreSQL + Redis) and the
embedded default (SQLite + kombu's SQLAlchemy transport): upload → job → ranking, and zoo
management."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import cnn_weights, fresh_database, npz_upload, service_settings, worker

REDIS = "redis://127.0.0.1:6379/9"


@pytest.fixture(params=["postgresql+redis", "sqlite+sqla"])
def stack(request: pytest.FixtureRequest, tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    """Settings for the stack, and a real worker process running on it."""
    database, broker = request.param.split("+")
    with fresh_database(database, tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        if broker == "redis":
            redis.Redis.from_url(REDIS).flushdb()
            settings = settings.model_copy(update={"broker_url": REDIS})
        yield from _with_worker(settings, tmp_path)


def _with_worker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    with worker(settings, tmp_path / "worker.log"):
        yield settings


def test_upload_to_ranking_through_a_real_worker(stack: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(stack)) as client:
        response = client.post(
            "/v1/recommendations",
            params={"wait": 240, "k": 3},
            files={"file": ("clothes.npz", npz_upload(2))},
        )
        worker_log = (tmp_path / "worker.log").read_text()
        assert response.status_code == 200, f"{response.text}\n{worker_log[-3000:]}"
        body = response.json()
        assert len(body["ranking"]) == 3
        job = client.get(f"/v1/jobs/{body['job_id']}").json()
        assert job["status"] == "succeeded"
        assert job["started_at"] is not None

        queued = client.get(
            f"/v1/tasks/{body['task_id']}/recommendations", params={"method": "brute-force"}
        )
        assert queued.status_code == 202
        deadline = time.monotonic() + 120
        while (job := client.get(queued.headers["location"]).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        assert all("error" in item["evidence"] for item in job["result"]["ranking"])


def test_zoo_management_through_a_real_worker(stack: Settings, tmp_path: Path) -> None:
    """A registered expert goes through the evaluate queue, and a new zoo task through the
    embed queue; the API serves the published versions without a restart."""
    with TestClient(create_app(stack)) as client:
        registered = client.post(
            "/v1/experts",
            data={"name": "cnn-4x1-e2e", "architecture": "cnn-4x1", "input_size": "28"},
            files={"weights": ("w.pt", cnn_weights())},
        )
        assert registered.status_code == 202, registered.text
        added = client.post(
            "/v1/zoo/tasks",
            data={"name": "uploaded-clothes"},
            files={"file": ("clothes.npz", npz_upload(2))},
        )
        assert added.status_code == 202, added.text
        deadline = time.monotonic() + 240
        while (zoo := client.get("/v1/zoo").json())["experts"] != 4 or zoo["tasks"] != 9:
            worker_log = (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"{zoo}\n{worker_log}"
            time.sleep(0.2)
        expert = client.get("/v1/experts/cnn-4x1-e2e").json()
        assert expert["status"] == "ready", expert
        task = client.get("/v1/zoo/tasks/uploaded-clothes").json()
        assert task["status"] == "ready", task
