"""Jobs and their life cycle below HTTP (``app.services.jobs``), on both databases.

A job is created queued, stamped with the request that made it; a later request for the same
work is called back too, unless the job has a callback already (the first wins) or has ended;
a job ends once, in ``end``, and the webhook delivery it owes is committed with its terminal
status before its message is sent; its view links what a client reads next; another tenant's
job is not found, as if it did not exist; and every write a worker's attempt makes goes
through its ``JobRecorder``, guarded by the attempt, so that an attempt that lost its lease
to another (or whose job was ended elsewhere) writes nothing and learns so
(``LeaseLostError``). Leases are expired by writing the row, never by waiting."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db.models import Job, JobStatus, WebhookDelivery, as_utc, utcnow
from app.db.session import session_scope
from app.observability import context
from app.services import jobs, leases, queue
from app.services.jobs import JobKind, JobRecorder, LeaseLostError
from app.services.problems import ProblemError, problem
from app.settings import Settings
from tests.helpers import job_row, later

HOOK = "https://example.com/hook"


def _job(
    settings: Settings,
    kind: JobKind = JobKind.expert,
    tenant: str = "acme",
    callback_url: str | None = None,
    **params: Any,
) -> str:
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(
            session,
            kind=kind,
            task_id=None,
            tenant=tenant,
            callback_url=callback_url,
            **(params or {"expert": "cnn-a"}),
        )
        return job.id


def _follow(settings: Settings, job_id: str, url: str) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        jobs.follow(session, job_id=job_id, callback_url=url)


def _end(settings: Settings, job_id: str, status: JobStatus, **values: Any) -> bool:
    with session_scope(settings.resolved_database_url()) as session:
        return jobs.end(session, job_id, status=status, broker_url=None, **values)


def _deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.resolved_database_url()) as session:
        found = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        return list(found)


def _claim(settings: Settings, job_id: str) -> int:
    attempt = leases.claim(settings, job_id)
    assert attempt is not None
    return attempt


def _expire_lease(settings: Settings, job_id: str) -> None:
    """The attempt's worker was cut off: its lease ran out (as if long ago)."""
    with session_scope(settings.resolved_database_url()) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(hours=1))
        )


def _recorder(settings: Settings, job_id: str, attempt: int, **kw: Any) -> JobRecorder:
    return JobRecorder(settings.resolved_database_url(), job_id, attempt, 3600.0, **kw)


def test_a_job_is_created_queued_and_stamped_with_its_request(settings: Settings) -> None:
    with context.bound(request="req-42"):
        job_id = _job(settings, JobKind.rank, callback_url=HOOK, method="logme", k=3)
    row = job_row(settings, job_id)
    assert (row.kind, row.status, row.tenant) == ("rank", JobStatus.queued, "acme")
    assert (row.params, row.request_id, row.callback_url) == (
        {"method": "logme", "k": 3},
        "req-42",
        HOOK,
    )
    assert (row.attempt, row.sent_at, row.result, row.error) == (0, None, None, None)
    assert job_row(settings, _job(settings)).request_id is None  # no request: none


def test_a_later_request_is_called_back_unless_the_job_has_a_callback(
    settings: Settings,
) -> None:
    job_id = _job(settings)
    _follow(settings, job_id, "https://first.example/hook")
    _follow(settings, job_id, "https://second.example/hook")
    assert job_row(settings, job_id).callback_url == "https://first.example/hook"

    own = _job(settings, callback_url=HOOK)
    _follow(settings, own, "https://second.example/hook")
    assert job_row(settings, own).callback_url == HOOK

    running = _job(settings)
    _claim(settings, running)
    _follow(settings, running, HOOK)
    assert job_row(settings, running).callback_url == HOOK

    ended = _job(settings)
    assert _end(settings, ended, JobStatus.succeeded)
    _follow(settings, ended, HOOK)  # too late: nothing would call it
    assert job_row(settings, ended).callback_url is None


def test_a_job_ends_once(settings: Settings) -> None:
    job_id = _job(settings)
    _claim(settings, job_id)
    moment = later(30)
    assert _end(settings, job_id, JobStatus.succeeded, result={"ok": 1}, finished_at=moment)
    row = job_row(settings, job_id)
    assert (row.status, row.result, row.lease_until) == (JobStatus.succeeded, {"ok": 1}, None)
    assert row.finished_at is not None
    assert as_utc(row.finished_at) == moment

    assert not _end(settings, job_id, JobStatus.failed, error={"status": 500})
    again = job_row(settings, job_id)
    assert (again.status, again.result, again.error) == (JobStatus.succeeded, {"ok": 1}, None)
    assert _deliveries(settings, job_id) == []  # no callback URL: nothing owed


def test_a_job_does_not_end_in_a_status_that_is_not_terminal(settings: Settings) -> None:
    job_id = _job(settings)
    for status in (JobStatus.queued, JobStatus.running):
        with pytest.raises(ValueError, match="does not end"):
            _end(settings, job_id, status)
    assert job_row(settings, job_id).status == JobStatus.queued


def test_end_writes_nothing_unless_its_guard_holds(settings: Settings) -> None:
    job_id = _job(settings, callback_url=HOOK)
    attempt = _claim(settings, job_id)
    with session_scope(settings.resolved_database_url()) as session:
        assert not jobs.end(
            session, job_id, Job.attempt == attempt + 1, status=JobStatus.failed, broker_url=None
        )
    assert job_row(settings, job_id).status == JobStatus.running
    assert _deliveries(settings, job_id) == []
    with session_scope(settings.resolved_database_url()) as session:
        assert jobs.end(
            session, job_id, Job.attempt == attempt, status=JobStatus.failed, broker_url=None
        )
    assert job_row(settings, job_id).status == JobStatus.failed


def test_an_ended_job_commits_its_delivery_then_sends_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str, list[str]]] = []

    def send_delivery(delivery_id: str, broker_url: str) -> None:
        committed = [d.id for d in _deliveries(settings, job_id)]  # read in another session
        sent.append((delivery_id, broker_url, committed))

    monkeypatch.setattr(queue, "send_delivery", send_delivery)
    job_id = _job(settings, tenant="globex", callback_url=HOOK)
    error = problem(422, "invalid-dataset", "Bad", "no images")
    with session_scope(settings.resolved_database_url()) as session:
        assert jobs.end(session, job_id, status=JobStatus.failed, broker_url="b://", error=error)
    [delivery] = _deliveries(settings, job_id)
    assert (delivery.event, delivery.tenant, delivery.url) == ("job.failed", "globex", HOOK)
    assert delivery.status == "pending"
    assert sent == [(delivery.id, "b://", [delivery.id])]
    assert job_row(settings, job_id).error == error

    unsent = _job(settings, callback_url=HOOK)  # no broker: left to the sweep
    assert _end(settings, unsent, JobStatus.succeeded)
    assert [d.event for d in _deliveries(settings, unsent)] == ["job.succeeded"]
    assert len(sent) == 1


def _in_memory(kind: JobKind, task_id: str | None, **params: Any) -> Job:
    return Job(
        id="j1",
        kind=kind,
        status=JobStatus.queued,
        task_id=task_id,
        params=params,
        timings={},
        progress=0.0,
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_a_view_links_what_a_client_reads_next() -> None:
    def links(job: Job) -> dict[str, str]:
        view: dict[str, str] = jobs.view(job)["links"]
        return view

    assert links(_in_memory(JobKind.embed, "t1")) == {
        "self": "/v1/jobs/j1",
        "task": "/v1/tasks/t1",
        "neighbors": "/v1/tasks/t1/neighbors",
        "recommendations": "/v1/tasks/t1/recommendations",
    }
    assert links(_in_memory(JobKind.rank, "t1", method="logme")) == {
        "self": "/v1/jobs/j1",
        "task": "/v1/tasks/t1",
    }
    assert links(_in_memory(JobKind.expert, None, expert="cnn-a")) == {
        "self": "/v1/jobs/j1",
        "expert": "/v1/experts/cnn-a",
        "zoo": "/v1/zoo",
    }
    assert links(_in_memory(JobKind.zoo_task, None, zoo_task="digits")) == {
        "self": "/v1/jobs/j1",
        "zoo_task": "/v1/zoo/tasks/digits",
        "zoo": "/v1/zoo",
    }
    assert links(_in_memory(JobKind.zoo_import, None, bundle="ab12")) == {"self": "/v1/jobs/j1"}


def test_a_view_shows_the_row(settings: Settings) -> None:
    job_id = _job(settings, JobKind.expert, expert="cnn-a")
    attempt = _claim(settings, job_id)
    recorder = _recorder(settings, job_id, attempt)
    recorder.progress("evaluating", 1, 4)
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.get(session, job_id=job_id, tenant="acme")
        view = jobs.view(job)
        created, started = job.created_at, job.started_at
    assert started is not None
    assert view == {
        "id": job_id,
        "kind": "expert",
        "status": "running",
        "attempts": 1,
        "progress": {"stage": "evaluating", "fraction": 0.25},
        "task_id": None,
        "params": {"expert": "cnn-a"},
        "timings": {},
        "created_at": created.isoformat(),
        "started_at": started.isoformat(),
        "finished_at": None,
        "error": None,
        "result": None,
        "links": {"self": f"/v1/jobs/{job_id}", "expert": "/v1/experts/cnn-a", "zoo": "/v1/zoo"},
    }


def test_another_tenants_job_is_not_found(settings: Settings) -> None:
    job_id = _job(settings, tenant="acme")
    with session_scope(settings.resolved_database_url()) as session:
        assert jobs.get(session, job_id=job_id, tenant="acme").id == job_id
        assert jobs.state(session, job_id=job_id, tenant="acme").id == job_id
        answers = []
        for tenant, asked in (("globex", job_id), ("acme", "0" * 32), ("globex", "0" * 32)):
            for read in (jobs.get, jobs.state):
                with pytest.raises(ProblemError) as missing:
                    read(session, job_id=asked, tenant=tenant)
                error = missing.value
                answers.append((error.status, error.kind, error.title))
                assert error.detail == f"job {asked!r} does not exist"
    assert set(answers) == {(404, "not-found", "No such job")}  # no tell-tale difference


def test_state_times_the_wait_and_the_run(settings: Settings) -> None:
    queued = _job(settings)
    with session_scope(settings.resolved_database_url()) as session:
        waiting = jobs.state(session, job_id=queued, tenant="acme")
    assert (waiting.status, waiting.finished) == (JobStatus.queued, False)
    assert (waiting.queue_wait_s, waiting.run_s) == (None, None)

    job_id = _job(settings)
    created = datetime(2030, 1, 1, tzinfo=UTC)
    with session_scope(settings.resolved_database_url()) as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.created_at, row.started_at = created, created + timedelta(seconds=2.5)
        row.status = JobStatus.running
    with session_scope(settings.resolved_database_url()) as session:
        running = jobs.state(session, job_id=job_id, tenant="acme")
    assert (running.queue_wait_s, running.run_s, running.finished) == (2.5, None, False)

    result = {"ranking": ["cnn-a"]}
    assert _end(
        settings,
        job_id,
        JobStatus.succeeded,
        result=result,
        timings={"ranking": 7.0},
        finished_at=created + timedelta(seconds=10),
    )
    with session_scope(settings.resolved_database_url()) as session:
        done = jobs.state(session, job_id=job_id, tenant="acme")
    assert done == jobs.JobState(
        id=job_id,
        status=JobStatus.succeeded,
        error=None,
        result=result,
        timings={"ranking": 7.0},
        queue_wait_s=2.5,
        run_s=7.5,
    )
    assert done.finished


def test_a_recorder_writes_stages_progress_and_the_result(settings: Settings) -> None:
    job_id = _job(settings)
    attempt = _claim(settings, job_id)
    claimed_lease = job_row(settings, job_id).lease_until
    assert claimed_lease is not None
    assert as_utc(claimed_lease) < later(settings.job_lease_seconds + 60)
    recorder = _recorder(settings, job_id, attempt, min_interval=0.0)

    recorder.stage("loading")
    row = job_row(settings, job_id)
    assert (row.stage, row.progress, row.timings) == ("loading", 0.0, {})
    assert row.lease_until is not None
    assert as_utc(row.lease_until) > later(3000)  # renewed: an hour from now

    recorder.progress("embedding", 1, 4)
    row = job_row(settings, job_id)
    assert (row.stage, row.progress, list(row.timings)) == ("embedding", 0.25, ["loading"])
    recorder.progress("embedding", 3, 4)
    assert job_row(settings, job_id).progress == 0.75
    recorder.progress("embedding", 0, 0)  # nothing to count: no division by zero
    assert job_row(settings, job_id).progress == 0.0

    recorder.succeed({"embedding_dim": 16})
    row = job_row(settings, job_id)
    assert (row.status, row.stage, row.progress) == (JobStatus.succeeded, "done", 1.0)
    assert (row.result, row.lease_until, row.error) == ({"embedding_dim": 16}, None, None)
    assert set(row.timings) == {"loading", "embedding"}
    assert row.finished_at is not None
    with pytest.raises(LeaseLostError):  # ended: there is nothing left to hold
        recorder.succeed({"embedding_dim": 16})


def test_progress_within_a_stage_is_written_at_most_every_interval(settings: Settings) -> None:
    job_id = _job(settings)
    recorder = _recorder(settings, job_id, _claim(settings, job_id), min_interval=3600.0)
    recorder.stage("a", 0.1)
    recorder.stage("a", 0.9)  # too soon after the last write: kept to itself
    assert (job_row(settings, job_id).stage, job_row(settings, job_id).progress) == ("a", 0.1)
    recorder.stage("b", 0.2)  # a new stage is written at once
    assert (job_row(settings, job_id).stage, job_row(settings, job_id).progress) == ("b", 0.2)


def test_a_failed_attempt_records_its_error_and_owes_a_delivery(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(queue, "send_delivery", lambda d, broker: sent.append(broker))
    job_id = _job(settings, callback_url=HOOK)
    attempt = _claim(settings, job_id)
    recorder = _recorder(settings, job_id, attempt, broker_url="b://")
    recorder.stage("loading dataset")
    error = problem(422, "too-few-images", "Failed while embedding", "2 images")
    recorder.fail(error)
    row = job_row(settings, job_id)
    assert (row.status, row.error, row.result) == (JobStatus.failed, error, None)
    assert list(row.timings) == ["loading dataset"]
    assert [d.event for d in _deliveries(settings, job_id)] == ["job.failed"]
    assert sent == ["b://"]


def test_an_attempt_that_lost_its_lease_writes_nothing(settings: Settings) -> None:
    job_id = _job(settings)
    first = _recorder(settings, job_id, _claim(settings, job_id), min_interval=0.0)
    first.stage("one")
    _expire_lease(settings, job_id)
    second_attempt = _claim(settings, job_id)  # another worker takes the job over
    assert second_attempt == first.attempt + 1
    second = _recorder(settings, job_id, second_attempt)
    second.stage("two", 0.5)

    with pytest.raises(LeaseLostError):
        first.stage("one", 0.9)
    assert first.lost.is_set()
    with pytest.raises(LeaseLostError):  # flagged lost: refused before the database
        first.stage("one", 0.95)

    def stale() -> JobRecorder:
        """The first attempt, as a recorder that has not noticed yet: the row refuses it."""
        return _recorder(settings, job_id, first.attempt, min_interval=0.0)

    writes: list[Callable[[], None]] = [
        lambda: stale().stage("three"),
        lambda: stale().progress("three", 1, 2),
        lambda: stale().succeed({"from": "first"}),
        lambda: stale().fail(problem(500, "internal", "x", "y")),
    ]
    for write in writes:
        with pytest.raises(LeaseLostError):
            write()
    with (
        session_scope(settings.resolved_database_url()) as session,
        pytest.raises(LeaseLostError),
    ):
        first.hold(session, result={"from": "first"})
    row = job_row(settings, job_id)
    assert (row.status, row.attempt, row.stage, row.progress) == ("running", 2, "two", 0.5)
    assert row.result is None

    second.succeed({"from": "second"})
    assert job_row(settings, job_id).result == {"from": "second"}


def test_a_lost_attempt_is_caught_before_its_first_write(settings: Settings) -> None:
    """The check is the row, not a flag: an attempt that never wrote learns it lost."""
    job_id = _job(settings)
    first = _recorder(settings, job_id, _claim(settings, job_id))
    _expire_lease(settings, job_id)
    _claim(settings, job_id)
    with (
        session_scope(settings.resolved_database_url()) as session,
        pytest.raises(LeaseLostError),
    ):
        first.hold(session)
    assert first.lost.is_set()


def test_a_job_ended_elsewhere_is_lost_to_its_attempt(settings: Settings) -> None:
    """The sweep gave up on the job (out of attempts), or the API failed it."""
    job_id = _job(settings)
    recorder = _recorder(settings, job_id, _claim(settings, job_id), min_interval=0.0)
    recorder.stage("embedding", 0.3)
    given_up = problem(500, "job-lost", "Lost", "out of attempts")
    assert _end(settings, job_id, JobStatus.failed, error=given_up)
    with pytest.raises(LeaseLostError):
        recorder.stage("embedding", 0.6)
    with pytest.raises(LeaseLostError):
        recorder.succeed({"late": True})
    row = job_row(settings, job_id)
    assert (row.status, row.error, row.result) == (JobStatus.failed, given_up, None)
