"""The job queue (``app.services.queue``) without a worker: each kind of job is routed to its
queue (GPU workers take ``embed``, the rest ``evaluate``, webhook deliveries ``webhooks``) by
an app that acknowledges late with one prefetched message, so that a worker dying mid-job
leaves its message to another; a message carries the job's id alone; ``send`` commits the job
before its message goes (a worker never receives a job it cannot find), and when the broker
refuses, the job fails with a 503 problem instead of waiting forever; ``check`` tells a live
broker from a dead one. Messages go to a real embedded (SQLite) broker and are read back;
refusals come from a closed port on loopback; ``check`` asks the machine's real Redis."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
from pathlib import Path
from queue import Empty
from threading import Barrier
from typing import Any

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus, WebhookDelivery
from app.db.session import session_scope
from app.services import jobs, queue
from app.services.jobs import JobKind
from app.services.problems import ProblemError
from app.settings import Settings
from tests.helpers import PATIENCE, free_port, job_row

LOCAL_REDIS = "redis://127.0.0.1:6379/0"

#: The queue of each kind of job, as the workers are started to serve them (``--queues``).
QUEUES = {
    JobKind.embed: "embed",
    JobKind.rank: "evaluate",
    JobKind.expert: "evaluate",
    JobKind.zoo_task: "embed",
    JobKind.zoo_import: "evaluate",
}


def _embedded(tmp_path: Path) -> str:
    return f"sqla+sqlite:///{tmp_path / 'broker' / 'broker.db'}"


def _closed() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def _drain(broker: str, name: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """Every message waiting on queue ``name``: (task, args, kwargs)."""
    found: list[tuple[str, list[Any], dict[str, Any]]] = []
    with queue.celery_for(broker).connection_for_read() as connection:
        waiting = connection.SimpleQueue(name)
        try:
            while True:
                try:
                    message = waiting.get_nowait()
                except Empty:
                    return found
                args, kwargs, _ = message.payload
                found.append((message.headers["task"], args, kwargs))
                message.ack()
        finally:
            waiting.close()


def test_each_kind_of_job_is_routed_to_its_queue(tmp_path: Path) -> None:
    router = queue.celery_for(_embedded(tmp_path)).amqp.router
    assert set(QUEUES) == set(JobKind)
    for kind, name in QUEUES.items():
        assert router.route({}, kind.task)["queue"].name == name, kind
    assert router.route({}, queue.DELIVERY_TASK)["queue"].name == "webhooks"
    assert router.route({}, "workers.unknown")["queue"].name == "embed"  # the default


def test_a_message_is_acknowledged_late_one_at_a_time(tmp_path: Path) -> None:
    conf = queue.celery_for(_embedded(tmp_path)).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True  # results go to the job rows
    assert list(conf.include) == ["workers.tasks"]


def test_one_app_per_broker_with_that_brokers_options(tmp_path: Path) -> None:
    embedded = _embedded(tmp_path)
    app = queue.celery_for(embedded)
    assert queue.celery_for(embedded) is app
    assert (tmp_path / "broker").is_dir()  # the embedded broker's folder is made
    assert queue.PollEmbeddedBrokerOften in app.steps["consumer"]
    assert not app.conf.broker_transport_options

    redis = queue.celery_for(LOCAL_REDIS)
    assert redis is not app
    assert redis.conf.broker_transport_options == {"visibility_timeout": 600}
    assert queue.PollEmbeddedBrokerOften not in redis.steps["consumer"]


def _queue_rows(broker: str) -> list[str]:
    database = broker.removeprefix(queue.EMBEDDED)
    with sqlite3.connect(database) as connection:
        return sorted(name for (name,) in connection.execute("SELECT name FROM kombu_queue"))


def test_the_embedded_brokers_queues_exist_before_any_message(tmp_path: Path) -> None:
    """A process that sends a message or consumes one finds its queue's row: nothing is
    inserted on first use, where two processes would race to insert one name."""
    broker = _embedded(tmp_path)
    queue.celery_for(broker)
    assert _queue_rows(broker) == ["embed", "evaluate", "webhooks"]
    queue.celery_for.cache_clear()  # another process, as it starts
    queue.celery_for(broker)
    assert _queue_rows(broker) == ["embed", "evaluate", "webhooks"]


def _send_at_once(broker: str, ready: Barrier) -> None:
    from app.services import queue  # a fresh interpreter: its own app and engine

    app = queue.celery_for(broker)
    ready.wait()
    app.send_task("workers.embed", args=["job"], queue="embed")


@pytest.mark.slow
def test_processes_starting_together_on_a_new_embedded_broker_all_send(tmp_path: Path) -> None:
    """Six processes open a new embedded broker and send at the same moment, three times
    over. Declaring a queue on first use, one in two such rounds lost a process to the
    queue's unique name."""
    spawn = multiprocessing.get_context("spawn")
    for round_ in range(3):
        broker = _embedded(tmp_path / str(round_))
        ready = spawn.Barrier(6)
        senders = [spawn.Process(target=_send_at_once, args=(broker, ready)) for _ in range(6)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(PATIENCE)
        assert [s.exitcode for s in senders] == [0] * 6
        assert len(_drain(broker, "embed")) == 6


def test_a_message_carries_the_job_id_alone_to_its_queue(tmp_path: Path) -> None:
    broker = _embedded(tmp_path)
    for kind in JobKind:
        queue.dispatch(f"job-{kind.name}", kind, broker)
    queue.send_delivery("delivery-1", broker)
    assert _drain(broker, "embed") == [
        ("workers.embed", ["job-embed"], {}),
        ("workers.add_zoo_task", ["job-zoo_task"], {}),
    ]
    assert _drain(broker, "evaluate") == [
        ("workers.rank", ["job-rank"], {}),
        ("workers.evaluate_expert", ["job-expert"], {}),
        ("workers.import_zoo", ["job-zoo_import"], {}),
    ]
    assert _drain(broker, "webhooks") == [("workers.deliver_webhook", ["delivery-1"], {})]


def _new_job(session: Session, callback_url: str | None = None) -> Job:
    return jobs.create(
        session,
        kind=JobKind.expert,
        task_id=None,
        tenant="acme",
        callback_url=callback_url,
        expert="cnn-a",
    )


def test_send_commits_the_job_then_dispatches_its_id(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, JobKind, str, str, bool]] = []

    def dispatch(job_id: str, kind: JobKind, broker: str) -> None:
        row = job_row(settings, job_id)  # another transaction: committed already
        seen.append((job_id, kind, broker, row.status, row.sent_at is not None))

    monkeypatch.setattr(queue, "dispatch", dispatch)
    broker = settings.resolved_broker_url()
    with session_scope(settings.resolved_database_url()) as session:
        job = _new_job(session)
        queue.send(session=session, job=job, broker_url=broker)
        job_id = job.id
    assert seen == [(job_id, JobKind.expert, broker, JobStatus.queued, True)]
    assert job_row(settings, job_id).status == JobStatus.queued


def test_a_job_sent_to_the_embedded_broker_arrives(settings: Settings) -> None:
    broker = settings.resolved_broker_url()
    with session_scope(settings.resolved_database_url()) as session:
        job = _new_job(session)
        queue.send(session=session, job=job, broker_url=broker)
    assert _drain(broker, "evaluate") == [("workers.evaluate_expert", [job.id], {})]


def test_a_broker_that_refuses_fails_the_job_with_a_503(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job would otherwise wait forever; its webhook delivery is staged, but not sent to
    the broker that just refused (the sweep sends it)."""
    deliveries: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: deliveries.append(d))
    with session_scope(settings.resolved_database_url()) as session:
        job = _new_job(session, callback_url="https://example.com/hook")
        with pytest.raises(ProblemError) as refused:
            queue.send(session=session, job=job, broker_url=_closed())
        job_id = job.id
    assert (refused.value.status, refused.value.kind) == (503, "broker-unavailable")
    assert refused.value.headers["Retry-After"] == str(queue.BROKER_RETRY_AFTER) == "5"
    row = job_row(settings, job_id)
    assert row.status == JobStatus.failed
    assert row.error is not None
    assert (row.error["status"], row.error["type"].rsplit("/", 1)[-1]) == (
        503,
        "broker-unavailable",
    )
    assert row.sent_at is not None
    assert row.finished_at is not None
    assert deliveries == []
    with session_scope(settings.resolved_database_url()) as session:
        staged = session.query(WebhookDelivery).filter_by(job_id=job_id).one()
        assert (staged.event, staged.url) == ("job.failed", "https://example.com/hook")


def test_a_refused_delivery_message_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=queue.__name__):
        queue.send_delivery("d-123", _closed())
    assert any("d-123" in r.getMessage() for r in caplog.records)


def test_check_tells_a_live_broker_from_a_dead_one(tmp_path: Path) -> None:
    queue.check(LOCAL_REDIS)
    queue.check(_embedded(tmp_path))
    with pytest.raises(OperationalError):
        queue.check(_closed())


#: The embedded broker gives back the space of the messages it delivered: a real broker file,
#: filled and drained through the transport, shrinks once a worker's compaction has run.
PAYLOAD = "x" * 8192
MESSAGES = 600


def _fill_and_drain(broker: str) -> None:
    celery = queue.celery_for(broker)
    for i in range(MESSAGES):
        celery.send_task(queue.DELIVERY_TASK, args=[f"{i}", PAYLOAD], queue=queue.WEBHOOK_QUEUE)
    drained = 0
    with celery.connection_for_read() as connection:
        waiting = connection.SimpleQueue(queue.WEBHOOK_QUEUE)
        try:
            while True:
                try:
                    message = waiting.get_nowait()
                except Empty:
                    break
                message.ack()
                drained += 1
        finally:
            waiting.close()
    assert drained == MESSAGES


def test_the_embedded_broker_file_shrinks_once_its_messages_are_consumed(
    tmp_path: Path,
) -> None:
    database = tmp_path / "broker.db"
    broker = queue.EMBEDDED + str(database)
    _fill_and_drain(broker)
    full = database.stat().st_size
    assert full > MESSAGES * len(PAYLOAD)  # every delivered message is still a row
    queue.compact_embedded(database)
    assert database.stat().st_size < full / 4

    _fill_and_drain(broker)  # the space is used again, and given back again
    queue.compact_embedded(database)
    assert database.stat().st_size < full / 4


def test_a_worker_on_the_embedded_broker_compacts_it_periodically(tmp_path: Path) -> None:
    steps = queue.celery_for(queue.EMBEDDED + str(tmp_path / "broker.db")).steps["consumer"]
    assert queue.CompactEmbeddedBroker in steps
    assert (
        queue.CompactEmbeddedBroker
        not in queue.celery_for("redis://127.0.0.1:1/0").steps["consumer"]
    )
