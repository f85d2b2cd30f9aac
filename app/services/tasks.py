"""A user's tasks after upload: their embeddings, and the rankings served for them.

Every ranking served is recorded (method, zoo version, the experts in order), once: a worker's
ranking once per job, however often the job runs; an in-process ranking once per task, method
and zoo version, when it is first computed. A ranking is a pure function of those three, so a
row per read would store the same answer again, and a write on every read would make reads
queue behind one another on the database (SQLite takes one writer at a time). Reads are
counted by the metrics instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from app.db.models import EmbeddingRow, Job, Recommendation, Task
from app.db.session import newest_page
from app.services import jobs, objects, queue
from app.services.cache import LRUCache
from app.services.jobs import JobKind
from app.services.problems import ProblemError, not_found
from app.services.serving import ZooState, ranking_items
from app.settings import Settings
from app.task2vec.embedding import Embedding, difficulty


def get(session: Session, *, task_id: str, tenant: str) -> Task:
    """The tenant's task; another tenant's id is not found, as if it did not exist."""
    task = session.get(Task, task_id)
    if task is None or task.tenant != tenant:
        raise not_found("task", task_id)
    return task


def page(
    session: Session, *, tenant: str, limit: int, offset: int
) -> tuple[int, list[tuple[Task, Job | None]]]:
    """One page of the tenant's tasks, newest first (ties by id, so pages never overlap),
    each with its newest embedding job (None for a task that has none), and how many the
    tenant has. Two queries whatever the page's size: the tasks, then their jobs."""
    total, rows = newest_page(session, Task, tenant=tenant, limit=limit, offset=offset)
    newest: dict[str, Job] = {}
    if rows:
        found = session.scalars(
            select(Job)
            .where(
                Job.task_id.in_([t.id for t in rows]),
                Job.tenant == tenant,
                Job.kind == JobKind.embed,
            )
            .order_by(Job.created_at, Job.id)
        )
        newest = {job.task_id: job for job in found if job.task_id is not None}
    return total, [(t, newest.get(t.id)) for t in rows]


def summary(task: Task, job: Job | None) -> dict[str, Any]:
    """A task as ``GET /v1/tasks`` lists it, with its newest embedding job (``page``)."""
    d = task.dataset
    links = {"self": f"/v1/tasks/{task.id}"}
    if job is not None:
        links["job"] = f"/v1/jobs/{job.id}"
    links["recommendations"] = f"/v1/tasks/{task.id}/recommendations"
    # A task without a job row is embedded when its embedding's row says so.
    status = job.status if job is not None else ("succeeded" if task.embedding else None)
    return {
        "id": task.id,
        "created_at": task.created_at.isoformat(),
        "filename": d.filename,
        "num_images": d.num_images,
        "num_classes": None if d.classes is None else len(d.classes),
        "status": status,
        "job_id": None if job is None else job.id,
        "links": links,
    }


#: Embeddings read in this process, with their task's tenant: neither changes once stored.
EMBEDDINGS: LRUCache[str, tuple[str, Embedding]] = LRUCache(1024)


def embedding_of(
    session: Session, *, task_id: str, tenant: str, settings: Settings | None = None
) -> Embedding:
    """The task's embedding; 409 until it exists (naming the job that makes it). One this
    process read before is answered from memory, without the database. ``settings``: the
    process's, whose object store the embedding is fetched from (without them, the path its
    row records is read as it is)."""
    kept = EMBEDDINGS.get(task_id)
    if kept is not None:
        if kept[0] != tenant:
            raise not_found("task", task_id)
        return kept[1]
    task = get(session, task_id=task_id, tenant=tenant)
    if task.embedding is not None:
        path = task.embedding.path
        embedding = Embedding.load(path if settings is None else objects.local(settings, path))
        EMBEDDINGS.put(task_id, (task.tenant, embedding))
        return embedding
    job = session.scalar(select(Job).where(Job.task_id == task_id).order_by(Job.created_at.desc()))
    where = f"; see /v1/jobs/{job.id} ({job.status})" if job else ""
    raise ProblemError(
        409,
        "embedding-not-ready",
        "The task has no embedding yet",
        f"task {task_id} is still being embedded or its embedding failed{where}",
    )


def embedding_row(session: Session, *, task_id: str) -> EmbeddingRow | None:
    row: EmbeddingRow | None = session.scalar(
        select(EmbeddingRow).where(EmbeddingRow.task_id == task_id)
    )
    return row


def save_embedding(
    session: Session, *, task_id: str, path: Path, embedding: Embedding, seconds: float
) -> None:
    """Record a task's embedding, written at ``path`` (once: a row that exists is kept)."""
    if embedding_row(session, task_id=task_id) is not None:
        return
    session.add(
        EmbeddingRow(
            task_id=task_id,
            path=str(path),
            dim=embedding.dim,
            difficulty=difficulty(embedding),
            seconds=round(seconds, 3),
            meta=embedding.meta,
        )
    )


def record_ranking(
    session: Session,
    *,
    tenant: str,
    task_id: str,
    method: str,
    ranking: list[dict[str, Any]],
    version_id: int,
    job_id: str | None = None,
) -> None:
    """Record a ranking served, once: a rank job's however often the job runs; an
    in-process one (no job) once per task, method and zoo version, whichever process or
    request computed it first."""
    if job_id is not None:
        same = Recommendation.job_id == job_id
    else:
        same = and_(
            Recommendation.task_id == task_id,
            Recommendation.method == method,
            Recommendation.index_version_id == version_id,
            Recommendation.job_id.is_(None),
        )
    if session.scalar(select(Recommendation.id).where(same).limit(1)) is not None:
        return
    session.add(
        Recommendation(
            tenant=tenant,
            task_id=task_id,
            method=method,
            ranking=ranking,
            index_version_id=version_id,
            job_id=job_id,
        )
    )


def rank_now(
    session: Session,
    *,
    zoo: ZooState,
    task_id: str,
    method: str,
    k: int,
    tenant: str,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Rank with a method the API answers in-process; a ranking computed now is recorded
    (its whole order: ``k`` only cuts the answer; ``record_ranking`` keeps it once)."""
    embedding = embedding_of(session, task_id=task_id, tenant=tenant, settings=settings)
    started = time.perf_counter()
    ranked, computed = zoo.ranking(task_id, method, embedding)
    seconds = time.perf_counter() - started
    if computed:
        record_ranking(
            session,
            tenant=tenant,
            task_id=task_id,
            method=method,
            ranking=ranking_items(ranked, len(ranked)),
            version_id=zoo.version.id,
        )
    return {
        "task_id": task_id,
        "method": method,
        "ranking": ranking_items(ranked, k),
        "novelty": zoo.assess(embedding),
        "seconds": round(seconds, 6),
        "cached": not computed,
        "zoo_version": zoo.version.content,
    }


def stored_ranking(
    session: Session, *, task_id: str, method: str, version_id: int
) -> list[dict[str, Any]] | None:
    """The whole ranking recorded for the task by ``method`` on zoo version ``version_id``
    (the newest, where a job ran again), or None."""
    items: list[dict[str, Any]] | None = session.scalar(
        select(Recommendation.ranking)
        .where(
            Recommendation.task_id == task_id,
            Recommendation.method == method,
            Recommendation.index_version_id == version_id,
        )
        .order_by(Recommendation.id.desc())
        .limit(1)
    )
    return items


def rank_stored(
    session: Session,
    *,
    zoo: ZooState,
    task_id: str,
    method: str,
    k: int,
    tenant: str,
    settings: Settings | None = None,
) -> dict[str, Any] | None:
    """The answer of a method that needs the images, when a worker has ranked the task with it
    on the served zoo version already (the embedding job ranks with the default method), or
    None: a rank job has to compute it."""
    embedding = embedding_of(session, task_id=task_id, tenant=tenant, settings=settings)
    started = time.perf_counter()
    items = stored_ranking(session, task_id=task_id, method=method, version_id=zoo.version.id)
    if items is None:
        return None
    return {
        "task_id": task_id,
        "method": method,
        "ranking": items[:k],
        "novelty": zoo.assess(embedding),
        "seconds": round(time.perf_counter() - started, 6),
        "cached": True,
        "zoo_version": zoo.version.content,
    }


def queue_rank(
    session: Session,
    *,
    settings: Settings,
    task_id: str,
    method: str,
    k: int,
    tenant: str,
    callback_url: str | None = None,
) -> Job:
    """A worker job ranking with a method that needs the images; 409 until the embedding
    exists. The job is committed and sent; ``callback_url`` is called when it ends. While a
    job ranking the task with ``method`` is queued or running, that one is the answer (it
    computes the whole order, whatever ``k``): reads racing the first do not each start one."""
    embedding_of(session, task_id=task_id, tenant=tenant, settings=settings)
    under_way = session.scalars(
        select(Job)
        .where(Job.task_id == task_id, Job.tenant == tenant, Job.kind == JobKind.rank)
        .where(Job.status.in_(jobs.ACTIVE))
        .order_by(Job.created_at)
    )
    for running in under_way:
        if running.params.get("method") == method:
            if callback_url is not None:
                jobs.follow(session, job_id=running.id, callback_url=callback_url)
            return running
    job = jobs.create(
        session,
        kind=JobKind.rank,
        task_id=task_id,
        tenant=tenant,
        callback_url=callback_url,
        method=method,
        k=k,
    )
    queue.send(session=session, job=job, broker_url=settings.resolved_broker_url())
    return job
