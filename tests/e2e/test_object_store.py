"""Processes that share no folder, only an object store: an API process and two workers, each
with a data directory of its own, on PostgreSQL, Redis and SeaweedFS. An upload stored by the
API is embedded by a worker and ranked from the API; an expert uploaded to the API is
evaluated by a worker, whose new zoo version the API and the workers then serve."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.services.layout import DataLayout
from app.settings import Settings
from tests.helpers import (
    PATIENCE,
    cnn_weights,
    eventually,
    free_port,
    fresh_database,
    npz_upload,
    service_settings,
    start_api,
    stop,
    worker,
)
from tests.seaweedfs import S3

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/12"
WORKERS = 2


@dataclass(frozen=True)
class Cluster:
    client: httpx.Client
    api: Settings
    workers: list[Settings]
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def until(self, check: Any, what: str) -> Any:
        """``check()``'s first true answer; fails at once if a process exited."""
        tail = self.logs[-1] if self.logs else None
        return eventually(check, what, processes=self.processes, log=tail)


@pytest.fixture
def cluster(s3: S3, tiny_zoo: Path, tmp_path: Path) -> Iterator[Cluster]:
    redis.Redis.from_url(REDIS).flushdb()
    # Every process asks for the current zoo version on each job: a worker that asked less
    # than the default poll interval (2 s) before a version was published would otherwise
    # rank on the one before, as it may in production.
    storage = {
        "T2V_STORAGE_URL": s3.url(),
        "T2V_S3_ENDPOINT_URL": s3.endpoint,
        "T2V_ZOO_POLL_SECONDS": "0",
    }
    with fresh_database("postgresql", tmp_path) as url, ExitStack() as running:
        # Only the API's directory holds the tiny zoo it publishes on start; each worker's
        # is empty and its own.
        api = service_settings(tiny_zoo, url, tmp_path / "api").model_copy(
            update={"broker_url": REDIS}
        )
        workers = [
            api.model_copy(update={"data_dir": tmp_path / f"worker{i}" / "data"})
            for i in range(WORKERS)
        ]
        port = free_port()
        logs = [tmp_path / "api.log", *(tmp_path / f"worker{i}.log" for i in range(WORKERS))]
        process = start_api(api, port, logs[0], **storage)
        running.callback(stop, process)
        processes = [process]
        for settings, log in zip(workers, logs[1:], strict=True):
            processes.append(running.enter_context(worker(settings, log, **storage)))
        client = running.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=PATIENCE)
        )
        yield Cluster(client, api, workers, processes, logs)


def _finished(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed") else None


def _folders(settings: Settings) -> set[str]:
    """The zoo versions in a process's own data directory."""
    root = DataLayout.of(settings).versions
    return (
        {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()
    )


def test_processes_that_share_only_the_store(cluster: Cluster) -> None:
    client = cluster.client
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["objects"] == "ok"
    first = client.get("/v1/zoo").json()

    answer = client.post(
        "/v1/recommendations",
        params={"wait": PATIENCE, "k": 3},
        files={"file": ("clothes.npz", npz_upload(2))},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["ranking"]) == 3
    task_id = body["task_id"]
    embedded = DataLayout.of(cluster.api).task_embedding(task_id)
    knn = client.get(f"/v1/tasks/{task_id}/recommendations", params={"method": "task2vec-knn"})
    assert knn.status_code == 200, knn.text
    assert embedded.is_file()  # fetched from the store: the worker wrote it in its own folder
    assert any(DataLayout.of(w).task_embedding(task_id).is_file() for w in cluster.workers)

    registered = client.post(
        "/v1/experts",
        data={"name": "cnn-4x1-store", "architecture": "cnn-4x1", "input_size": "28"},
        files={"weights": ("w.pt", cnn_weights())},
    )
    assert registered.status_code == 202, registered.text
    evaluated = cluster.until(
        lambda: _finished(client, registered.json()["job_id"]), "the expert's evaluation"
    )
    assert evaluated["status"] == "succeeded", evaluated
    new = evaluated["result"]["zoo_version"]
    assert new != first["version"]

    def served() -> bool:
        return bool(client.get("/v1/zoo").json()["version"] == new)

    cluster.until(served, "the API to serve the version a worker published")
    assert new in _folders(cluster.api)  # fetched: the API published none but the first

    # Rankings only workers compute, on the new version: whichever worker takes each job
    # loads that version from the store, and the dataset and the new expert's weights, which
    # only the API stored: gone from its folder now, they can come from the store alone.
    for folder in (DataLayout.of(cluster.api).uploads, DataLayout.of(cluster.api).weights):
        shutil.rmtree(folder)
    jobs = []
    for method in ("brute-force", "logme"):
        queued = client.get(f"/v1/tasks/{task_id}/recommendations", params={"method": method})
        assert queued.status_code == 202, queued.text
        jobs.append(queued.json()["job_id"])
    for job_id in jobs:
        done = cluster.until(lambda j=job_id: _finished(client, j), "a worker's ranking")
        assert done["status"] == "succeeded", done
        assert done["result"]["zoo_version"] == new
        assert "cnn-4x1-store" in {item["expert"] for item in done["result"]["ranking"]}
    holding = [w for w in cluster.workers if new in _folders(w)]
    assert holding, "no worker holds the new version"
    for settings in cluster.workers:  # each loaded the first version from the store too
        assert first["version"] in _folders(settings)
