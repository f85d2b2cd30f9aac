"""Webhook deliveries have slots of their own, shared fairly among tenants: one tenant's
receivers that never answer hold up neither another tenant's job nor its deliveries. A real
`task2vec worker` (its default queues), a real receiver on loopback that accepts connections
and never answers, and a real one that does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api.main import create_app
from app.db.models import DeliveryStatus, JobStatus, WebhookDelivery
from app.db.session import session_scope
from app.services import jobs
from app.services.jobs import JobKind
from app.settings import Settings
from tests.helpers import eventually, fresh_database, job_row, npz_upload, service_settings, worker
from tests.receiver import receiving

pytestmark = pytest.mark.slow

#: How long a try at the stalled receiver waits for its answer (its timeout), in seconds. The
#: other tenant's job and delivery must be done while every one of these tries still waits.
STALL = 150.0
#: Tenant A's deliveries: more than the worker's delivery slots (8 threads by default).
STALLED = 12
#: Delivery slots one tenant's deliveries may hold at once (the default).
TENANT_SLOTS = 2


@contextmanager
def stalling() -> Iterator[tuple[str, list[socket.socket]]]:
    """A receiver that accepts every connection and never answers: its URL and the
    connections it accepted (each a try under way)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook", accepted
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def _ended(settings: Settings, tenant: str, url: str) -> str:
    """A job of ``tenant`` that ended with ``url`` to call back; its delivery's message sent."""
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.expert, task_id=None, tenant=tenant, callback_url=url, expert="x"
        )
        broker = settings.resolved_broker_url()
        assert jobs.end(session, job.id, status=JobStatus.succeeded, broker_url=broker)
        return job.id


def _deliveries(settings: Settings, tenant: str) -> list[WebhookDelivery]:
    with session_scope(settings.resolved_database_url()) as session:
        query = select(WebhookDelivery).where(WebhookDelivery.tenant == tenant)
        return list(session.scalars(query))


def test_stalled_receivers_of_one_tenant_hold_up_no_other_tenant(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path).model_copy(
            update={"allow_private_urls": True, "webhook_timeout_seconds": STALL}
        )
        log = tmp_path / "worker.log"
        env = {"T2V_ALLOW_PRIVATE_URLS": "true", "T2V_WEBHOOK_TIMEOUT_SECONDS": str(STALL)}
        with (
            stalling() as (stalled, accepted),
            receiving() as receiver,
            worker(settings, log, **env) as running,
        ):
            for _ in range(STALLED):
                _ended(settings, "acme", stalled)
            eventually(lambda: accepted, "a try at the stalled receiver", log=log)

            _ended(settings, "bravo", receiver.plan("/bravo"))
            with TestClient(create_app(settings)) as client:
                accepted_job = client.post("/v1/tasks", files={"file": ("b.npz", npz_upload(2))})
            assert accepted_job.status_code == 202, accepted_job.text
            job_id = accepted_job.json()["job_id"]

            # Both well within the stalled tries' timeout: a guard, not a speed target.
            patience = STALL - 30
            eventually(
                lambda: receiver.count("/bravo") == 1,
                "the other tenant's delivery",
                processes=[running],
                log=log,
                patience=patience,
            )
            done = {JobStatus.succeeded, JobStatus.failed}
            job = eventually(
                lambda: (row := job_row(settings, job_id)).status in done and row,
                "the other tenant's job",
                processes=[running],
                log=log,
                patience=patience,
            )
            assert job.status == JobStatus.succeeded, job.error
            stuck = _deliveries(settings, "acme")
            assert len(stuck) == STALLED
            # Every try at the stalled receiver is still waiting for its answer ...
            assert all(d.status == DeliveryStatus.pending and d.last_error is None for d in stuck)
            # ... and the tenant never held more than its share of the slots.
            assert 1 <= len(accepted) <= TENANT_SLOTS
