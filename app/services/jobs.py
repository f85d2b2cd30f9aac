"""Jobs and their life cycle: queued → running → succeeded | failed.

The job row is the record; the Celery message carries its id alone. A job is committed before
its message is sent (``queue.send``), so a worker never receives a job it cannot find. Workers
move the row along and write progress, timings, results and errors (problem documents) back.
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

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus
from app.db.session import session_scope, updated
from app.observability import context
from app.services.problems import not_found

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
}


def create(
    session: Session, *, kind: JobKind, task_id: str | None, tenant: str, **params: Any
) -> Job:
    """A queued job, stamped with the request being answered (if any: a job a worker creates
    gets the request of the job it runs), so that re-sends and its worker's logs carry it."""
    job = Job(
        kind=kind,
        task_id=task_id,
        tenant=tenant,
        params=params,
        status=JobStatus.queued,
        request_id=context.request_id.get(),
    )
    session.add(job)
    session.flush()
    return job


def get(session: Session, *, job_id: str, tenant: str) -> Job:
    """The tenant's job; another tenant's id is not found, as if it did not exist."""
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


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
    ) -> None:
        self.url, self.job_id, self.attempt = database_url, job_id, attempt
        self.lease_seconds, self.min_interval = lease_seconds, min_interval
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

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease every third of its length while the block runs (also through
        stretches that report no progress)."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_seconds / 3):
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

    def succeed(self, result: dict[str, Any]) -> None:
        self._close_stage()
        self._update(
            status=JobStatus.succeeded,
            stage="done",
            progress=1.0,
            result=result,
            timings=dict(self.timings),
            finished_at=datetime.now(UTC),
            lease_until=None,
        )

    def fail(self, error: dict[str, Any]) -> None:
        self._close_stage()
        self._update(
            status=JobStatus.failed,
            error=error,
            timings=dict(self.timings),
            finished_at=datetime.now(UTC),
            lease_until=None,
        )
