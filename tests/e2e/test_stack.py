"""End to end with real worker processes: the production pair (PostgreSQL + Redis) and the
embedded default (SQLite + kombu's SQLAlchemy transport): upload → job → ranking, and zoo
management."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import (
    PATIENCE,
    cnn_weights,
    eventually,
    free_port,
    fresh_database,
    npz_upload,
    service_settings,
    worker,
)

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/9"

Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Stack:
    """Settings for the stack, and the real worker process running on it with its log."""

    settings: Settings
    worker: subprocess.Popen[bytes]
    log: Path

    def until(self, check: Any, what: str) -> Any:
        """``check()``'s first true answer; fails at once if the worker has exited."""
        return eventually(check, what, processes=[self.worker], log=self.log)


@pytest.fixture(params=["postgresql+redis", "sqlite+sqla"])
def stack(request: pytest.FixtureRequest, tiny_zoo: Path, tmp_path: Path) -> Iterator[Stack]:
    database, broker = request.param.split("+")
    with fresh_database(database, tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        if broker == "redis":
            redis.Redis.from_url(REDIS).flushdb()
            settings = settings.model_copy(update={"broker_url": REDIS})
        settings = settings.model_copy(update={"worker_metrics_port": free_port()})
        log = tmp_path / "worker.log"
        with worker(settings, log) as process:
            yield Stack(settings, process, log)


def _worker_metrics(port: int) -> Metrics:
    """The worker's metrics endpoint, parsed: (sample name, labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _succeeded(kind: str) -> frozenset[tuple[str, str]]:
    return frozenset({("kind", kind), ("outcome", "succeeded")})


def _job_lines(worker_log: str, job_id: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines that carry ``job_id``."""
    lines = [json.loads(line) for line in worker_log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("job_id") == job_id]


def _finished(client: TestClient, location: str) -> dict[str, Any] | None:
    job: dict[str, Any] = client.get(location).json()
    return job if job["status"] in ("succeeded", "failed") else None


def test_upload_to_ranking_through_a_real_worker(stack: Stack) -> None:
    with TestClient(create_app(stack.settings)) as client:
        response = client.post(
            "/v1/recommendations",
            params={"wait": PATIENCE, "k": 3},
            files={"file": ("clothes.npz", npz_upload(2))},
        )
        worker_log = stack.log.read_text()
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
        location = queued.headers["location"]
        job = stack.until(lambda: _finished(client, location), "the brute-force ranking")
        assert job["status"] == "succeeded", job
        assert all("error" in item["evidence"] for item in job["result"]["ranking"])

    # The jobs ran in a pool process; the worker's main process serves their metrics (the
    # last job's a moment after its row says it succeeded).
    ranked = ("t2v_worker_job_duration_seconds_count", _succeeded("rank"))

    def with_the_ranking() -> Metrics | None:
        found = _worker_metrics(stack.settings.worker_metrics_port)
        return found if ranked in found else None

    metrics: Metrics = stack.until(with_the_ranking, "the worker's metrics of the ranking")
    for kind in ("embed", "rank"):
        done = _succeeded(kind)
        assert metrics[("t2v_worker_job_duration_seconds_count", done)] == 1, metrics
        assert metrics[("t2v_worker_job_duration_seconds_sum", done)] > 0
        assert metrics[("t2v_worker_jobs_started_total", frozenset({("kind", kind)}))] == 1
    fisher = frozenset({("kind", "embed"), ("stage", "fisher")})
    assert metrics[("t2v_worker_job_stage_duration_seconds_count", fisher)] == 1
    # Its log lines are JSON objects carrying the job's id and the request that created it.
    lines = _job_lines(stack.log.read_text(), body["job_id"])
    assert any(line["message"].endswith(" started") for line in lines), lines
    assert {line["request_id"] for line in lines} == {response.headers["x-request-id"]}


def test_zoo_management_through_a_real_worker(stack: Stack) -> None:
    """A registered expert goes through the evaluate queue, and a new zoo task through the
    embed queue; the API serves the published versions without a restart."""
    with TestClient(create_app(stack.settings)) as client:
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

        def grown() -> bool:
            zoo = client.get("/v1/zoo").json()
            return bool(zoo["experts"] == 4 and zoo["tasks"] == 9)

        stack.until(grown, "a zoo version with the new expert and task")
        expert = client.get("/v1/experts/cnn-4x1-e2e").json()
        assert expert["status"] == "ready", expert
        task = client.get("/v1/zoo/tasks/uploaded-clothes").json()
        assert task["status"] == "ready", task
