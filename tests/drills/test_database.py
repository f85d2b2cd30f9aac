"""Fault drills: the database cut off under the API (it answers 503 and recovers without a
restart) and under a worker mid-job (its writes are retried, its lease expires, the job finishes
once). A TCP relay in front of PostgreSQL is cut and mended."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import EmbeddingRow, JobStatus
from app.db.session import engine_for, session_scope
from app.services import queue
from tests.helpers import (
    FAST_LEASES,
    free_port,
    fresh_database,
    job_reaching,
    npz_upload,
    service_settings,
    worker,
)

pytestmark = pytest.mark.slow


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
