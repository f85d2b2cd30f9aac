"""Fault drills: the database cut off under the API (it answers 503 and recovers without a
restart) and under a worker mid-job (its writes are retried, its lease expires, the job finishes
once). A TCP relay in front of PostgreSQL is cut and mended."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.api.main import create_app
from app.db.models import EmbeddingRow, Job, JobStatus, utcnow
from app.db.session import engine_for, session_scope
from app.services import jobs, leases, queue
from app.services.jobs import JobKind
from tests.helpers import (
    FAST_LEASES,
    eventually,
    fresh_database,
    job_reaching,
    job_row,
    npz_upload,
    service_settings,
    worker,
)
from tests.relay import Relay

pytestmark = pytest.mark.slow


def test_a_database_outage_answers_503_and_recovers(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    relay = Relay()
    with fresh_database("postgresql", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        cut_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        settings = settings.model_copy(update={"database_url": cut_url})
        try:
            with TestClient(create_app(settings)) as client:
                assert client.get("/v1/zoo").status_code == 200
                relay.cut()
                for method, path in (
                    ("GET", "/v1/experts"),
                    ("GET", "/v1/jobs/x"),
                    ("GET", "/v1/tasks/x"),
                ):
                    answer = client.request(method, path)
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"] == "5"
                    assert answer.json()["type"].endswith("/database-unavailable")
                    assert str(relay.port) not in answer.text
                upload = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())})
                assert upload.status_code == 503
                ready = client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"] == "unavailable"
                assert str(relay.port) not in ready.text
                relay.mend()
                assert client.get("/v1/experts").status_code == 200  # no restart
                assert (
                    client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).status_code
                    == 202
                )
        finally:
            relay.cut()
            engine_for(cut_url).dispose()


def test_a_database_outage_is_logged_as_it_starts_and_ends_without_tracebacks(
    tiny_zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The API asks for the current zoo version at every poll (every 0.1 s here): while the
    database is cut off that is one warning, and one info line once it answers again; not a
    traceback a poll."""
    relay = Relay()
    serving = "app.services.serving"

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == serving]

    with fresh_database("postgresql", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        cut_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        settings = settings.model_copy(update={"database_url": cut_url, "zoo_poll_seconds": 0.1})
        try:
            with (
                caplog.at_level(logging.INFO, logger=serving),
                TestClient(create_app(settings)) as client,
            ):
                assert client.get("/v1/zoo").status_code == 200
                caplog.clear()
                relay.cut()
                eventually(lambda: lines(), "a line about the outage")
                time.sleep(1.0)  # ten polls more, or however many this machine manages
                assert [r.exc_info for r in lines()] == [None]
                assert [r.levelno for r in lines()] == [logging.WARNING]
                relay.mend()
                eventually(lambda: len(lines()) > 1, "a line about the end of the outage")
                assert [r.levelno for r in lines()] == [logging.WARNING, logging.INFO]
                assert "available again" in lines()[1].getMessage()
        finally:
            relay.cut()
            engine_for(cut_url).dispose()


def test_the_sweep_grants_a_heartbeat_of_grace_after_a_database_outage(
    tiny_zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database was cut off no worker could renew its lease: the first sweep after
    it extends a lease that ran out by a heartbeat instead of taking the job away (a live
    worker renews it at its next beat); a lease nobody renews then expires as before."""
    relay = Relay()
    with fresh_database("postgresql", tmp_path) as url:
        direct = service_settings(tiny_zoo, url, tmp_path).model_copy(
            update={"job_lease_seconds": 30.0, "sweep_seconds": 0.1}
        )
        cut_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        with session_scope(url) as session:
            job_id = jobs.create(session, kind=JobKind.embed, task_id=None, tenant="local").id
        assert leases.claim(direct, job_id) == 1
        reports: list[leases.SweepReport] = []
        sweeper = leases.Sweeper(
            direct.model_copy(update={"database_url": cut_url}), on_report=reports.append
        )

        def failed() -> bool:
            return any("unavailable" in r.getMessage() for r in caplog.records)

        try:
            with caplog.at_level(logging.WARNING, logger=leases.__name__):
                sweeper.start()
                eventually(lambda: reports, "a first sweep")
                relay.cut()
                eventually(failed, "a sweep to find the database unavailable")
                with session_scope(url) as session:  # it ran out: no heartbeat got through
                    ran_out = utcnow() - timedelta(seconds=1)
                    session.execute(update(Job).where(Job.id == job_id).values(lease_until=ran_out))
                reports.clear()
                relay.mend()
                eventually(lambda: reports, "a sweep after the outage")
                assert reports[0].expired == []
                assert reports[0].graced == [job_id]
                row = job_row(direct, job_id)
                assert (row.status, row.attempt) == (JobStatus.running, 1)
                assert row.lease_until is not None
                assert row.lease_until > utcnow()
                # No worker renews it: a heartbeat later it expires, and the job is re-sent.
                eventually(lambda: any(job_id in r.expired for r in reports), "the lease to end")
        finally:
            sweeper.stop()
            relay.cut()
            engine_for(cut_url).dispose()
        assert job_row(direct, job_id).status == JobStatus.queued


def test_a_worker_cut_off_from_the_database_mid_job_finishes_it(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """The database goes away under a running job for longer than its lease, then returns:
    the worker's writes fail, Celery retries them with backoff, the sweep re-sends the job
    whose lease expired, and the job finishes, once, without restarting anything."""
    relay = Relay()
    log = tmp_path / "worker.log"
    with fresh_database("postgresql", tmp_path) as url:
        direct = service_settings(tiny_zoo, url, tmp_path).model_copy(update=FAST_LEASES)
        cut_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        settings = direct.model_copy(update={"database_url": cut_url})
        try:
            with TestClient(create_app(settings)) as client, worker(settings, log) as running:
                accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload(3))})
                assert accepted.status_code == 202, accepted.text
                job_id = accepted.json()["job_id"]
                job_reaching(direct, job_id, {JobStatus.running}, running, log)
                relay.cut()
                time.sleep(2 * FAST_LEASES["job_lease_seconds"])  # longer than a lease: it expires
                relay.mend()
                mended = time.monotonic()
                ended = {JobStatus.succeeded, JobStatus.failed}
                job = job_reaching(direct, job_id, ended, running, log)
                returned = time.monotonic() - mended
        finally:
            relay.cut()
            engine_for(cut_url).dispose()
        assert job.status == JobStatus.succeeded, job.error
        # A figure for the README's table (pytest -s shows it), not a bound.
        print(f"finished on attempt {job.attempt}, {returned:.1f} s after the database returned")
        with session_scope(url) as session:
            assert session.scalar(select(func.count()).select_from(EmbeddingRow)) == 1
