"""Webhook deliveries without a worker: the sweep re-sends a lost message once, a try records
its outcome and backs off, a delivery too late to make is given up, and a job that ends any way
owes its delivery. The tries go to a real receiver on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api.main import create_app
from app.db.models import (
    Job,
    JobStatus,
    WebhookDelivery,
)
from app.db.session import session_scope
from app.services import deliveries, jobs, leases, queue
from app.services.jobs import JobKind
from app.settings import Settings
from tests.helpers import (
    later,
    npz_upload,
)
from tests.receiver import Receiver, receiving


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as running:
        yield running


def _delivery(settings: Settings, job_id: str) -> WebhookDelivery | None:
    with session_scope(settings.resolved_database_url()) as session:
        row: WebhookDelivery | None = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        )
        return row


def _ended_job(settings: Settings, url: str, status: JobStatus = JobStatus.succeeded) -> str:
    """A job with ``url`` to call back, ended with no message sent (as if the broker lost it)."""
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.expert, task_id=None, tenant="acme", callback_url=url, expert="x"
        )
        assert jobs.end(session, job.id, status=status, broker_url=None, result={"ok": 1})
        assert not jobs.end(session, job.id, status=status, broker_url=None)  # ends once
        return job.id


def test_the_sweep_resends_lost_messages_and_tries_are_recorded(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = settings.model_copy(
        update={
            "allow_private_urls": True,
            "webhook_resend_seconds": 60.0,
            "webhook_retry_base_seconds": 60.0,
        }
    )
    messages: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: messages.append(d))
    job_id = _ended_job(quick, receiver.plan("/gone", 404))
    lost = _delivery(quick, job_id)
    assert lost is not None
    assert (lost.event, lost.attempts, lost.tenant) == ("job.succeeded", 0, "acme")
    assert leases.sweep(quick).deliveries == []  # not overdue yet
    overdue = later(61)
    assert leases.sweep(quick, now=overdue).deliveries == [lost.id]
    assert leases.sweep(quick, now=overdue).deliveries == []  # marked due then: not again
    assert messages == [lost.id]

    assert deliveries.attempt(quick, lost.id) is None  # 404: given up, recorded
    gone = _delivery(quick, job_id)
    assert gone is not None
    assert (gone.status, gone.attempts, gone.last_status) == ("failed", 1, 404)
    assert gone.last_error == "answered 404"
    tried = receiver.count("/gone")
    assert deliveries.attempt(quick, lost.id) is None  # no second try
    assert receiver.count("/gone") == tried

    busy = _ended_job(quick, receiver.plan("/busy", 429, 429), JobStatus.failed)
    row = _delivery(quick, busy)
    assert row is not None
    assert deliveries.attempt(quick, row.id) == 60.0  # retried after the base delay
    assert deliveries.attempt(quick, row.id) is None  # a duplicate message, before it is due
    retried = _delivery(quick, busy)
    assert retried is not None
    assert (retried.status, retried.attempts, retried.last_status) == ("pending", 1, 429)
    assert deliveries.attempt(quick, row.id, now=later(61)) == 120.0  # then twice as long
    impatient = quick.model_copy(update={"webhook_give_up_seconds": 30.0})
    down = _ended_job(impatient, receiver.plan("/down", 502))
    row = _delivery(impatient, down)
    assert row is not None
    assert deliveries.attempt(impatient, row.id) is None  # the next try would come too late
    given_up = _delivery(impatient, down)
    assert given_up is not None
    assert (given_up.status, given_up.attempts, given_up.last_status) == ("failed", 1, 502)

    stale = _ended_job(quick, receiver.plan("/never"))  # its message lost, for over a day
    assert leases.sweep(quick, now=later(86401)).deliveries == []  # given up, not sent
    dropped = _delivery(quick, stale)
    assert dropped is not None
    assert (dropped.status, dropped.attempts) == ("failed", 0)
    assert (dropped.last_error or "").startswith("given up")
    assert messages == [lost.id]


def test_a_lost_job_and_an_unsent_one_owe_their_delivery(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep giving up on a job, and the API failing a job the broker refused, end the
    job through the same door: its delivery is staged with it."""
    messages: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: messages.append(d))
    quick = settings.model_copy(update={"job_max_attempts": 1})
    with session_scope(quick.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.rank, task_id=None, tenant="local", callback_url="http://h/"
        )
        job_id = job.id
    assert leases.claim(quick, job_id) == 1
    died = later(quick.job_lease_seconds + 1)  # its worker died: the lease is not renewed
    assert leases.sweep(quick, now=died).failed == [job_id]
    row = _delivery(quick, job_id)
    assert row is not None
    assert row.event == "job.failed"
    assert messages == [row.id]

    def refuse(job_id: str, kind: JobKind, broker: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "dispatch", refuse)
    open_ = settings.model_copy(update={"allow_private_urls": True})
    with TestClient(create_app(open_)) as api:
        answer = api.post(
            "/v1/tasks",
            params={"callback_url": "http://127.0.0.1:9/hook"},
            files={"file": ("a.npz", npz_upload(1))},
        )
    assert answer.status_code == 503
    with session_scope(quick.resolved_database_url()) as session:
        unsent: Any = session.execute(
            select(Job.status, WebhookDelivery.event)
            .join(WebhookDelivery, WebhookDelivery.job_id == Job.id)
            .where(Job.kind == JobKind.embed)
        ).one()
    assert tuple(unsent) == ("failed", "job.failed")
    assert messages == [row.id]  # the refusing broker is not asked again: the sweep sends it


def test_a_delivery_to_an_invalid_url_is_given_up_at_once(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL with a space or a control character (one stored before the API refused them)
    can never be sent: the try fails for good rather than being retried for a day."""
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: None)
    quick = settings.model_copy(update={"allow_private_urls": True})
    for url in (receiver.plan("/a b"), receiver.plan("/a\x01b"), receiver.plan("/caf\u00e9")):
        row = _delivery(quick, _ended_job(quick, url))
        assert row is not None
        assert deliveries.attempt(quick, row.id) is None, url  # no next try
        ended = _delivery(quick, row.job_id)
        assert ended is not None
        assert (ended.status, ended.attempts, ended.last_status) == ("failed", 1, None)
        assert "not a valid URL" in (ended.last_error or "")
