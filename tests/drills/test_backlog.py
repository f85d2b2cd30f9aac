"""Fault drills: the sweep tells a job that waits behind a backlog from one whose message was
lost. Jobs queued with no worker wait in the broker (a private redis-server, or the embedded
broker): they are not re-sent however long they wait. A real worker takes one message and is
killed with -9 before it can claim the job: that message is lost, and the job is re-sent."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.db.models import JobStatus
from app.services import leases
from tests.drills.test_workers import _redis_server
from tests.helpers import (
    FAST_LEASES,
    eventually,
    free_port,
    fresh_database,
    job_row,
    later,
    npz_upload,
    service_settings,
    start_worker,
    stop,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "embedded":
        yield f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        return
    port = free_port()
    server = _redis_server(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(server, signal.SIGKILL)


def test_jobs_behind_a_backlog_wait_and_a_lost_message_is_resent(
    tiny_zoo: Path, tmp_path: Path, broker: str
) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path).model_copy(
            # The worker's own sweeps find nothing overdue while it lives: the test's do.
            update={**FAST_LEASES, "broker_url": broker, "job_resend_seconds": 600.0}
        )
        with TestClient(create_app(settings)) as client:
            ids = [
                client.post("/v1/tasks", files={"file": (f"{i}.npz", npz_upload(i))}).json()[
                    "job_id"
                ]
                for i in (1, 2, 3)
            ]
        long_after = 100 * settings.job_resend_seconds
        report = leases.sweep(settings, now=later(long_after))
        assert report.resent == []  # their messages wait in the broker: none was lost
        assert [job_row(settings, j).resends for j in ids] == [0, 0, 0]
        assert sorted(report.waiting) == sorted(ids)

        # A worker takes the first message, and dies before its claim can be written.
        log = tmp_path / "worker.log"
        lock = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # writes wait (the claim is one)
        try:
            taken = start_worker(settings, log)
            try:
                eventually(
                    lambda: "received" in log.read_text(errors="replace"),
                    "the worker to receive a job's message",
                    processes=[taken],
                    log=log,
                    pause=0.05,
                )
            finally:
                stop(taken, signal.SIGKILL)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert job_row(settings, ids[0]).status == JobStatus.queued  # never claimed

        report = leases.sweep(settings, now=later(long_after))
        assert report.resent == [ids[0]]
        assert sorted(report.waiting) == sorted(ids[1:])
        assert [job_row(settings, j).resends for j in ids] == [1, 0, 0]
