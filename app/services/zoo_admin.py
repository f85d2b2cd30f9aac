"""Zoo administration: registering an expert or a zoo task (the API's side) and the two jobs
that add it to the zoo (the workers' side).

Registration commits the item as pending with the job that computes its matrix entries, then
sends the job. The worker computes the expert's column or the task's embedding and row, marks
the item ready and publishes a new version; a failure marks the item failed, with why, and
frees its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Expert, Job, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import jobs, objects, queue, weights
from app.services.problems import ProblemError
from app.services.publishing import (
    Progress,
    add_entries,
    current_version,
    publish,
    save_zoo_embedding,
)
from app.services.storage import StoredFile
from app.services.versions import Version
from app.services.zoo_items import (
    KIND,
    Item,
    ItemModel,
    by_name,
    check_free,
    expert_spec,
    ready_ids,
    refuse_taken,
    task_spec,
    what,
    zoo_task_row,
)
from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import ConfigError
from app.zoo.features import load_checked
from app.zoo.tasks import materialize, uploaded_task


def register(
    session: Session,
    *,
    settings: Settings,
    item: Item,
    tenant: str,
    callback_url: str | None = None,
) -> Job:
    """Add a new expert or zoo task with the job that computes its matrix entries, commit,
    and send the job (``callback_url`` is called when it ends). A failed item of the same
    name is replaced, with its entries; if the job cannot be sent, the item fails with it
    (committed), freeing its name."""
    model: ItemModel = Expert if isinstance(item, Expert) else ZooTask
    kind, name = KIND[model], item.name
    try:
        old = by_name(session, model, name)
        if old is not None:
            refuse_taken(model, name, old.status)
            column = MatrixEntry.expert_id if model is Expert else MatrixEntry.zoo_task_id
            session.execute(delete(MatrixEntry).where(column == old.id))
            session.delete(old)
            session.flush()
        session.add(item)
        job = jobs.create(
            session,
            kind=kind,
            task_id=None,
            tenant=tenant,
            callback_url=callback_url,
            **{kind.replace("-", "_"): name},
        )
        item.job_id = job.id
        session.flush()
    except IntegrityError:
        detail = f"{what(model)} {name!r} was registered at the same time"
        raise ProblemError(409, f"{kind}-exists", f"The {what(model)} exists", detail) from None
    try:
        queue.send(session=session, job=job, broker_url=settings.resolved_broker_url())
    except ProblemError as exc:
        item.status, item.error = ZooItemStatus.failed, exc.as_problem()
        session.commit()
        raise
    return job


def check_name_free(settings: Settings, *, model: ItemModel, name: str) -> None:
    """409 when the name is taken, in a short transaction of its own: the request's session
    stays unopened while its files are stored and checked."""
    with session_scope(settings.resolved_database_url()) as session:
        check_free(session, model=model, name=name)


@dataclass(frozen=True)
class NewZooTask:
    """A zoo task as a client describes it, besides its dataset."""

    name: str
    domain: str | None = None


def register_task(
    session: Session,
    *,
    settings: Settings,
    task: NewZooTask,
    stored: StoredFile,
    data: LabelledImages,
    tenant: str,
    callback_url: str | None = None,
) -> Job:
    """Register an uploaded dataset, checked (``data``), as a zoo task used whole."""
    domain = (task.domain or "").strip()[:64] or None
    spec = uploaded_task(task.name, str(stored.final), data, domain)
    # in place (and shared) before the row naming it commits
    objects.share(settings, stored.keep().path)
    return register(
        session,
        settings=settings,
        item=zoo_task_row(spec),
        tenant=tenant,
        callback_url=callback_url,
    )


def _mark(settings: Settings, model: ItemModel, name: str, **values: Any) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        row = by_name(session, model, name)
        if row is None:
            raise LookupError(f"{model.__tablename__}: no row named {name!r}")
        for key, value in values.items():
            setattr(row, key, value)


def evaluate_expert(settings: Settings, name: str, progress: Progress | None = None) -> Version:
    """A registered expert's column of the matrix on every ready zoo task, then a new version.

    Remote weights are downloaded first; weights that do not load fail the expert.
    """
    with session_scope(settings.resolved_database_url()) as session:
        row = by_name(session, Expert, name)
        if not isinstance(row, Expert):
            raise LookupError(f"no expert named {name!r}")
        spec, expert_id = expert_spec(row), row.id
        tasks = ready_ids(session, ZooTask)
        have = set(
            session.scalars(
                select(MatrixEntry.zoo_task_id).where(MatrixEntry.expert_id == expert_id)
            )
        )
    spec = objects.local_expert(settings, spec)  # fetched outside the session
    if weights.remote(spec.weights):
        if progress is not None:
            progress("downloading weights", 0, 1)
        fetched = weights.fetch(settings, spec.weights)
        try:  # weights that do not load or run fail here, and their file goes with them
            load_checked(replace(spec, weights=str(fetched)))
            stored = weights.store(settings, fetched)
        finally:
            fetched.unlink(missing_ok=True)
        _mark(settings, Expert, name, weights=str(stored))
    else:
        load_checked(spec)  # an expert that does not load or run fails here, before any entry
    add_entries(settings, [(t, expert_id) for t in tasks if t not in have], progress)
    _mark(settings, Expert, name, status=ZooItemStatus.ready, error=None)
    return publish(settings, progress=progress)


def add_zoo_task(
    settings: Settings,
    name: str,
    embed_task: Callable[[LabelledImages, EmbedConfig], Embedding],
    progress: Progress | None = None,
) -> Version:
    """A new zoo task's embedding and its row of the matrix (every ready expert), then a new
    version. ``embed_task(data, config)`` is the worker's embedding with its loaded probe."""
    version = current_version(settings)
    if version is None:
        raise ConfigError("the zoo has no published version to add to")
    with session_scope(settings.resolved_database_url()) as session:
        row = by_name(session, ZooTask, name)
        if not isinstance(row, ZooTask):
            raise LookupError(f"no zoo task named {name!r}")
        spec, task_id = task_spec(row), row.id
    data = materialize(
        objects.local_task(settings, spec),
        image_size=version.embed_config.image_size,
        split=version.protocol.split,
    )
    embedding = embed_task(data, version.embed_config)
    embedding.meta["task"] = spec.name
    path = save_zoo_embedding(settings, spec, embedding)
    _mark(settings, ZooTask, name, embedding_path=str(path))
    with session_scope(settings.resolved_database_url()) as session:
        experts = ready_ids(session, Expert)
        have = set(
            session.scalars(select(MatrixEntry.expert_id).where(MatrixEntry.zoo_task_id == task_id))
        )
    add_entries(settings, [(task_id, e) for e in experts if e not in have], progress)
    _mark(settings, ZooTask, name, status=ZooItemStatus.ready, error=None)
    return publish(settings, progress=progress)


def fail_item(settings: Settings, model: ItemModel, name: str, error: dict[str, Any]) -> None:
    """A job for an expert or zoo task failed: the item stays out of the zoo, with why.

    An item already in the current version stays ready (a redelivered job that failed must
    not take it out); one marked ready whose publish then failed is failed, so later versions
    leave it out and its name can be registered again."""
    version = current_version(settings)
    of = "experts" if model is Expert else "tasks"
    served = set() if version is None else objects.local_version(settings, version).names(of)
    with session_scope(settings.resolved_database_url()) as session:
        row = by_name(session, model, name)
        if row is not None and not (row.status == ZooItemStatus.ready and name in served):
            row.status, row.error = ZooItemStatus.failed, error
