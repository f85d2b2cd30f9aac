"""Fault drill: the API process killed with -9 while uploads are under way, on the embedded
default (SQLite, the SQLite-backed broker), with real processes. Every upload answered 202
is finished by the worker; an upload cut off before its rows committed leaves no row, and its
stored file is removed by the orphan pruning; nothing is half-registered."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db.models import Dataset, Job, JobStatus, Task
from app.db.session import session_scope
from app.services import orphans
from app.services.jobs import JobKind
from app.settings import Settings
from tests.helpers import (
    FAST_LEASES,
    PATIENCE,
    eventually,
    free_port,
    fresh_database,
    npz_upload,
    png_bytes,
    random_images,
    service_settings,
    start_api,
    stop,
    worker,
    write_zip,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def embedded(tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    with fresh_database("sqlite", tmp_path) as url:
        yield service_settings(tiny_zoo, url, tmp_path).model_copy(update=FAST_LEASES)


def _stored(settings: Settings) -> set[Path]:
    return {p for p in (settings.data_dir / "uploads").rglob("*") if p.is_file()}


def _finished(url: str) -> dict[str, Any] | None:
    job: dict[str, Any] = httpx.get(url).json()
    return job if job["status"] in ("succeeded", "failed") else None


def _slow_to_validate(path: Path) -> Path:
    """A valid dataset whose validation takes a while: many PNGs to decode."""
    images = random_images(1500, size=64, seed=3, channels=3)
    return write_zip(
        path, ((f"class{i % 3}/img{i}.png", png_bytes(image)) for i, image in enumerate(images))
    )


def test_an_api_killed_during_uploads_loses_no_accepted_job(
    embedded: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "processes.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = start_api(embedded, port, log)
    slow = _slow_to_validate(tmp_path / "slow.zip").read_bytes()
    outcomes: list[object] = []

    def send(name: str, body: bytes) -> None:
        try:
            response = httpx.post(f"{base}/v1/tasks", files={"file": (name, body)}, timeout=60)
            outcomes.append(response)
        except httpx.TransportError as exc:
            outcomes.append(exc)

    try:
        with worker(embedded, log) as running:
            accepted = []
            for i in (1, 2, 3):
                response = httpx.post(
                    f"{base}/v1/tasks", files={"file": (f"t{i}.npz", npz_upload(i))}, timeout=60
                )
                assert response.status_code == 202, response.text
                accepted.append(response.json()["job_id"])
            before = _stored(embedded)
            # An upload being validated when the API dies: its file is stored, its rows not.
            sender = threading.Thread(target=send, args=("slow.zip", slow))
            sender.start()
            eventually(
                lambda: _stored(embedded) - before,
                "the slow upload's file",
                processes=[api],
                log=log,
                pause=0.005,
            )
            stop(api, signal.SIGKILL)
            sender.join(PATIENCE)
            assert isinstance(outcomes[0], httpx.TransportError), outcomes
            orphan = _stored(embedded) - before
            assert len(orphan) == 1

            # A new API: the accepted jobs finish, with the worker that never stopped.
            api = start_api(embedded, port, log)
            for job_id in accepted:
                job = eventually(
                    partial(_finished, f"{base}/v1/jobs/{job_id}"),
                    f"job {job_id} to finish",
                    processes=[api, running],
                    log=log,
                )
                assert job["status"] == "succeeded", job
    finally:
        stop(api)

    # Nothing half-registered: every dataset has its task and embedding job, and its file.
    with session_scope(embedded.resolved_database_url()) as session:
        datasets = session.scalars(select(Dataset)).all()
        assert len(datasets) == 3
        for dataset in datasets:
            assert Path(dataset.path).is_file()
            task = session.scalar(select(Task).where(Task.dataset_id == dataset.id))
            assert task is not None
            job = session.scalar(
                select(Job).where(Job.task_id == task.id, Job.kind == JobKind.embed)
            )
            assert job is not None
            assert job.status == JobStatus.succeeded
    # The cut-off upload's file is no row's: pruned once old enough; the others stay.
    assert orphans.prune(embedded, older_than=3600) == []
    assert set(orphans.prune(embedded, older_than=0)) == orphan
    assert _stored(embedded) == before
