"""A worker's tries at webhook deliveries are counted and timed by outcome, and a try that
failed is a warning in the log: real tries, by the worker's task, to a real receiver on
loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import Retry
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.db.models import JobStatus, WebhookDelivery
from app.db.session import session_scope
from app.services import jobs, queue
from app.services.jobs import JobKind
from app.settings import Settings
from tests.helpers import fresh_database, service_settings
from tests.receiver import Receiver, receiving
from workers import tasks


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as running:
        yield running


@pytest.fixture
def quick(tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    with fresh_database("sqlite", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        yield settings.model_copy(update={"allow_private_urls": True})


def _delivery_of_a_job(settings: Settings, url: str) -> str:
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(
            session, kind=JobKind.expert, task_id=None, tenant="acme", callback_url=url, expert="x"
        )
        assert jobs.end(session, job.id, status=JobStatus.succeeded, broker_url=None)
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id))
        assert row is not None
        return row.id


def _tries(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("t2v_worker_webhook_tries_total", labels) or 0.0


def _timed(outcome: str) -> float:
    labels = {"outcome": outcome}
    count = "t2v_worker_webhook_try_duration_seconds_count"
    return REGISTRY.get_sample_value(count, labels) or 0.0


def test_tries_are_counted_by_outcome_and_a_failed_one_is_a_warning(
    quick: Settings,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tasks, "get_settings", lambda: quick)
    monkeypatch.setattr(queue, "send_delivery", lambda delivery, broker: None)
    before = {o: (_tries(o), _timed(o)) for o in ("delivered", "retried", "failed", "dropped")}

    flaky = _delivery_of_a_job(quick, receiver.plan("/flaky", 503))
    with caplog.at_level(logging.INFO), pytest.raises(Retry):
        tasks.deliver_webhook(flaky)
    (line,) = [r for r in caplog.records if flaky in r.getMessage()]
    assert line.levelno == logging.WARNING, line.getMessage()
    assert _tries("retried") == before["retried"][0] + 1
    assert _timed("retried") == before["retried"][1] + 1

    tasks.deliver_webhook(flaky)  # its next try is not due yet: the message is dropped
    assert _tries("dropped") == before["dropped"][0] + 1

    gone = _delivery_of_a_job(quick, receiver.plan("/gone", 404))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        tasks.deliver_webhook(gone)
    (line,) = [r for r in caplog.records if gone in r.getMessage()]
    assert line.levelno == logging.WARNING, line.getMessage()
    assert _tries("failed") == before["failed"][0] + 1

    fine = _delivery_of_a_job(quick, receiver.plan("/fine"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        tasks.deliver_webhook(fine)
    (line,) = [r for r in caplog.records if fine in r.getMessage()]
    assert line.levelno == logging.INFO
    assert _tries("delivered") == before["delivered"][0] + 1
    assert _timed("delivered") == before["delivered"][1] + 1
