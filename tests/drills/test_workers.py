"""Fault drills: an accepted job is a finished job. Real worker processes killed with -9, a
Redis restarted empty, a database cut off; each drill bounded in time and on loopback only.
Leases are short here (4 s, swept every second) so that recovery fits in a test."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import EmbeddingRow, Job, JobStatus
from app.db.session import engine_for, session_scope
from app.services import leases, queue
from app.services.jobs import JobKind, JobRecorder, LeaseLostError
from app.settings import Settings
from tests.helpers import (
    free_port,
    fresh_database,
    npz_upload,
    run_job,
    service_settings,
    start_worker,
    stop,
    worker,
)

REDIS = "redis://127.0.0.1:6379/9"
FAST = {"job_lease_seconds": 4.0, "sweep_seconds": 1.0, "job_resend_seconds": 3.0}


def _job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _wait(settings: Settings, job_id: str, done: set[str], seconds: float, log: Path) -> Job:
    deadline = time.monotonic() + seconds
    while (job := _job(settings, job_id)).status not in done:
        tail = log.read_text()[-3000:] if log.exists() else ""
        assert time.monotonic() < deadline, f"{job.status} {job.stage}\n{tail}"
        time.sleep(0.05)
    return job


@pytest.fixture(params=["postgresql+redis", "sqlite+sqla"])
def fast(request: pytest.FixtureRequest, tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    database, broker = request.param.split("+")
    with fresh_database(database, tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path).model_copy(update=FAST)
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
            _wait(fast, job_id, {JobStatus.running}, 180, log)
        finally:
            stop(first, signal.SIGKILL)
        killed_at = time.monotonic()
        with worker(fast, log):
            job = _wait(fast, job_id, {JobStatus.succeeded, JobStatus.failed}, 180, log)
        recovered = time.monotonic() - killed_at
    assert job.status == JobStatus.succeeded, job.error
    assert job.attempt == 2
    print(f"recovered {recovered:.1f} s after the kill")
    assert recovered < 120
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
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return server
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


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
                update={**FAST, "broker_url": f"redis://127.0.0.1:{port}/0"}
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
            with worker(settings, log):
                done = [
                    _wait(settings, j["job_id"], {JobStatus.succeeded, JobStatus.failed}, 180, log)
                    for j in jobs
                ]
            assert [j.status for j in done] == [JobStatus.succeeded] * 2, [j.error for j in done]
            assert all(j.resends >= 1 for j in done)
    finally:
        stop(server, signal.SIGKILL)


class _Cut:
    """A TCP relay in front of PostgreSQL that can be cut (every connection dropped, new ones
    refused) and mended: the database becomes unreachable for the API and comes back."""

    def __init__(self, target: int = 5432) -> None:
        self.target = target
        self.port = free_port()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.mend()

    def mend(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        assert self._server is not None
        with contextlib.suppress(OSError):  # wakes the accepting thread (Linux)
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass


def test_a_database_outage_answers_503_and_recovers(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    relay = _Cut()
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


def test_a_worker_cut_off_from_the_database_mid_job_finishes_it(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """The database goes away under a running job for longer than its lease, then returns:
    the worker's writes fail, Celery retries them with backoff, the sweep re-sends the job
    whose lease expired, and the job finishes, once, without restarting anything."""
    relay = _Cut()
    log = tmp_path / "worker.log"
    with fresh_database("postgresql", tmp_path) as url:
        direct = service_settings(tiny_zoo, url, tmp_path).model_copy(update=FAST)
        cut_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        settings = direct.model_copy(update={"database_url": cut_url})
        try:
            with TestClient(create_app(settings)) as client, worker(settings, log):
                accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload(3))})
                assert accepted.status_code == 202, accepted.text
                job_id = accepted.json()["job_id"]
                _wait(direct, job_id, {JobStatus.running}, 180, log)
                relay.cut()
                time.sleep(2 * FAST["job_lease_seconds"])
                relay.mend()
                mended = time.monotonic()
                job = _wait(direct, job_id, {JobStatus.succeeded, JobStatus.failed}, 180, log)
                recovered = time.monotonic() - mended
        finally:
            relay.cut()
            engine_for(cut_url).dispose()
        assert job.status == JobStatus.succeeded, job.error
        print(f"finished on attempt {job.attempt}, {recovered:.1f} s after the database returned")
        assert recovered < 60
        with session_scope(url) as session:
            assert session.scalar(select(func.count()).select_from(EmbeddingRow)) == 1


def test_a_refused_dataset_fails_once_and_is_not_retried(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()
    strict = settings.model_copy(update={"max_classes": 2, **FAST})  # the worker refuses it
    run_job(strict, accepted["job_id"])
    job = _job(strict, accepted["job_id"])
    assert job.status == JobStatus.failed
    assert job.error is not None
    assert job.error["status"] == 422
    time.sleep(strict.job_lease_seconds + 0.5)
    assert leases.sweep(strict) == leases.SweepReport()
    assert _job(strict, accepted["job_id"]).attempt == 1
    assert sent == [accepted["job_id"]]


def test_a_lease_decides_which_attempt_runs_and_writes(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    quick = settings.model_copy(update={**FAST, "job_lease_seconds": 1.0, "job_max_attempts": 2})
    job_id = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()["job_id"]
    assert leases.claim(quick, job_id) == 1
    assert leases.claim(quick, job_id) is None  # a duplicate message is dropped
    first = JobRecorder(quick.resolved_database_url(), job_id, 1, quick.job_lease_seconds)
    first.stage("fisher", 0.5)
    time.sleep(1.2)  # the first attempt stops renewing: its worker died
    report = leases.sweep(quick)
    assert report.expired == [job_id]
    assert sent == [job_id, job_id]  # re-sent
    assert leases.claim(quick, job_id) == 2
    with pytest.raises(LeaseLostError):
        first.succeed({"late": True})  # the lost attempt writes nothing
    fresh = _job(quick, job_id)
    assert (fresh.status, fresh.result, fresh.timings) == (JobStatus.running, None, {})
    time.sleep(1.2)
    assert leases.sweep(quick).failed == [job_id]  # out of attempts
    lost = _job(quick, job_id)
    assert lost.status == JobStatus.failed
    assert lost.error is not None
    assert lost.error["type"].endswith("/job-lost")
    assert JobKind(lost.kind) == JobKind.embed
