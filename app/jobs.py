"""Job rows and their life cycle: queued → running → succeeded | failed.

The API commits a job row first and only then sends the Celery message (with the job id
alone), so a worker never receives a job it cannot find. Workers move the row along and write
progress, timings, results and errors (as RFC 9457 problem details) back to it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus
from app.db.session import session_scope

PROBLEM_BASE = "https://task2vec.dev/problems/"


def problem(status: int, kind: str, title: str, detail: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}


def create(session: Session, kind: str, task_id: str | None, *, tenant: str, **params: Any) -> Job:
    job = Job(kind=kind, task_id=task_id, tenant=tenant, params=params, status=JobStatus.queued)
    session.add(job)
    session.flush()
    return job


#: The Celery task that runs each kind of job.
TASK_OF_KIND = {
    "embed": "workers.embed",
    "rank": "workers.rank",
    "expert": "workers.evaluate_expert",
    "zoo-task": "workers.add_zoo_task",
}


def dispatch(job: Job, broker_url: str) -> None:
    """Send the Celery message for a committed job row."""
    from workers.celery_app import celery_for

    celery_for(broker_url).send_task(TASK_OF_KIND[job.kind], args=[job.id])


class JobRecorder:
    """What a worker writes to its job row, each write in its own short transaction."""

    def __init__(self, database_url: str, job_id: str, min_interval: float = 0.5) -> None:
        self.url, self.job_id, self.min_interval = database_url, job_id, min_interval
        self._last = 0.0
        self._stage_started = time.perf_counter()
        self._stage: str | None = None
        self.timings: dict[str, float] = {}

    def _update(self, **values: Any) -> None:
        with session_scope(self.url) as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise LookupError(f"job {self.job_id} does not exist")
            for key, value in values.items():
                setattr(job, key, value)

    def start(self) -> None:
        self._update(status=JobStatus.running, started_at=datetime.now(UTC), stage="starting")

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
        )

    def fail(self, error: dict[str, Any]) -> None:
        self._close_stage()
        self._update(
            status=JobStatus.failed,
            error=error,
            timings=dict(self.timings),
            finished_at=datetime.now(UTC),
        )
