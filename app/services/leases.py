"""Job leases: the database is the ledger of jobs, the broker only carries messages.

A worker *claims* a job before running it: one conditional UPDATE moves the row to
``running`` with ``attempt + 1`` and a lease, and only if the job is queued or its lease has
expired, so of two deliveries of one job (a re-sent message, a broker's redelivery) exactly
one runs it. While it works, the worker renews the lease (``Lease``); every write it makes to
the row is guarded by its attempt, so a worker that lost its lease cannot overwrite the work
of the one that took over.

A *sweep*, run periodically inside every worker, keeps every accepted job moving: a running
job whose lease expired (its worker was killed or cut off) goes back to the queue and is
re-sent, until ``job_max_attempts``, after which it fails with a problem; a queued job whose
message is older than ``job_resend_seconds`` (doubling after each re-send) is re-sent if its
message is no longer in the broker's queue (``backlog``), since the broker lost it (Redis
restarted without persistence; the embedded broker never redelivers a killed worker's
message); one whose message is still there waits behind a backlog and is left alone.
Re-sent duplicates are harmless: a claim lets one run.

A sweep that could not reach the database tells the next one to grant a heartbeat of grace:
the workers could not renew their leases either, so a lease that ran out meanwhile is
extended by one heartbeat interval before any is declared expired.
Sweeps in several workers at once are safe too: each action is a conditional UPDATE, and only
its winner sends.

The sweep also sends again the message of a webhook delivery that is long overdue
(``deliveries.resend_lost``): its broker lost it, or its worker died mid-try.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from app.db.models import Expert, Job, JobStatus, ZooTask, as_utc, utcnow
from app.db.session import session_scope, updated
from app.observability.outages import Outage
from app.services import backlog, deliveries, jobs, orphans, queue
from app.services.jobs import JobKind, heartbeat_seconds
from app.services.problems import problem
from app.settings import Settings

log = logging.getLogger(__name__)

#: Re-sends of a queued job back off by doubling, up to this many doublings (64 × the base).
MAX_RESEND_DOUBLINGS = 6
#: The broker, as the sweeps of this process read its queues: an outage is logged once.
_BROKER = Outage(log, "the broker's queues (read by the job sweep)")


def claim(settings: Settings, job_id: str) -> int | None:
    """Take the job for one attempt; its number, or None when the job is finished or runs
    under a live lease elsewhere (the message is a duplicate: drop it).

    The attempt starts afresh: status ``running``, progress, timings, result and error of
    an earlier attempt cleared."""
    now = utcnow()
    claimable = or_(
        Job.status == JobStatus.queued,
        and_(Job.status == JobStatus.running, Job.lease_until < now),
    )
    with session_scope(settings.resolved_database_url()) as session:
        done = updated(
            session,
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                status=JobStatus.running,
                attempt=Job.attempt + 1,
                lease_until=now + timedelta(seconds=settings.job_lease_seconds),
                started_at=now,
                finished_at=None,
                stage="starting",
                progress=0.0,
                timings={},
                result=None,
                error=None,
            ),
        )
        if done == 0:
            return None
        attempt: int = session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0
        return attempt


@dataclass
class SweepReport:
    """What one sweep did: job ids re-sent (lease expired, or queued too long with their
    message lost), and failed; jobs queued too long whose message still waits in the broker
    (left alone); running jobs granted a heartbeat of grace; webhook deliveries whose
    message was sent again."""

    expired: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    graced: list[str] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)


def sweep(settings: Settings, now: datetime | None = None, *, grace: bool = False) -> SweepReport:
    """Re-send the jobs that would otherwise wait forever; fail those out of attempts.

    ``now`` is the clock's time unless given: a sweep as of a later moment is how a test
    sees a lease expire without waiting for it. ``grace``: the database was unreachable
    until now, so leases get a heartbeat's time to be renewed first (``_grace``)."""
    report = SweepReport()
    url = settings.resolved_database_url()
    now = now or utcnow()
    if grace:
        report.graced = _grace(url, now, heartbeat_seconds(settings.job_lease_seconds))
    with session_scope(url) as session:
        expired = list(
            session.execute(
                select(Job.id, Job.attempt, Job.kind, Job.params).where(
                    Job.status == JobStatus.running, Job.lease_until < now
                )
            )
        )
        queued = list(
            session.execute(
                select(
                    Job.id, Job.kind, Job.resends, func.coalesce(Job.sent_at, Job.created_at)
                ).where(Job.status == JobStatus.queued)
            )
        )
    for job_id, attempt, kind, params in expired:
        if attempt >= settings.job_max_attempts:
            error = _give_up(settings, job_id, attempt, now)
            if error is not None:
                report.failed.append(job_id)
                _fail_item(settings, JobKind(kind), params, error)
        elif _requeue(url, job_id, attempt, now):
            report.expired.append(job_id)
            _send(settings, job_id, kind)
    overdue = [(j, kind, n) for j, kind, n, sent in queued if _overdue(settings, n, sent, now)]
    waiting = _backlog(settings, {JobKind(kind).queue for _, kind, _ in overdue})
    for job_id, kind, resends in overdue:
        if waiting is not None and waiting.holds(job_id, JobKind(kind).queue):
            report.waiting.append(job_id)
        elif _mark_resent(url, job_id, resends, now):
            report.resent.append(job_id)
            _send(settings, job_id, kind)
    report.deliveries = deliveries.resend_lost(settings, now)
    return report


def _overdue(settings: Settings, resends: int, sent: datetime, now: datetime) -> bool:
    """Whether a queued job's message is old enough to be looked for (the wait doubles after
    each re-send)."""
    wait = settings.job_resend_seconds * 2 ** min(resends, MAX_RESEND_DOUBLINGS)
    return as_utc(sent) + timedelta(seconds=wait) < now


def _grace(url: str, now: datetime, seconds: float) -> list[str]:
    """Extend to a heartbeat from ``now`` the leases that end before then: their workers
    could not reach the database to renew them, and a live one renews at its next beat."""
    until = now + timedelta(seconds=seconds)
    ending = and_(Job.status == JobStatus.running, Job.lease_until < until)
    with session_scope(url) as session:
        ids = list(session.scalars(select(Job.id).where(ending)))
        if ids:
            session.execute(update(Job).where(Job.id.in_(ids), ending).values(lease_until=until))
    return ids


def _backlog(settings: Settings, queues: set[str]) -> backlog.Backlog | None:
    """The jobs whose message waits in ``queues``; None when none is asked for, or the
    broker cannot be looked into (the overdue jobs are then taken to be lost)."""
    if not queues:
        return None
    try:
        found = backlog.read(settings.resolved_broker_url(), queues)
    except Exception as exc:  # the overdue jobs are re-sent, if the broker takes them
        _BROKER.failed(exc)
        return None
    _BROKER.ok()
    return found


def _settle_expired(url: str, job_id: str, attempt: int, now: datetime, **values: Any) -> bool:
    """Set ``values`` on a job whose attempt's lease expired, if no other sweep or claim got
    there first (the conditional UPDATE decides); whether this call did."""
    with session_scope(url) as session:
        done = updated(
            session,
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.running,
                Job.attempt == attempt,
                Job.lease_until < now,
            )
            .values(lease_until=None, **values),
        )
        return bool(done)


def _requeue(url: str, job_id: str, attempt: int, now: datetime) -> bool:
    """Back to the queue."""
    return _settle_expired(
        url, job_id, attempt, now, status=JobStatus.queued, sent_at=now, stage="requeued"
    )


def _mark_resent(url: str, job_id: str, resends: int, now: datetime) -> bool:
    with session_scope(url) as session:
        done = updated(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued, Job.resends == resends)
            .values(resends=resends + 1, sent_at=now),
        )
        return bool(done)


def _give_up(settings: Settings, job_id: str, attempt: int, now: datetime) -> dict[str, Any] | None:
    """Fail a job out of attempts; its error, or None when another sweep got there first."""
    error = problem(
        500,
        "job-lost",
        "The job was lost",
        f"its worker stopped {attempt} times before finishing (killed, or cut off from the "
        "database); the job is not tried again",
    )
    with session_scope(settings.resolved_database_url()) as session:
        failed = jobs.end(
            session,
            job_id,
            Job.status == JobStatus.running,
            Job.attempt == attempt,
            Job.lease_until < now,
            status=JobStatus.failed,
            broker_url=settings.resolved_broker_url(),
            error=error,
            finished_at=now,
        )
    return error if failed else None


def _fail_item(
    settings: Settings, kind: JobKind, params: dict[str, Any], error: dict[str, Any]
) -> None:
    """A lost expert or zoo-task job fails its item too, freeing the name."""
    from app.services.zoo_admin import fail_item

    if kind == JobKind.expert:
        fail_item(settings, Expert, params["expert"], error)
    elif kind == JobKind.zoo_task:
        fail_item(settings, ZooTask, params["zoo_task"], error)


def _send(settings: Settings, job_id: str, kind: str) -> None:
    """Send the job's message again; a broker that refuses is tried at the next sweep."""
    try:
        queue.dispatch(job_id, JobKind(kind), settings.resolved_broker_url())
    except Exception:
        log.warning("could not re-send job %s; the next sweep tries again", job_id, exc_info=True)


class Sweeper:
    """``sweep`` every ``sweep_seconds`` in a daemon thread, for a worker's life; each
    report goes to ``on_report`` (the worker counts them). Every quarter of
    ``orphan_files_seconds`` it also removes stored files that no row holds and expired
    Idempotency-Key records (``orphans``)."""

    def __init__(
        self, settings: Settings, on_report: Callable[[SweepReport], None] | None = None
    ) -> None:
        self.settings, self.on_report = settings, on_report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
        #: Whether the last sweep failed on the database, and its outage for the log.
        self._database = Outage(log, "the database (job sweep skipped)")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _prune(self) -> None:
        try:
            orphans.prune(self.settings, self.settings.orphan_files_seconds)
            orphans.prune_idempotency_records(self.settings)
        except Exception:  # they wait for the next round; the sweeps go on
            log.warning("stored files or idempotency records not pruned", exc_info=True)

    def _run(self) -> None:
        pruned = time.monotonic()
        while not self._stop.wait(self.settings.sweep_seconds):
            if time.monotonic() - pruned >= self.settings.orphan_files_seconds / 4:
                pruned = time.monotonic()
                self._prune()
            try:
                report = sweep(self.settings, grace=self._database.down)
            except SQLAlchemyError as exc:
                self._database.failed(exc)
                continue
            self._database.ok()
            if self.on_report is not None:
                self.on_report(report)
            if report.expired or report.resent or report.failed or report.deliveries:
                log.info(
                    "job sweep: lease expired %s, message lost (re-sent) %s, failed %s; "
                    "%d waiting in the broker; webhooks re-sent %s",
                    report.expired,
                    report.resent,
                    report.failed,
                    len(report.waiting),
                    report.deliveries,
                )
            if report.graced:
                log.info("job sweep: leases extended by a heartbeat after the database returned")
