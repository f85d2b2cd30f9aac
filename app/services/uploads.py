"""Upload → stored dataset → task → embedding job: the path every new dataset takes.

The same bytes always land on the same dataset row (per tenant), and a dataset under one zoo
configuration on the same task, so a repeated upload reuses the task and its embedding (or the
job already making it) instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Dataset, Job, JobStatus, Task
from app.services import jobs, objects, queue
from app.services.jobs import JobKind
from app.services.problems import ProblemError
from app.services.serving import PRERANKED
from app.services.storage import StoredFile
from app.settings import Settings
from app.task2vec.datasets import LabelledImages, load_dataset
from app.task2vec.embedding import EmbedConfig
from app.task2vec.errors import DatasetError, Task2VecError


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
    warnings: list[str]


#: Characters never kept in a stored file name: markup and quoting (the name is shown back
#: in answers, and by whatever reads them); path separators.
_UNSAFE_IN_NAMES = set("<>\"'`&/\\")
MAX_FILENAME = 255


def safe_filename(name: str | None) -> str:
    """The name an upload is recorded under: its last path component, NFC, without control
    characters (NUL included) or markup, at most 255 characters (the extension kept);
    ``upload`` when nothing is left."""
    text = unicodedata.normalize("NFC", name or "")
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in text if c.isprintable() and c not in _UNSAFE_IN_NAMES)
    text = text.strip(" .") or "upload"
    if len(text) > MAX_FILENAME:
        stem, dot, extension = text.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            text = stem[: MAX_FILENAME - len(extension) - 1] + "." + extension
        else:
            text = text[:MAX_FILENAME]
    return text


def too_large(exc: Exception) -> ProblemError:
    return ProblemError(413, "upload-too-large", "The upload is too large", str(exc))


def validate(
    *, settings: Settings, stored: StoredFile, filename: str, image_size: int
) -> LabelledImages:
    """The stored upload as a dataset, or a 422 naming the problem (the request that
    stored it removes its own file when it ends: ``StoredFile.discard``)."""
    try:
        return load_dataset(stored.path, image_size=image_size, limits=settings.dataset_limits())
    except Task2VecError as exc:
        detail = str(exc).replace(str(stored.path), filename).replace(stored.path.name, filename)
        kind = exc.kind if isinstance(exc, DatasetError) else "invalid-dataset"
        raise ProblemError(422, kind, "The dataset cannot be used", detail) from None


def skipped_view(data: LabelledImages) -> list[dict[str, str]]:
    """The members left out of a dataset, as the API shows them."""
    return [{"member": name, "reason": why} for name, why in data.skipped]


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
        path=str(stored.final),
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


def register(
    session: Session,
    *,
    settings: Settings,
    stored: StoredFile,
    filename: str,
    data: LabelledImages,
    config: EmbedConfig,
    tenant: str,
    callback_url: str | None = None,
    prerank: tuple[str, ...] = PRERANKED,
) -> Submitted:
    """The dataset, its task and the job embedding it (unless one exists or is under way),
    which ranks the task with ``prerank`` (methods that need the images) before it ends.
    Commits: a new job is committed and sent (``queue.send``); otherwise the unit of work
    ends here too, so a caller that then waits on the job holds no connection.
    ``callback_url`` is called when the job ends (an existing job's: ``jobs.follow``)."""
    stored = stored.keep()  # in place (and shared) before the row naming it commits
    objects.share(settings, stored.path)
    for attempt in range(2):  # a concurrent identical upload may win the unique constraint
        try:
            dataset = _dataset_row(session, stored, filename, data, tenant)
            task = _task_row(session, dataset, config)
            job = session.scalar(
                select(Job)
                .where(Job.task_id == task.id, Job.kind == JobKind.embed)
                .where(Job.status != JobStatus.failed)
                .order_by(Job.created_at.desc())
                .limit(1)
            )
            new = job is None
            if job is None:
                job = jobs.create(
                    session,
                    kind=JobKind.embed,
                    task_id=task.id,
                    tenant=tenant,
                    callback_url=callback_url,
                    prerank=list(prerank),
                )
            elif callback_url is not None:
                jobs.follow(session, job_id=job.id, callback_url=callback_url)
            break
        except IntegrityError:
            session.rollback()
            if attempt:
                raise
    assert job is not None
    if new:
        queue.send(session=session, job=job, broker_url=settings.resolved_broker_url())
    else:
        session.commit()
    return Submitted(task.id, job.id, job.status, new, skipped_view(data), list(data.warnings))
