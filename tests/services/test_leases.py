"""Job leases without a worker process: a claim lets one attempt run, a sweep as of a later
moment re-sends a job whose lease expired and fails one out of attempts, a lost attempt writes
nothing, a refused job is never retried, and every worker's sweep thread prunes orphaned
files."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient

from app.db.models import JobStatus
from app.services import leases
from app.services.jobs import JobKind, JobRecorder, LeaseLostError
from app.services.serving import ZooStates
from app.settings import Settings
from app.zoo.presets import recipe, tiny
from app.zoo.tasks import materialize
from tests.helpers import (
    FAST_LEASES,
    eventually,
    job_row,
    later,
    npz_upload,
    run_job,
)


def test_a_refused_dataset_fails_once_and_is_not_retried(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()
    strict = settings.model_copy(update={"max_classes": 2, **FAST_LEASES})  # the worker refuses it
    run_job(strict, accepted["job_id"])
    job = job_row(strict, accepted["job_id"])
    assert job.status == JobStatus.failed
    assert job.error is not None
    assert job.error["status"] == 422
    # Long after its lease would have ended, nothing is re-sent.
    assert leases.sweep(strict, now=later(10 * strict.job_lease_seconds)) == leases.SweepReport()
    assert job_row(strict, accepted["job_id"]).attempt == 1
    assert sent == [accepted["job_id"]]


def test_a_lease_decides_which_attempt_runs_and_writes(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    # A lease no stall of the machine outlasts: it ends only when a sweep is told it has.
    quick = settings.model_copy(update={"job_lease_seconds": 60.0, "job_max_attempts": 2})
    lease = quick.job_lease_seconds
    job_id = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()["job_id"]
    assert leases.claim(quick, job_id) == 1
    assert leases.claim(quick, job_id) is None  # a duplicate message is dropped
    first = JobRecorder(quick.resolved_database_url(), job_id, 1, lease)
    first.stage("fisher", 0.5)  # renews the lease
    assert leases.sweep(quick) == leases.SweepReport()  # alive: left alone
    report = leases.sweep(quick, now=later(lease + 1))  # it stopped renewing: its worker died
    assert report.expired == [job_id]
    assert sent == [job_id, job_id]  # re-sent
    assert leases.claim(quick, job_id) == 2
    with pytest.raises(LeaseLostError):
        first.succeed({"late": True})  # the lost attempt writes nothing
    fresh = job_row(quick, job_id)
    assert (fresh.status, fresh.result, fresh.timings) == (JobStatus.running, None, {})
    assert leases.sweep(quick, now=later(lease + 1)).failed == [job_id]  # out of attempts
    lost = job_row(quick, job_id)
    assert lost.status == JobStatus.failed
    assert lost.error is not None
    assert lost.error["type"].endswith("/job-lost")
    assert JobKind(lost.kind) == JobKind.embed


def test_every_worker_sweeper_prunes_orphans_now_and_then(settings: Settings) -> None:
    """The sweep thread of every worker removes stored files no row holds, once old enough,
    and leaves a young one (a request may still be about to commit its row). Which files are
    old enough is ``orphans``' to say (tests/services/test_orphans.py); here the young file is
    dated ahead, so that however slowly the thread comes round it is never old enough."""
    uploads = settings.data_dir / "uploads" / "ab"
    uploads.mkdir(parents=True)
    old, young = uploads / f"ab{'0' * 62}.upload", uploads / f"ab{'1' * 62}.upload"
    for path, hours in ((old, -2), (young, 2)):
        path.write_bytes(b"bytes no row holds")
        os.utime(path, (time.time() + hours * 3600, time.time() + hours * 3600))
    # Prunes every quarter of orphan_files_seconds: here at each sweep.
    quick = settings.model_copy(update={"sweep_seconds": 0.1, "orphan_files_seconds": 0.4})
    sweeper = leases.Sweeper(quick)
    sweeper.start()
    try:
        eventually(lambda: not old.exists(), "the sweep to prune the old file")
    finally:
        sweeper.stop()
    assert young.exists()


def test_a_computation_whose_lease_was_taken_over_stops_at_its_next_batch(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    """A ranking reports no progress while it reads every expert's features of the images:
    once the heartbeat finds the lease taken over, it stops at its next batch instead of
    computing on to a result its attempt may not write."""
    quick = settings.model_copy(update={"job_lease_seconds": 0.6})  # a heartbeat every 0.2 s
    state = ZooStates(background=False, fitted=("logme",)).current(quick)
    images = materialize(tiny()[1], split=recipe("tiny").protocol.split)
    embedding = state.zoo.embeddings[1]
    assert len(state.rank("logme", embedding, images)) == len(state.zoo.experts)  # unhindered
    job_id = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()["job_id"]
    assert leases.claim(quick, job_id) == 1
    first = JobRecorder(quick.resolved_database_url(), job_id, 1, quick.job_lease_seconds)
    with first.heartbeat():
        assert leases.sweep(quick, now=later(60)).expired == [job_id]  # as if it was cut off
        assert leases.claim(quick, job_id) == 2  # another worker took the job over
        eventually(first.lost.is_set, "the heartbeat to find the lease lost")
        with pytest.raises(LeaseLostError):
            state.rank("logme", embedding, images)
    assert job_row(quick, job_id).attempt == 2
