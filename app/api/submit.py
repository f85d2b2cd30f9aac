"""Upload → stored dataset → task → embedding job: the path every new dataset takes.

The same bytes always land on the same dataset row, and a dataset under one zoo configuration
on the same task, so a repeated upload reuses the task and its embedding (or the job already
making it) instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jobs
from app.api.problems import ProblemError
from app.db.models import Dataset, Job, JobStatus, Task, ZooTask
from app.db.session import session_scope
from app.settings import Settings
from app.storage import StoredFile, UploadTooLargeError, store_stream
from app.task2vec.datasets import LabelledImages, load_dataset
from app.task2vec.embedding import EmbedConfig
from app.task2vec.errors import DatasetError, Task2VecError

CHUNK = 1024 * 1024


def config_hash(config: EmbedConfig) -> str:
    blob = json.dumps({k: v for k, v in asdict(config).items() if k != "device"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Submitted:
    task_id: str
    job_id: str
    job_status: str
    new_job: bool
    skipped: list[dict[str, str]]


async def chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def store_upload(upload: UploadFile, settings: Settings) -> StoredFile:
    try:
        return await store_stream(
            chunks(upload),
            settings.data_dir / "uploads",
            settings.max_upload_bytes,
        )
    except UploadTooLargeError as exc:
        raise ProblemError(413, "upload-too-large", "The upload is too large", str(exc)) from None


def validate(
    settings: Settings, stored: StoredFile, filename: str, image_size: int
) -> LabelledImages:
    """The stored upload as a dataset, or a 422 naming the problem; a rejected file that no
    dataset row holds is removed (nothing half-stored)."""
    try:
        return load_dataset(stored.path, image_size=image_size, limits=settings.dataset_limits())
    except Task2VecError as exc:
        discard_unreferenced(settings, stored)
        detail = str(exc).replace(stored.path.name, filename)
        kind = exc.kind if isinstance(exc, DatasetError) else "invalid-dataset"
        raise ProblemError(422, kind, "The dataset cannot be used", detail) from None


def discard_unreferenced(settings: Settings, stored: StoredFile) -> None:
    """Remove a stored upload that no dataset row and no zoo task holds (a refused request
    keeps nothing)."""
    with session_scope(settings.resolved_database_url()) as session:
        known = session.scalar(select(Dataset.id).where(Dataset.sha256 == stored.sha256).limit(1))
        in_zoo = any(
            spec.get("dataset") == str(stored.path)
            for spec in session.scalars(select(ZooTask.spec))
        )
    if known is None and not in_zoo:
        stored.path.unlink(missing_ok=True)


def _dataset_row(
    session: Session, stored: StoredFile, filename: str, data: LabelledImages, tenant: str
) -> Dataset:
    row = session.scalar(
        select(Dataset).where(Dataset.tenant == tenant, Dataset.sha256 == stored.sha256)
    )
    if row is not None:
        return row
    row = Dataset(
        tenant=tenant,
        sha256=stored.sha256,
        path=str(stored.path),
        filename=filename,
        bytes=stored.bytes,
        num_images=len(data),
        classes=list(data.classes),
        class_counts=[int(c) for c in data.class_counts()],
        skipped=skipped_view(data),
    )
    session.add(row)
    session.flush()
    return row


def skipped_view(data: LabelledImages) -> list[dict[str, str]]:
    """The members left out of a dataset, as the API shows them."""
    return [{"member": name, "reason": why} for name, why in data.skipped]


def _task_row(session: Session, dataset: Dataset, config: EmbedConfig) -> Task:
    digest = config_hash(config)
    row = session.scalar(
        select(Task).where(Task.dataset_id == dataset.id, Task.config_hash == digest)
    )
    if row is None:
        row = Task(
            tenant=dataset.tenant, dataset_id=dataset.id, probe=config.probe, config_hash=digest
        )
        session.add(row)
        session.flush()
    return row


def _register(
    settings: Settings,
    stored: StoredFile,
    filename: str,
    data: LabelledImages,
    config: EmbedConfig,
    tenant: str,
) -> Submitted:
    url = settings.resolved_database_url()
    for attempt in range(2):  # a concurrent identical upload may win the unique constraint
        try:
            with session_scope(url) as session:
                dataset = _dataset_row(session, stored, filename, data, tenant)
                task = _task_row(session, dataset, config)
                job = session.scalar(
                    select(Job)
                    .where(Job.task_id == task.id, Job.kind == "embed")
                    .where(Job.status != JobStatus.failed)
                    .order_by(Job.created_at.desc())
                    .limit(1)
                )
                new = job is None
                if job is None:
                    job = jobs.create(session, "embed", task.id, tenant=tenant)
                result = Submitted(task.id, job.id, job.status, new, skipped_view(data))
            break
        except IntegrityError:
            if attempt:
                raise
    if result.new_job:
        send(settings, result.job_id)
    return result


def send(settings: Settings, job_id: str) -> None:
    """Send a committed job's message; if the broker refuses, the job fails (it would
    otherwise wait forever) and the client gets a 503."""
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        try:
            jobs.dispatch(job, settings.resolved_broker_url())
        except Exception as exc:
            detail = f"the job queue is unavailable: {exc}"
            job.status = JobStatus.failed
            job.error = jobs.problem(503, "broker-unavailable", "Job queue unavailable", detail)
            session.commit()
            raise ProblemError(
                503, "broker-unavailable", "The job queue is unavailable", detail
            ) from None


async def register(
    stored: StoredFile, filename: str, settings: Settings, config: EmbedConfig, tenant: str
) -> Submitted:
    """Check and register a stored upload; queue its embedding unless known."""
    data = await run_in_threadpool(validate, settings, stored, filename, config.image_size)
    return await run_in_threadpool(_register, settings, stored, filename, data, config, tenant)


async def submit(
    upload: UploadFile, settings: Settings, config: EmbedConfig, tenant: str
) -> Submitted:
    """Store, check and register an uploaded dataset; queue its embedding unless known."""
    stored = await store_upload(upload, settings)
    return await register(stored, upload.filename or "upload", settings, config, tenant)
