"""Fault drills: an accepted job is a finished job. Real worker processes killed with -9, a
Redis restarted empty, a database cut off; each drill bounded in time and on loopback only.
Leases are short here (4 s, swept every second) so that recovery fits in a test."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import EmbeddingRow, JobStatus
from app.db.session import session_scope
from app.settings import Settings
from tests.helpers import (
    FAST_LEASES,
    eventually,
    free_port,
    fresh_database,
    job_reaching,
    npz_upload,
    service_settings,
    start_worker,
    stop,
    worker,
)

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/9"


@pytest.fixture(params=["postgresql+redis", "sqlite+sqla"])
def fast(request: pytest.FixtureRequest, tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    database, broker = request.param.split("+")
    with fresh_database(database, tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path).model_copy(update=FAST_LEASES)
        if broker == "redis":
            redis.Redis.from_url(REDIS).flushdb()
            settings = settings.model_copy(update={"broker_url": REDIS})
        yield settings


def test_a_job_whose_worker_is_killed_completes_once(fast: Settings, tmp_path: Path) -> None:
    """kill -9 the worker mid-job, start another: the job completes, once, on its second
    attempt, within a lease and a sweep of the new worker's start."""
    log = tmp_path / "worker.log"
    with TestClient(create_app(fast)) as client:
        first = start_worker(fast, log)
        try:
            accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload(2))})
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            job_reaching(fast, job_id, {JobStatus.running}, first, log)
        finally:
            stop(first, signal.SIGKILL)
        killed_at = time.monotonic()
        with worker(fast, log) as second:
            job = job_reaching(fast, job_id, {JobStatus.succeeded, JobStatus.failed}, second, log)
        # A figure for the README's table (pytest -s shows it), not a bound: the outcome is
        # what is asserted.
        print(f"finished {time.monotonic() - killed_at:.1f} s after the kill")
    assert job.status == JobStatus.succeeded, job.error
    assert job.attempt == 2
    with session_scope(fast.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(EmbeddingRow)) == 1


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port).ping())
        except redis.ConnectionError:
            return False

    eventually(answers, f"redis-server on port {port}", processes=[server])
    return server


def test_jobs_queued_in_a_redis_that_restarts_empty_complete(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """A private Redis holds the queued jobs' messages, then restarts without them; the
    sweep re-sends the jobs from the database and they complete."""
    port = free_port()
    server = _redis_server(port)
    log = tmp_path / "worker.log"
    try:
        with fresh_database("postgresql", tmp_path) as url:
            settings = service_settings(tiny_zoo, url, tmp_path).model_copy(
                update={**FAST_LEASES, "broker_url": f"redis://127.0.0.1:{port}/0"}
            )
            with TestClient(create_app(settings)) as client:
                jobs = [
                    client.post("/v1/tasks", files={"file": (f"{i}.npz", npz_upload(i))}).json()
                    for i in (1, 2)
                ]
            assert redis.Redis(port=port).llen("embed") == 2
            stop(server, signal.SIGKILL)
            server = _redis_server(port)
            assert redis.Redis(port=port).llen("embed") == 0
            with worker(settings, log) as running:
                ended = {JobStatus.succeeded, JobStatus.failed}
                done = [job_reaching(settings, j["job_id"], ended, running, log) for j in jobs]
            assert [j.status for j in done] == [JobStatus.succeeded] * 2, [j.error for j in done]
            assert all(j.resends >= 1 for j in done)
    finally:
        stop(server, signal.SIGKILL)
