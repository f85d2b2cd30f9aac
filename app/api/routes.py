"""Version 1 of the API for users: upload a dataset, follow its job, get its neighbours and the
ranking of the zoo's experts (the zoo itself: ``app.api.zoo``)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import jobs
from app.api.auth import Reader, Writer
from app.api.deps import SettingsDep, ZooDep
from app.api.idempotency import idempotent, key_of
from app.api.problems import ProblemError, documented
from app.api.submit import discard_unreferenced, register, send, store_upload
from app.db.models import Job, JobStatus, Recommendation, Task
from app.db.session import session_scope
from app.ranking import FAST_METHODS, METHODS, WORKER_METHODS, ZooState, ranking_items
from app.settings import Settings
from app.storage import StoredFile
from app.task2vec.embedding import Embedding

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 503)
)

Method = Annotated[str, Query(description=f"one of: {', '.join(METHODS)}")]
K = Annotated[int, Query(ge=1, le=1000, description="how many items to return")]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ProblemError(
            422,
            "unknown-method",
            "Unknown recommendation method",
            f"method {method!r} is not one of: {', '.join(METHODS)}",
        )


def _job_view(job: Job) -> dict[str, Any]:
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.task_id:
        links["task"] = f"/v1/tasks/{job.task_id}"
        if job.kind == "embed":
            links["neighbors"] = f"/v1/tasks/{job.task_id}/neighbors"
            links["recommendations"] = f"/v1/tasks/{job.task_id}/recommendations"
    if job.kind == "expert":
        links["expert"] = f"/v1/experts/{job.params['expert']}"
    if job.kind == "zoo-task":
        links["zoo_task"] = f"/v1/zoo/tasks/{job.params['zoo_task']}"
    if job.kind in ("expert", "zoo-task"):
        links["zoo"] = "/v1/zoo"
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": {"stage": job.stage, "fraction": job.progress},
        "task_id": job.task_id,
        "params": job.params,
        "timings": job.timings,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": job.error,
        "result": job.result,
        "links": links,
    }


def _get_job(settings: Settings, job_id: str, tenant: str) -> Job:
    """The tenant's job; another tenant's id answers 404, as if it did not exist."""
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        if job is None or job.tenant != tenant:
            raise ProblemError(404, "not-found", "No such job", f"job {job_id!r} does not exist")
        return job


def _task_view(settings: Settings, task_id: str, tenant: str) -> dict[str, Any]:
    """A plain view of the tenant's task (the session closes before the view is used)."""
    with session_scope(settings.resolved_database_url()) as session:
        task = session.get(Task, task_id)
        if task is None or task.tenant != tenant:
            raise ProblemError(404, "not-found", "No such task", f"task {task_id!r} does not exist")
        d, e = task.dataset, task.embedding
        view = {
            "id": task.id,
            "probe": task.probe,
            "dataset": {
                "sha256": d.sha256,
                "filename": d.filename,
                "bytes": d.bytes,
                "num_images": d.num_images,
                "classes": d.classes,
                "class_counts": d.class_counts,
                "skipped": d.skipped or [],
            },
            "embedding": None
            if e is None
            else {
                "dim": e.dim,
                "difficulty": e.difficulty,
                "seconds": e.seconds,
                "path": e.path,
            },
            "links": {
                "self": f"/v1/tasks/{task.id}",
                "neighbors": f"/v1/tasks/{task.id}/neighbors",
                "recommendations": f"/v1/tasks/{task.id}/recommendations",
            },
        }
        return view


def _embedding(settings: Settings, task_id: str, tenant: str) -> Embedding:
    view = _task_view(settings, task_id, tenant)
    if view["embedding"] is None:
        with session_scope(settings.resolved_database_url()) as session:
            job = session.scalar(
                select(Job).where(Job.task_id == task_id).order_by(Job.created_at.desc())
            )
            where = f"; see /v1/jobs/{job.id} ({job.status})" if job else ""
        raise ProblemError(
            409,
            "embedding-not-ready",
            "The task has no embedding yet",
            f"task {task_id} is still being embedded or its embedding failed{where}",
        )
    return Embedding.load(view["embedding"]["path"])


def _accepted(job_id: str, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.post("/tasks", status_code=202, summary="Upload a labelled dataset to embed")
async def create_task(
    request: Request,
    settings: SettingsDep,
    zoo: ZooDep,
    caller: Writer,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
) -> JSONResponse:
    key = key_of(request)
    stored = await store_upload(file, settings)

    async def answer() -> JSONResponse:
        submitted = await register(
            stored, file.filename or "upload", settings, zoo.zoo.embed_config, caller.tenant
        )
        return _accepted(
            submitted.job_id,
            {
                "task_id": submitted.task_id,
                "job_id": submitted.job_id,
                "status": submitted.job_status,
                "skipped": submitted.skipped,
                "links": {
                    "job": f"/v1/jobs/{submitted.job_id}",
                    "task": f"/v1/tasks/{submitted.task_id}",
                },
            },
        )

    return await idempotent(
        request,
        settings,
        caller.tenant,
        key,
        {"file": stored.sha256},
        answer,
        refused=lambda: discard_unreferenced(settings, stored),
    )


@router.get("/jobs/{job_id}", summary="A job's status, progress, timings, result or error")
def get_job(job_id: str, settings: SettingsDep, caller: Reader) -> dict[str, Any]:
    return _job_view(_get_job(settings, job_id, caller.tenant))


@router.get("/tasks/{task_id}", summary="A task: dataset, probe, embedding")
def get_task(task_id: str, settings: SettingsDep, caller: Reader) -> dict[str, Any]:
    view = _task_view(settings, task_id, caller.tenant)
    if view["embedding"] is not None:
        view["embedding"].pop("path")
    return view


@router.get("/tasks/{task_id}/neighbors", summary="Nearest zoo tasks (symmetric distance)")
def neighbours(
    task_id: str, settings: SettingsDep, zoo: ZooDep, caller: Reader, k: K = 10
) -> dict[str, Any]:
    embedding = _embedding(settings, task_id, caller.tenant)
    return {"task_id": task_id, "neighbors": zoo.neighbours(embedding, k)}


def _rank_now(
    settings: Settings, zoo: ZooState, task_id: str, method: str, k: int, tenant: str
) -> dict[str, Any]:
    embedding = _embedding(settings, task_id, tenant)
    started = time.perf_counter()
    ranking = ranking_items(zoo.rank(method, embedding), k)
    seconds = time.perf_counter() - started
    with session_scope(settings.resolved_database_url()) as session:
        session.add(
            Recommendation(
                tenant=tenant,
                task_id=task_id,
                method=method,
                ranking=ranking,
                index_version_id=zoo.version.id,
            )
        )
    return {
        "task_id": task_id,
        "method": method,
        "ranking": ranking,
        "seconds": round(seconds, 6),
        "zoo_version": zoo.version.content,
    }


def _queue_rank(settings: Settings, task_id: str, method: str, k: int, tenant: str) -> Job:
    _embedding(settings, task_id, tenant)  # 409 until the embedding exists
    with session_scope(settings.resolved_database_url()) as session:
        job = jobs.create(session, "rank", task_id, tenant=tenant, method=method, k=k)
    send(settings, job.id)
    return job


@router.get("/tasks/{task_id}/recommendations", summary="The zoo's experts, ranked for the task")
def recommendations(
    task_id: str,
    settings: SettingsDep,
    zoo: ZooDep,
    caller: Reader,
    k: K = 5,
    method: Method = "learned",
) -> Any:
    _check_method(method)
    if method in WORKER_METHODS:
        if "tasks:write" not in caller.scopes:
            raise ProblemError(
                403,
                "insufficient-scope",
                "The API key lacks a scope",
                f"ranking with {method} queues a worker job: it needs the scope 'tasks:write'",
            )
        job = _queue_rank(settings, task_id, method, k, caller.tenant)
        return _accepted(job.id, {"job_id": job.id, "status": job.status})
    return _rank_now(settings, zoo, task_id, method, k, caller.tenant)


async def _wait_for(settings: Settings, job: Job, deadline: float) -> Job:
    while True:
        job = await run_in_threadpool(_get_job, settings, job.id, job.tenant)
        if job.status in (JobStatus.succeeded, JobStatus.failed) or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(0.1)


def _failed(job: Job) -> ProblemError:
    error = job.error or {}
    problem = ProblemError(
        int(error.get("status", 500)),
        str(error.get("type", "")).rsplit("/", 1)[-1] or "job-failed",
        str(error.get("title", "The job failed")),
        str(error.get("detail", "")),
        job=f"/v1/jobs/{job.id}",
    )
    return problem


@router.post("/recommendations", summary="Upload a dataset and get the ranking in one call")
async def recommend_upload(
    request: Request,
    settings: SettingsDep,
    zoo: ZooDep,
    caller: Writer,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
    k: K = 5,
    method: Method = "learned",
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the ranking")] = 0.0,
) -> Any:
    _check_method(method)
    started = time.monotonic()
    key = key_of(request)
    stored = await store_upload(file, settings)

    async def answer() -> JSONResponse:
        return await _recommend(
            settings,
            zoo,
            caller.tenant,
            stored,
            file.filename or "upload",
            k,
            method,
            wait,
            started,
        )

    return await idempotent(
        request,
        settings,
        caller.tenant,
        key,
        {"file": stored.sha256},
        answer,
        refused=lambda: discard_unreferenced(settings, stored),
        ignore=("wait",),
    )


async def _recommend(
    settings: Settings,
    zoo: ZooState,
    tenant: str,
    stored: StoredFile,
    filename: str,
    k: int,
    method: str,
    wait: float,
    started: float,
) -> JSONResponse:
    deadline = started + min(wait, settings.max_wait_seconds)
    submitted = await register(stored, filename, settings, zoo.zoo.embed_config, tenant)
    uploaded = time.monotonic()
    job = await run_in_threadpool(_get_job, settings, submitted.job_id, tenant)
    job = await _wait_for(settings, job, deadline)
    if job.status == JobStatus.failed:
        raise _failed(job)
    if job.status != JobStatus.succeeded:
        return _accepted(job.id, {"task_id": submitted.task_id, "job_id": job.id})
    if method in FAST_METHODS:
        body = await run_in_threadpool(
            _rank_now, settings, zoo, submitted.task_id, method, k, tenant
        )
    else:
        rank_job = await run_in_threadpool(
            _queue_rank, settings, submitted.task_id, method, k, tenant
        )
        rank_job = await _wait_for(settings, rank_job, deadline)
        if rank_job.status == JobStatus.failed:
            raise _failed(rank_job)
        if rank_job.status != JobStatus.succeeded:
            return _accepted(rank_job.id, {"task_id": submitted.task_id, "job_id": rank_job.id})
        assert rank_job.result is not None
        body = {
            "task_id": submitted.task_id,
            "method": method,
            "ranking": rank_job.result["ranking"][:k],
        }
    body["job_id"] = submitted.job_id
    queue_wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    run = (
        (job.finished_at - job.started_at).total_seconds()
        if job.finished_at and job.started_at
        else None
    )
    body["timings"] = {
        "upload_s": round(uploaded - started, 3),
        "queue_wait_s": None if queue_wait is None else round(queue_wait, 3),
        "job_s": None if run is None else round(run, 3),
        "job_stages": job.timings,
        "total_s": round(time.monotonic() - started, 3),
    }
    return JSONResponse(body)
