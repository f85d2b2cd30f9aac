"""An attempt whose write the disk refuses (full, over quota, failing) puts its job back in
the queue and is retried, its attempt not counted; an error of the job's own still fails it.
The ENOSPC is the kernel's own (``/dev/full``); tests/drills/test_disk.py fills a real disk
under a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db.migrate import upgrade
from app.db.models import JobStatus
from app.db.session import session_scope
from app.services import environment, jobs, leases
from app.services.jobs import JobKind, JobRecorder
from app.settings import Settings
from tests.disks import DEV_FULL
from tests.helpers import fresh_database, job_row
from workers import tasks


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Settings]:
    with fresh_database("sqlite", tmp_path) as url:
        upgrade(url)  # as service_settings does: the copied template may lack its last writes
        yield Settings(data_dir=tmp_path / "data", database_url=url, job_lease_seconds=60)


def _claimed(settings: Settings) -> JobRecorder:
    with session_scope(settings.resolved_database_url()) as session:
        job_id = jobs.create(
            session, kind=JobKind.expert, task_id=None, tenant="acme", expert="cnn-a"
        ).id
    attempt = leases.claim(settings, job_id)
    assert attempt == 1
    return JobRecorder(settings.resolved_database_url(), job_id, attempt, 60)


def _writes_to_a_full_disk(recorder: JobRecorder, params: dict[str, Any]) -> None:
    recorder.stage("saving")
    with DEV_FULL.open("wb", buffering=0) as out:
        out.write(b"an embedding")


def test_an_attempt_the_disk_refuses_puts_its_job_back_and_is_retried(quick: Settings) -> None:
    recorder = _claimed(quick)
    with pytest.raises(environment.StorageUnavailableError):
        tasks._attempt(recorder, {}, "saving", _writes_to_a_full_disk, None, "invalid-dataset")
    assert environment.StorageUnavailableError in tasks.RETRIED  # Celery retries it
    job = job_row(quick, recorder.job_id)
    assert (job.status, job.stage, job.error) == (JobStatus.queued, environment.WAITING, None)
    assert job.attempt == 0  # not counted
    assert job.lease_until is None  # claimable at once
    assert leases.claim(quick, recorder.job_id) == 1


def test_an_error_of_the_jobs_own_still_fails_it(quick: Settings) -> None:
    recorder = _claimed(quick)

    def missing(recorder: JobRecorder, params: dict[str, Any]) -> None:
        Path("/nonexistent/dataset.npz").read_bytes()

    assert tasks._attempt(recorder, {}, "loading", missing, None, "invalid-dataset") == "failed"
    job = job_row(quick, recorder.job_id)
    assert job.status == JobStatus.failed
    assert job.error is not None
    assert job.error["status"] == 500
