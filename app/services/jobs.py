"""Jobs and their life cycle: queued → running → succeeded | failed.

The job row is the record; the Celery message carries its id alone. A job is committed before
its message is sent (``queue.send``), so a worker never receives a job it cannot find. Workers
move the row along and write progress, timings, results and errors (problem documents) back.

A job ends in one place, ``end``, whoever ends it (its worker, the sweep giving up on it, the
API when the broker refused it): the terminal status and the webhook delivery it owes (when
it has a ``callback_url``) are committed together, then the delivery's message is sent.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus, WebhookDelivery, utcnow
from app.db.session import newest_page, session_scope, updated
from app.observability import context
from app.services.problems import not_found
from app.task2vec.checkpoints import checking

log = logging.getLogger(__name__)

#: Celery queues: GPU workers take ``embed``; ``evaluate`` runs the experts over the zoo.
EMBED_QUEUE = "embed"
EVALUATE_QUEUE = "evaluate"


class JobKind(StrEnum):
    """Each kind of job (as stored in ``jobs.kind`` and shown by the API)."""

    embed = "embed"
    rank = "rank"
    expert = "expert"
    zoo_task = "zoo-task"
    zoo_import = "zoo-import"

    @property
    def task(self) -> str:
        """The Celery task that runs it."""
        return ROUTES[self][0]

    @property
    def queue(self) -> str:
        return ROUTES[self][1]


#: The one table: job kind → (Celery task name, queue). The queue's routes, the workers'
#: task names and the dispatch of a job are all read from here.
ROUTES: dict[JobKind, tuple[str, str]] = {
    JobKind.embed: ("workers.embed", EMBED_QUEUE),
    JobKind.rank: ("workers.rank", EVALUATE_QUEUE),
    JobKind.expert: ("workers.evaluate_expert", EVALUATE_QUEUE),
    JobKind.zoo_task: ("workers.add_zoo_task", EMBED_QUEUE),
    JobKind.zoo_import: ("workers.import_zoo", EVALUATE_QUEUE),
}


#: A job in either of these has not ended.
ACTIVE = (JobStatus.queued, JobStatus.running)


def create(
    session: Session,
    *,
    kind: JobKind,
    task_id: str | None,
    tenant: str,
    callback_url: str | None = None,
    **params: Any,
) -> Job:
    """A queued job, stamped with the request being answered (if any: a job a worker creates
    gets the request of the job it runs), so that re-sends and its worker's logs carry it.
    ``callback_url`` (checked by the caller: ``deliveries.check_url``) is called when it ends."""
    job = Job(
        kind=kind,
        task_id=task_id,
        tenant=tenant,
        params=params,
        status=JobStatus.queued,
        request_id=context.request_id.get(),
        callback_url=callback_url,
    )
    session.add(job)
    session.flush()
    return job


def follow(session: Session, *, job_id: str, callback_url: str) -> None:
    """A request answered with a job already under way (the same upload again) is called back
    too, unless the job has a callback URL already: one per job, the first. The conditional
    UPDATE cannot slip in after the job ended (``end`` reads the URL in its own UPDATE's
    transaction)."""
    updated(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE), Job.callback_url.is_(None))
        .values(callback_url=callback_url),
    )


def end(
    session: Session,
    job_id: str,
    *guard: ColumnElement[bool],
    status: JobStatus,
    broker_url: str | None,
    **values: Any,
) -> bool:
    """End a job that has not ended and for which ``guard`` holds (the attempt that holds it,
    an expired lease): the one place a terminal status is written. Its webhook delivery, if it
    has a callback URL, is staged in the same transaction, which this commits; then the
    delivery's message is sent (a broker that refuses, or no ``broker_url``, leaves it to the
    sweep: ``deliveries.resend_lost``). False, with nothing written, when the job ended
    already or the guard does not hold."""
    if status not in (JobStatus.succeeded, JobStatus.failed):
        raise ValueError(f"a job does not end {status}")
    values.setdefault("finished_at", utcnow())
    done = updated(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE), *guard)
        .values(status=status, lease_until=None, **values),
    )
    if done == 0:
        return False
    found = session.execute(select(Job.callback_url, Job.tenant).where(Job.id == job_id)).one()
    delivery = None
    if found.callback_url:
        delivery = WebhookDelivery(
            job_id=job_id, tenant=found.tenant, url=found.callback_url, event=f"job.{status}"
        )
        session.add(delivery)
        session.flush()
    session.commit()
    if delivery is not None and broker_url:
        from app.services import queue  # it imports this module (the job table)

        queue.send_delivery(delivery.id, broker_url)
    return True


def view(job: Job) -> dict[str, Any]:
    """A job as ``GET /v1/jobs/{id}`` answers it, and as its webhook delivers it."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "attempts": job.attempt,
        "progress": {"stage": job.stage, "fraction": job.progress},
        "task_id": job.task_id,
        "params": job.params,
        "timings": job.timings,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": job.error,
        "result": job.result,
        "links": _links(job),
    }


def _links(job: Job) -> dict[str, str]:
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.task_id:
        links["task"] = f"/v1/tasks/{job.task_id}"
        if job.kind == JobKind.embed:
            links["neighbors"] = f"/v1/tasks/{job.task_id}/neighbors"
            links["recommendations"] = f"/v1/tasks/{job.task_id}/recommendations"
    if job.kind == JobKind.expert:
        links["expert"] = f"/v1/experts/{job.params['expert']}"
    if job.kind == JobKind.zoo_task:
        links["zoo_task"] = f"/v1/zoo/tasks/{job.params['zoo_task']}"
    if job.kind in (JobKind.expert, JobKind.zoo_task):
        links["zoo"] = "/v1/zoo"
    return links


def get(session: Session, *, job_id: str, tenant: str) -> Job:
    """The tenant's job; another tenant's id is not found, as if it did not exist."""
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


def page(session: Session, *, tenant: str, limit: int, offset: int) -> tuple[int, list[Job]]:
    """One page of the tenant's jobs, newest first, and how many the tenant has."""
    return newest_page(session, Job, tenant=tenant, limit=limit, offset=offset)


@dataclass(frozen=True)
class JobState:
    """Where a job stands, detached from its row (for waiting on it outside a session)."""

    id: str
    status: str
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    timings: dict[str, Any]
    queue_wait_s: float | None
    run_s: float | None

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.succeeded, JobStatus.failed)


def state(session: Session, *, job_id: str, tenant: str) -> JobState:
    job = get(session, job_id=job_id, tenant=tenant)
    started, finished = job.started_at, job.finished_at
    return JobState(
        id=job.id,
        status=job.status,
        error=job.error,
        result=job.result,
        timings=dict(job.timings),
        queue_wait_s=None if started is None else (started - job.created_at).total_seconds(),
        run_s=None if started is None or finished is None else (finished - started).total_seconds(),
    )


class LeaseLostError(Exception):
    """The job's lease expired and another attempt took it over: stop, write nothing."""


def lease_end(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def heartbeat_seconds(lease_seconds: float) -> float:
    """How often a working attempt renews its lease: every third of the lease."""
    return lease_seconds / 3


class JobRecorder:
    """What a worker's attempt at a job writes to the job row: progress, timings, the result
    or the error, each write in its own short transaction (progress must be visible while the
    job's own work is still uncommitted) that also renews the lease.

    Every write is guarded by the attempt: when another attempt has taken the job over (this
    one's lease expired), the write changes nothing and raises ``LeaseLostError``."""

    def __init__(
        self,
        database_url: str,
        job_id: str,
        attempt: int,
        lease_seconds: float,
        min_interval: float = 0.5,
        broker_url: str | None = None,
    ) -> None:
        self.url, self.job_id, self.attempt = database_url, job_id, attempt
        self.lease_seconds, self.min_interval = lease_seconds, min_interval
        self.broker_url = broker_url  # where the job's webhook delivery is sent, if any
        self.lost = threading.Event()
        self._last = 0.0
        self._stage_started = time.perf_counter()
        self._stage: str | None = None
        self.timings: dict[str, float] = {}

    def _lost(self) -> LeaseLostError:
        self.lost.set()
        return LeaseLostError(f"job {self.job_id}: attempt {self.attempt} lost its lease")

    def hold(self, session: Session, **values: Any) -> None:
        """In the caller's transaction: renew the lease (and set ``values``), or raise
        ``LeaseLostError``, so that a result is written only by the attempt that holds the job."""
        if self.lost.is_set():
            raise self._lost()
        values.setdefault("lease_until", lease_end(self.lease_seconds))
        done = updated(
            session,
            update(Job)
            .where(
                Job.id == self.job_id,
                Job.attempt == self.attempt,
                Job.status == JobStatus.running,
            )
            .values(**values),
        )
        if done == 0:
            raise self._lost()

    def _update(self, **values: Any) -> None:
        with session_scope(self.url) as session:
            self.hold(session, **values)

    def check(self) -> None:
        """Raise ``LeaseLostError`` once the heartbeat found the lease lost (no database
        call: cheap enough for every batch of a computation)."""
        if self.lost.is_set():
            raise self._lost()

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease every third of its length while the block runs (also through
        stretches that report no progress). Once a renewal finds the lease lost, the block's
        computations stop at their next step (``checkpoints``): an attempt that was taken
        over does not hold its slot to compute a result it may not write."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(heartbeat_seconds(self.lease_seconds)):
                try:
                    self._update()
                except LeaseLostError:
                    return
                except SQLAlchemyError:
                    log.warning("job %s: lease not renewed (database unavailable)", self.job_id)

        beat = threading.Thread(  # its log lines carry the job's ids too
            target=contextvars.copy_context().run,
            args=(renew,),
            name=f"lease-{self.job_id}",
            daemon=True,
        )
        beat.start()
        try:
            with checking(self.check):
                yield
        finally:
            stop.set()
            beat.join(timeout=self.lease_seconds)

    def stage(self, name: str, fraction: float = 0.0) -> None:
        now = time.perf_counter()
        if name != self._stage:
            if self._stage is not None:
                self.timings[self._stage] = round(now - self._stage_started, 3)
            self._stage, self._stage_started = name, now
            self._last = now
            self._update(stage=name, progress=fraction, timings=dict(self.timings))
        elif now - self._last >= self.min_interval:
            self._last = now
            self._update(progress=fraction)
        elif self.lost.is_set():
            raise self._lost()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage(stage, done / total if total else 0.0)

    def _close_stage(self) -> None:
        if self._stage is not None:
            self.timings[self._stage] = round(time.perf_counter() - self._stage_started, 3)
            self._stage = None

    def _end(self, status: JobStatus, **values: Any) -> None:
        """End the job (``end``), if this attempt still holds it."""
        self._close_stage()
        if self.lost.is_set():
            raise self._lost()
        held = (Job.attempt == self.attempt, Job.status == JobStatus.running)
        with session_scope(self.url) as session:
            ended = end(
                session,
                self.job_id,
                *held,
                status=status,
                broker_url=self.broker_url,
                timings=dict(self.timings),
                **values,
            )
        if not ended:
            raise self._lost()

    def succeed(self, result: dict[str, Any]) -> None:
        self._end(JobStatus.succeeded, stage="done", progress=1.0, result=result)

    def fail(self, error: dict[str, Any]) -> None:
        self._end(JobStatus.failed, error=error)

    def requeue(self, stage: str) -> None:
        """Put the job back in the queue, at ``stage``, as if this attempt had not been
        made: the environment cut it short (a full disk), not the job, so it does not count
        toward ``job_max_attempts``. Its retry is on its way with backoff; the sweep counts
        the message as sent now. ``LeaseLostError`` when the attempt no longer holds it."""
        self._close_stage()
        with session_scope(self.url) as session:
            self.hold(
                session,
                status=JobStatus.queued,
                attempt=Job.attempt - 1,
                lease_until=None,
                started_at=None,
                stage=stage,
                progress=0.0,
                sent_at=utcnow(),
            )
