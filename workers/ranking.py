"""What the worker ranks with: the task's images, one recorded ranking (a rank job's, or one
the embedding job adds), and the rankings an embedding job records before it ends (the
methods its upload asked for that need the images: by default ``PRERANKED``), so that their
answer is stored when the embedding is and no second job has to run for it."""

from __future__ import annotations

from typing import Any

from app.db.session import session_scope
from app.services import objects, tasks
from app.services.jobs import JobRecorder
from app.services.serving import ZooState, ranking_items
from app.settings import Settings
from app.task2vec.datasets import LabelledImages, load_dataset
from app.task2vec.embedding import Embedding


def dataset(settings: Settings, state: ZooState, dataset_path: str) -> LabelledImages:
    return load_dataset(
        objects.local(settings, dataset_path),
        image_size=state.zoo.embed_config.image_size,
        limits=settings.dataset_limits(),
    )


def rank_and_record(
    recorder: JobRecorder,
    url: str,
    state: ZooState,
    task: tuple[str, str],
    method: str,
    embedding: Embedding,
    data: LabelledImages,
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """The task's (id, tenant) whole ranking by ``method``, recorded under the job's lease
    (``job_id``: a rank job's own, None for a ranking the embedding job adds)."""
    task_id, tenant = task
    recorder.stage(f"ranking ({method})")
    items = ranking_items(state.rank(method, embedding, data), len(state.zoo.experts))
    with session_scope(url) as session:
        recorder.hold(session)
        tasks.record_ranking(
            session,
            tenant=tenant,
            task_id=task_id,
            method=method,
            ranking=items,
            version_id=state.version.id,
            job_id=job_id,
        )
    return items


def prerank(
    recorder: JobRecorder,
    settings: Settings,
    state: ZooState,
    task: tuple[str, str, str],
    embedding: Embedding,
    data: LabelledImages | None,
    methods: tuple[str, ...],
) -> list[str]:
    """Rank the task (id, tenant, dataset path) with ``methods`` while the job has its images,
    and record each ranking, so that their answer is there when the embedding is. A method
    already recorded for this zoo version (an earlier attempt's) is skipped."""
    task_id, tenant, dataset_path = task
    url = settings.resolved_database_url()
    for method in methods:
        with session_scope(url) as session:
            stored = tasks.stored_ranking(
                session, task_id=task_id, method=method, version_id=state.version.id
            )
        if stored is None:
            if data is None:
                data = dataset(settings, state, dataset_path)
            rank_and_record(recorder, url, state, (task_id, tenant), method, embedding, data)
    return list(methods)
