"""Fault drill: the data directory's disk fills up, for real (a small tmpfs, written to its
last byte). An upload is answered 503 with Retry-After and leaves no file behind, and the
service says it is not ready until space is back; a job accepted before the disk filled goes
back to the queue, is retried by a real worker process, and completes once space is freed,
its attempt not counted against it. The database and the broker live elsewhere, as they
do in production (PostgreSQL, Redis)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.db.models import Job, JobStatus
from app.settings import Settings
from tests.disks import MiB, fill, small_disk
from tests.helpers import (
    FAST_LEASES,
    eventually,
    fresh_database,
    job_reaching,
    job_row,
    npz_upload,
    service_settings,
    worker,
)

pytestmark = pytest.mark.slow


def _on_disk(disk: Path, tiny_zoo: Path, url: str, tmp_path: Path) -> Settings:
    """Settings whose data directory (the tiny zoo, uploads, embeddings) is on ``disk``;
    the database and the broker are not."""
    settings = service_settings(tiny_zoo, url, disk)
    return settings.model_copy(
        update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}", "min_free_bytes": MiB}
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_an_upload_to_a_full_disk_answers_503_and_the_service_is_not_ready(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk, fresh_database("sqlite", tmp_path) as url:
        settings = _on_disk(disk, tiny_zoo, url, tmp_path)
        uploads = settings.data_dir / "uploads"
        with TestClient(create_app(settings)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data_free_bytes"] > MiB
            filler = fill(disk)
            before = _files(uploads)

            answer = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())})
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "5"
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"].endswith("/storage-unavailable")
            assert "space" in answer.json()["detail"]
            assert str(disk) not in answer.text  # no paths
            assert _files(uploads) == before  # nothing half-written is left

            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.headers["retry-after"] == "5"
            assert ready.json()["checks"]["storage"] == "unavailable"
            assert ready.json()["data_free_bytes"] < MiB
            assert str(disk) not in ready.text
            assert client.get("/healthz").status_code == 200

            filler.unlink()
            assert client.get("/readyz").status_code == 200
            again = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())})
            assert again.status_code == 202, again.text


def test_a_job_accepted_before_the_disk_filled_completes_once_space_is_back(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with small_disk(tmp_path / "disk") as disk, fresh_database("sqlite", tmp_path) as url:
        settings = _on_disk(disk, tiny_zoo, url, tmp_path).model_copy(update=FAST_LEASES)
        with TestClient(create_app(settings)) as client:
            accepted = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())})
            assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        filler = fill(disk)
        with worker(settings, log) as running:

            def waits_for_space() -> Job | None:
                job = job_row(settings, job_id)
                waiting = job.status == JobStatus.queued and job.stage == "waiting for storage"
                return job if waiting or job.status == JobStatus.failed else None

            job = eventually(
                waits_for_space, "the job to meet the full disk", processes=[running], log=log
            )
            assert job.status == JobStatus.queued, job.error  # back in the queue, not failed
            filler.unlink()
            freed_at = time.monotonic()
            ended = {JobStatus.succeeded, JobStatus.failed}
            job = job_reaching(settings, job_id, ended, running, log)
        # A figure for the README's table (pytest -s shows it), not a bound.
        print(f"finished {time.monotonic() - freed_at:.1f} s after space was freed")
        assert job.status == JobStatus.succeeded, job.error
        assert job.attempt == 1  # the attempts the full disk cut short do not count
        assert "retried" in log.read_text()
