"""Version 1 of the API for users: upload a dataset, get its neighbours and the ranking of the
zoo's experts (its job: ``app.api.jobs``; the zoo itself: ``app.api.zoo``)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.auth import Reader, Writer
from app.api.callbacks import CallbackUrl
from app.api.deps import SessionDep, SettingsDep, ZooDep
from app.api.idempotency import idempotent, key_of
from app.api.problems import documented
from app.api.schemas import (
    DatasetOut,
    EmbeddingOut,
    JobAccepted,
    Neighbours,
    Ranking,
    TaskAccepted,
    TaskOut,
    Timings,
    UploadRanking,
)
from app.api.uploads import store_upload, validate
from app.api.waits import Waits, wait_for
from app.db.models import JobStatus
from app.services import tasks, uploads
from app.services.jobs import JobState
from app.services.layout import DataLayout
from app.services.problems import ProblemError
from app.services.serving import FAST_METHODS, METHODS, WORKER_METHODS, ZooState
from app.services.storage import StoredFile
from app.services.uploads import Submitted
from app.settings import Settings

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


def accepted(job_id: str, body: BaseModel) -> JSONResponse:
    """202 with the job to follow (fields left unset are left out)."""
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}"},
    )


async def _submit(
    request: Request,
    session: Session,
    settings: Settings,
    stored: StoredFile,
    file: UploadFile,
    zoo: ZooState,
    tenant: str,
    callback: str | None,
) -> Submitted:
    """Check and register a stored upload under the zoo's embedding configuration; its
    embedding job is sent unless one exists (``callback`` is called when it ends)."""
    filename, config = uploads.safe_filename(file.filename), zoo.zoo.embed_config
    data = await validate(request, settings, stored, filename, config.image_size)
    return await run_in_threadpool(
        uploads.register,
        session,
        settings=settings,
        stored=stored,
        filename=filename,
        data=data,
        config=config,
        tenant=tenant,
        callback_url=callback,
    )


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskAccepted,
    summary="Upload a labelled dataset to embed",
)
async def create_task(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Writer,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
    callback: CallbackUrl,
) -> JSONResponse:
    key = key_of(request)
    stored = await store_upload(file, DataLayout.of(settings).uploads, settings.max_upload_bytes)

    async def answer() -> JSONResponse:
        submitted = await _submit(
            request, session, settings, stored, file, zoo, caller.tenant, callback
        )
        body = TaskAccepted(
            task_id=submitted.task_id,
            job_id=submitted.job_id,
            status=submitted.job_status,
            skipped=submitted.skipped,
            links={
                "job": f"/v1/jobs/{submitted.job_id}",
                "task": f"/v1/tasks/{submitted.task_id}",
            },
        )
        return accepted(submitted.job_id, body)

    try:
        return await idempotent(
            request, settings, caller.tenant, key, {"file": stored.sha256}, answer
        )
    finally:
        stored.discard()  # the request's own file, unless its row took it


@router.get("/tasks/{task_id}", response_model=TaskOut, summary="A task: dataset, probe, embedding")
def get_task(task_id: str, session: SessionDep, caller: Reader) -> TaskOut:
    task = tasks.get(session, task_id=task_id, tenant=caller.tenant)
    d, e = task.dataset, task.embedding
    return TaskOut(
        id=task.id,
        probe=task.probe,
        dataset=DatasetOut(
            sha256=d.sha256,
            filename=d.filename,
            bytes=d.bytes,
            num_images=d.num_images,
            classes=d.classes,
            class_counts=d.class_counts,
            skipped=d.skipped or [],
        ),
        embedding=None
        if e is None
        else EmbeddingOut(dim=e.dim, difficulty=e.difficulty, seconds=e.seconds),
        links={
            "self": f"/v1/tasks/{task.id}",
            "neighbors": f"/v1/tasks/{task.id}/neighbors",
            "recommendations": f"/v1/tasks/{task.id}/recommendations",
        },
    )


@router.get(
    "/tasks/{task_id}/neighbors",
    response_model=Neighbours,
    summary="Nearest zoo tasks (symmetric distance)",
)
def neighbours(
    task_id: str, session: SessionDep, zoo: ZooDep, caller: Reader, k: K = 10
) -> Neighbours:
    embedding = tasks.embedding_of(session, task_id=task_id, tenant=caller.tenant)
    return Neighbours.model_validate(
        {"task_id": task_id, "neighbors": zoo.neighbours(embedding, k)}
    )


@router.get(
    "/tasks/{task_id}/recommendations",
    response_model=Ranking,
    responses={202: {"model": JobAccepted, "description": "Ranked by a worker: follow the job"}},
    summary="The zoo's experts, ranked for the task",
)
def recommendations(
    task_id: str,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Reader,
    callback: CallbackUrl,
    k: K = 5,
    method: Method = "learned",
) -> Ranking | JSONResponse:
    """A ranking with a fast method is answered at once; one a worker computes (LogME, brute
    force) is a job, followed at its link and called back at ``callback_url`` if given."""
    _check_method(method)
    if method in WORKER_METHODS:
        if "tasks:write" not in caller.scopes:
            raise ProblemError(
                403,
                "insufficient-scope",
                "The API key lacks a scope",
                f"ranking with {method} queues a worker job: it needs the scope 'tasks:write'",
            )
        job = tasks.queue_rank(
            session,
            settings=settings,
            task_id=task_id,
            method=method,
            k=k,
            tenant=caller.tenant,
            callback_url=callback,
        )
        return accepted(job.id, JobAccepted(job_id=job.id, status=job.status))
    ranked = tasks.rank_now(
        session, zoo=zoo, task_id=task_id, method=method, k=k, tenant=caller.tenant
    )
    return Ranking.model_validate(ranked)


def _failed(job: JobState) -> ProblemError:
    return ProblemError.of(job.error or {}, job=f"/v1/jobs/{job.id}")


@router.post(
    "/recommendations",
    response_model=UploadRanking,
    responses={
        202: {"model": JobAccepted, "description": "Not ranked within wait: follow the job"}
    },
    summary="Upload a dataset and get the ranking in one call",
)
async def recommend_upload(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Writer,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
    callback: CallbackUrl,
    k: K = 5,
    method: Method = "learned",
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the ranking")] = 0.0,
) -> JSONResponse:
    _check_method(method)
    started = time.monotonic()
    key = key_of(request)
    stored = await store_upload(file, DataLayout.of(settings).uploads, settings.max_upload_bytes)
    tenant = caller.tenant
    waits: Waits = request.app.state.waits
    # A wait holds a slot of the key's for the whole request; past the cap it does not wait.
    with waits.slot(caller.key_id or tenant, settings.max_waits_per_key) as may_wait:
        deadline = started + (min(wait, settings.max_wait_seconds) if may_wait else 0.0)

        async def answer() -> JSONResponse:
            submitted = await _submit(
                request, session, settings, stored, file, zoo, tenant, callback
            )
            uploaded = time.monotonic()
            job = await wait_for(
                settings, submitted.job_id, tenant, deadline, request.is_disconnected
            )
            if job.status == JobStatus.failed:
                raise _failed(job)
            if job.status != JobStatus.succeeded:
                return accepted(job.id, JobAccepted(task_id=submitted.task_id, job_id=job.id))
            ranked = await _rank(
                request,
                session,
                settings,
                zoo,
                submitted.task_id,
                method,
                k,
                tenant,
                deadline,
                callback,
            )
            if isinstance(ranked, JSONResponse):
                return ranked
            timings = Timings(
                upload_s=round(uploaded - started, 3),
                queue_wait_s=None if job.queue_wait_s is None else round(job.queue_wait_s, 3),
                job_s=None if job.run_s is None else round(job.run_s, 3),
                job_stages=job.timings,
                total_s=round(time.monotonic() - started, 3),
            )
            body = UploadRanking.model_validate(
                {**ranked, "job_id": submitted.job_id, "timings": timings}
            )
            # The ranking's row is stored before the answer is recorded for its Idempotency-Key.
            await run_in_threadpool(session.commit)
            return JSONResponse(body.model_dump(mode="json", exclude_unset=True))

        try:
            return await idempotent(
                request, settings, tenant, key, {"file": stored.sha256}, answer, ignore=("wait",)
            )
        finally:
            stored.discard()  # the request's own file, unless its row took it


async def _rank(
    request: Request,
    session: Session,
    settings: Settings,
    zoo: ZooState,
    task_id: str,
    method: str,
    k: int,
    tenant: str,
    deadline: float,
    callback: str | None,
) -> dict[str, object] | JSONResponse:
    """The ranking of an embedded task: in-process, or by a worker job waited for until
    ``deadline`` (202 with the job after it; ``callback`` is called when the job ends)."""
    if method in FAST_METHODS:
        ranked: dict[str, object] = await run_in_threadpool(
            tasks.rank_now, session, zoo=zoo, task_id=task_id, method=method, k=k, tenant=tenant
        )
        return ranked
    rank_job = await run_in_threadpool(
        tasks.queue_rank,
        session,
        settings=settings,
        task_id=task_id,
        method=method,
        k=k,
        tenant=tenant,
        callback_url=callback,
    )
    job = await wait_for(settings, rank_job.id, tenant, deadline, request.is_disconnected)
    if job.status == JobStatus.failed:
        raise _failed(job)
    if job.status != JobStatus.succeeded or job.result is None:
        return accepted(job.id, JobAccepted(task_id=task_id, job_id=job.id))
    return {
        "task_id": task_id,
        "method": method,
        "ranking": job.result["ranking"][:k],
    }
