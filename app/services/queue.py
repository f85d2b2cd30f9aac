"""The job queue: the Celery application, and sending a committed job to it.

Messages carry a job id (or a webhook delivery's id) only; the row holds everything else. The
routes come from the one job table (``jobs.JobKind``); ``workers`` registers the task bodies
under those names, and a worker process imports them through ``include``. ``acks_late`` with
one prefetched message per process: a worker that dies mid-job leaves the message to another
worker instead of losing it. Webhook deliveries have a queue of their own, so that a callback
is not held up behind long jobs; ``task2vec worker`` serves it by default.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus
from app.services import jobs
from app.services.jobs import EMBED_QUEUE, JobKind
from app.services.problems import ProblemError, problem

log = logging.getLogger(__name__)

#: Seconds a client is told to wait (Retry-After) when the broker refuses a job.
BROKER_RETRY_AFTER = 5
#: Redis redelivers a message not acknowledged within this many seconds (the default is an
#: hour). The job's lease decides who runs it: a redelivery of a job still running under its
#: lease is dropped, so this only bounds how long a killed worker's message waits, and the
#: sweep re-sends sooner. The embedded broker (kombu's SQLAlchemy transport) never redelivers
#: an unacknowledged message; there the sweep alone recovers the job.
VISIBILITY_TIMEOUT = 600

#: The start of the log line a worker's pool process writes once it has loaded the zoo and
#: the probe and is ready for its first job (what a benchmark waits for).
WARMED_UP = "warmed up"
#: Celery setting (set by ``task2vec worker``): whether the pool processes load the zoo and the
#: probe as they start; not for a worker that serves webhook deliveries only.
WARM_UP_SETTING = "t2v_warm_up"

#: How often a worker looks for messages in the embedded (SQLite) broker's table.
EMBEDDED_POLL_SECONDS = 0.1


class PollEmbeddedBrokerOften(bootsteps.StartStopStep):  # type: ignore[misc]
    """The embedded broker is a table that a worker polls, every second by default: 0.5 s on
    average (up to 1 s) between a POST and the start of its job. The interval is an attribute
    of the worker's transport; kombu's SQLAlchemy transport hands every transport option to
    ``create_engine``, so it cannot be passed as one."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        parent.connection.transport.polling_interval = EMBEDDED_POLL_SECONDS


#: How often (seconds) a worker on the embedded broker deletes its delivered messages and
#: gives their space back to the file system.
EMBEDDED_COMPACT_SECONDS = 60.0


class CompactEmbeddedBroker(bootsteps.StartStopStep):  # type: ignore[misc]
    """kombu's SQLAlchemy transport keeps every message it delivered, as a row marked
    invisible, for good: the broker's file grew with every job and delivery. A delivered
    message is never read again (the transport redelivers an unacknowledged one by writing
    it anew), so the worker deletes those rows now and then and the file shrinks."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        url = parent.app.conf.broker_url
        database = Path(url.removeprefix(EMBEDDED))
        parent.timer.call_repeatedly(EMBEDDED_COMPACT_SECONDS, _compact_quietly, (database,))


def _compact_quietly(database: Path) -> None:
    try:
        compact_embedded(database)
    except sqlite3.Error as exc:  # busy past the timeout: the next round does it
        log.warning("the embedded broker was not compacted: %s", exc)


def compact_embedded(database: Path) -> int:
    """Delete the embedded broker's delivered messages and return the freed pages to the
    file system (the file is in incremental auto-vacuum mode from its creation); the number
    of messages deleted."""
    with closing(sqlite3.connect(database, timeout=5, isolation_level=None)) as connection:
        deleted = connection.execute("DELETE FROM kombu_message WHERE visible = 0").rowcount
        # As a script: executed as a statement, the pragma frees one page a step, and the
        # module steps it once.
        connection.executescript("PRAGMA incremental_vacuum;")
    return int(deleted)


def _incremental_vacuum(database: Path) -> None:
    """Put the broker's file in incremental auto-vacuum mode: set before its tables exist,
    or by one VACUUM for a file made before (another process holding it past the timeout
    leaves that to the next start)."""
    with closing(sqlite3.connect(database, timeout=5, isolation_level=None)) as connection:
        (mode,) = connection.execute("PRAGMA auto_vacuum").fetchone()
        if mode == INCREMENTAL:
            return
        connection.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")
        try:
            connection.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            log.warning("the embedded broker's file stays as it is for now: %s", exc)


#: SQLite's ``auto_vacuum`` mode in which ``PRAGMA incremental_vacuum`` truncates the file.
INCREMENTAL = 2

#: The module that registers the task bodies, imported by every worker process.
TASK_MODULE = "workers.tasks"
#: The Celery task that makes one try at a webhook delivery, and its queue.
DELIVERY_TASK = "workers.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"


#: The embedded broker: a SQLite file, through kombu's SQLAlchemy transport.
EMBEDDED = "sqla+sqlite:///"


def _declare_embedded_queues(celery: Celery, database: Path) -> None:
    """Create the embedded broker's tables and a row for every queue, whichever process comes
    first, before any message goes through it.

    kombu's SQLAlchemy transport creates them on first use with a check and an insert that
    are atomic within one process only: an API and a worker that started together both
    inserted a queue's row, and the one that lost failed on its unique name (a worker stops:
    "Unrecoverable error"). Under an exclusive lock on a file beside the database one process
    at a time declares them, and every later use finds them."""
    queues = sorted({kind.queue for kind in JobKind} | {WEBHOOK_QUEUE})
    with database.with_name(database.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _incremental_vacuum(database)
        with celery.connection_for_write() as connection:
            channel = connection.default_channel
            for name in queues:
                channel.queue_declare(queue=name)


@cache
def celery_for(broker: str) -> Celery:
    """The Celery app for a broker URL (one per URL and process)."""
    if broker.startswith(EMBEDDED):
        Path(broker.removeprefix(EMBEDDED)).parent.mkdir(parents=True, exist_ok=True)
    celery = Celery("task2vec", broker=broker, include=[TASK_MODULE])
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=EMBED_QUEUE,
        task_ignore_result=True,  # results go to the job rows
        broker_connection_retry_on_startup=True,
        # A publisher facing a dead broker gives up within seconds; the API then fails the
        # job and answers 503 instead of hanging the request.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        broker_connection_timeout=3,
        task_routes={
            **{kind.task: {"queue": kind.queue} for kind in JobKind},
            DELIVERY_TASK: {"queue": WEBHOOK_QUEUE},
        },
        # Task events (sent, received, started, succeeded, ...) for monitors such as Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    if broker.startswith(("redis://", "rediss://", "sentinel://")):
        celery.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT}
    if broker.startswith("sqla+"):
        celery.steps["consumer"].add(PollEmbeddedBrokerOften)
    if broker.startswith(EMBEDDED):
        celery.steps["consumer"].add(CompactEmbeddedBroker)
        _declare_embedded_queues(celery, Path(broker.removeprefix(EMBEDDED)))
    return celery


def dispatch(job_id: str, kind: JobKind, broker_url: str) -> None:
    """Send the Celery message for a committed job row."""
    celery_for(broker_url).send_task(kind.task, args=[job_id])


def send(*, session: Session, job: Job, broker_url: str) -> None:
    """Commit the session with its job, then send the job's message.

    The commit comes first so that a worker never receives a job it cannot find. If the
    broker refuses, the job fails (it would otherwise wait forever; the failure is committed
    too) and a 503 problem is raised.
    """
    job.sent_at = datetime.now(UTC)
    session.commit()
    try:
        dispatch(job.id, JobKind(job.kind), broker_url)
    except Exception as exc:
        # The broker's error names its host and port: the log gets it, the client does not.
        log.warning("job %s not sent: the broker refused: %s", job.id, exc)
        detail = "the job queue is unavailable; try again later"
        error = ProblemError(503, "broker-unavailable", "The job queue is unavailable", detail)
        jobs.end(  # its delivery, if any, waits for the sweep: this broker just refused
            session,
            job.id,
            status=JobStatus.failed,
            broker_url=None,
            error=problem(503, "broker-unavailable", "Job queue unavailable", detail),
        )
        error.headers["Retry-After"] = str(BROKER_RETRY_AFTER)
        raise error from None


def send_delivery(delivery_id: str, broker_url: str) -> None:
    """Send the message of a committed webhook delivery. A broker that refuses is logged, not
    raised: the delivery is committed, and the sweep sends it once it is overdue."""
    try:
        celery_for(broker_url).send_task(DELIVERY_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE)
    except Exception:
        log.warning("webhook delivery %s not sent; the sweep sends it later", delivery_id)


def check(broker_url: str) -> None:
    """Raise unless the broker answers within seconds (for readiness checks)."""
    with celery_for(broker_url).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
