"""Version 1 of the API for users: upload a dataset, get its neighbours and the ranking of the
zoo's experts (its job: ``app.api.jobs``; the zoo itself: ``app.api.zoo``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.auth import Reader, Writer
from app.api.callbacks import CallbackUrl
from app.api.deps import SessionDep, SettingsDep, ZooDep
from app.api.idempotency import IdempotencyKey, idempotent
from app.api.problems import documented
from app.api.schemas import (
    DatasetOut,
    EmbeddingOut,
    JobAccepted,
    MethodOut,
    Neighbours,
    Ranking,
    TaskAccepted,
    TaskOut,
    TaskPage,
    TaskSummary,
    Timings,
    UploadRanking,
)
from app.api.uploads import Dataset, DatasetUpload, validate
from app.api.waits import Waits, wait_for
from app.db.models import JobStatus
from app.services import tasks, uploads
from app.services.jobs import JobState
from app.services.problems import ProblemError
from app.services.serving import (
    DEFAULT_METHOD,
    FAST_METHODS,
    METHODS,
    PRERANKED,
    WORKER_METHODS,
    ZooState,
)
from app.services.uploads import Submitted
from app.settings import Settings
from app.zoo import recommenders

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 503)
)

K = Annotated[int, Query(ge=1, le=1000, description="how many items to return")]
Limit = Annotated[int, Query(ge=1, le=500, description="how many items a page holds")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


def _known_method(
    method: Annotated[
        str,
        Query(
            description="the ranking method (see docs/quality.md, the table of every method)",
            json_schema_extra={"enum": list(METHODS)},
        ),
    ] = DEFAULT_METHOD,
) -> str:
    if method not in METHODS:
        raise ProblemError(
            422,
            "unknown-method",
            "Unknown recommendation method",
            f"method {method!r} is not one of: {', '.join(METHODS)}",
        )
    return method


#: The ranking method asked for, checked before an upload is stored (a route lists it first).
Method = Annotated[str, Depends(_known_method)]


@router.get("/methods", response_model=list[MethodOut], summary="The ranking methods served")
def methods(_: Reader) -> list[MethodOut]:
    return [
        MethodOut(
            name=m.name,
            summary=m.summary,
            needs=m.needs,
            runs=m.runs,
            default=m.name == DEFAULT_METHOD,
        )
        for m in (recommenders.method(name) for name in METHODS)
    ]


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
    upload: Dataset,
    zoo: ZooState,
    tenant: str,
    callback: str | None,
    prerank: tuple[str, ...] = PRERANKED,
) -> Submitted:
    """Check and register an uploaded dataset under the zoo's embedding configuration; its
    embedding job is sent unless one exists (``callback`` is called when it ends), and ranks
    with ``prerank`` before it ends."""
    config = zoo.zoo.embed_config
    data = await validate(request, settings, upload, config.image_size, tenant)
    return await run_in_threadpool(
        uploads.register,
        session,
        settings=settings,
        stored=upload.stored,
        filename=upload.filename,
        data=data,
        config=config,
        tenant=tenant,
        callback_url=callback,
        prerank=prerank,
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
    callback: CallbackUrl,
    key: IdempotencyKey,
    upload: DatasetUpload,
) -> JSONResponse:
    async def answer() -> JSONResponse:
        submitted = await _submit(request, session, settings, upload, zoo, caller.tenant, callback)
        body = TaskAccepted(
            task_id=submitted.task_id,
            job_id=submitted.job_id,
            status=submitted.job_status,
            skipped=submitted.skipped,
            warnings=submitted.warnings,
            links={
                "job": f"/v1/jobs/{submitted.job_id}",
                "task": f"/v1/tasks/{submitted.task_id}",
            },
        )
        return accepted(submitted.job_id, body)

    parts = {"file": upload.stored.sha256}
    return await idempotent(request, settings, caller.tenant, key, parts, answer)


@router.get("/tasks", response_model=TaskPage, summary="The caller's tasks, newest first")
def list_tasks(
    session: SessionDep, caller: Reader, limit: Limit = 100, offset: Offset = 0
) -> TaskPage:
    total, rows = tasks.page(session, tenant=caller.tenant, limit=limit, offset=offset)
    items = [TaskSummary.model_validate(tasks.summary(task, job)) for task, job in rows]
    return TaskPage(total=total, items=items)


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
    task_id: str,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Reader,
    k: K = 10,
) -> Neighbours:
    embedding = tasks.embedding_of(
        session, task_id=task_id, tenant=caller.tenant, settings=settings
    )
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
    method: Method,
    k: K = 5,
) -> Ranking | JSONResponse:
    """A ranking with a fast method is answered at once; one a worker computes (LogME, the
    hybrid, brute force) is answered from the ranking a worker stored for the task on this zoo
    version (the embedding job stores the default's), or is a job, followed at its link and
    called back at ``callback_url`` if given."""
    if method in WORKER_METHODS:
        stored = tasks.rank_stored(
            session,
            zoo=zoo,
            task_id=task_id,
            method=method,
            k=k,
            tenant=caller.tenant,
            settings=settings,
        )
        if stored is not None:
            return Ranking.model_validate(stored)
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
        session,
        zoo=zoo,
        task_id=task_id,
        method=method,
        k=k,
        tenant=caller.tenant,
        settings=settings,
    )
    return Ranking.model_validate(ranked)


def _failed(job: JobState) -> ProblemError:
    return ProblemError.of(job.error or {}, job=f"/v1/jobs/{job.id}")


async def _now() -> float:
    return time.monotonic()


#: When the route began, before its upload is stored (a dependency listed before the
#: upload's): an upload ranking's timings count from there.
Started = Annotated[float, Depends(_now)]
Wait = Annotated[float, Query(ge=0, description="seconds to wait for the ranking")]


@dataclass(frozen=True)
class _UploadRanking:
    """One ``POST /v1/recommendations``: what its steps share (the caller's, the ranking
    asked for, when it began and when it answers at the latest)."""

    request: Request
    session: Session
    settings: Settings
    zoo: ZooState
    tenant: str
    callback: str | None
    method: str
    k: int
    upload: Dataset
    started: float
    deadline: float

    async def answer(self) -> JSONResponse:
        """The ranking once the upload is embedded, or 202 with the job still running at
        the deadline (the embedding's, or a worker's ranking)."""
        # The embedding job ranks with the method asked for when it needs the images (no
        # second job), and with nothing more when the API answers it from the embedding.
        prerank = (self.method,) if self.method in WORKER_METHODS else ()
        submitted = await _submit(
            self.request,
            self.session,
            self.settings,
            self.upload,
            self.zoo,
            self.tenant,
            self.callback,
            prerank,
        )
        uploaded = time.monotonic()
        job = await self.finished(submitted.job_id)
        if job.status != JobStatus.succeeded:
            return accepted(job.id, JobAccepted(task_id=submitted.task_id, job_id=job.id))
        ranked = await self.rank(submitted.task_id)
        if isinstance(ranked, JSONResponse):
            return ranked
        timings = self.timings(job, uploaded)
        body = UploadRanking.model_validate(
            {
                **ranked,
                "job_id": submitted.job_id,
                "timings": timings,
                "warnings": submitted.warnings,
            }
        )
        # The ranking's row is stored before the answer is recorded for its Idempotency-Key.
        await run_in_threadpool(self.session.commit)
        return JSONResponse(body.model_dump(mode="json", exclude_unset=True))

    async def finished(self, job_id: str) -> JobState:
        """The job once it has succeeded, or as it is at the deadline; a failed job is the
        request's error."""
        job = await wait_for(
            self.settings, job_id, self.tenant, self.deadline, self.request.is_disconnected
        )
        if job.status == JobStatus.failed:
            raise _failed(job)
        return job

    def timings(self, job: JobState, uploaded: float) -> Timings:
        return Timings(
            upload_s=round(uploaded - self.started, 3),
            queue_wait_s=None if job.queue_wait_s is None else round(job.queue_wait_s, 3),
            job_s=None if job.run_s is None else round(job.run_s, 3),
            job_stages=job.timings,
            total_s=round(time.monotonic() - self.started, 3),
        )

    async def rank(self, task_id: str) -> dict[str, object] | JSONResponse:
        """The ranking of the embedded task: in-process, or by a worker job waited for until
        the deadline (202 with the job after it; ``callback`` is called when the job ends)."""
        method, k, tenant = self.method, self.k, self.tenant
        # In-process, or the ranking a worker stored (None: a rank job has to compute it).
        answer = tasks.rank_now if method in FAST_METHODS else tasks.rank_stored
        ranked: dict[str, object] | None = await run_in_threadpool(
            answer,
            self.session,
            zoo=self.zoo,
            task_id=task_id,
            method=method,
            k=k,
            tenant=tenant,
            settings=self.settings,
        )
        if ranked is not None:
            return ranked
        rank_job = await run_in_threadpool(
            tasks.queue_rank,
            self.session,
            settings=self.settings,
            task_id=task_id,
            method=method,
            k=k,
            tenant=tenant,
            callback_url=self.callback,
        )
        job = await self.finished(rank_job.id)
        if job.status != JobStatus.succeeded or job.result is None:
            return accepted(job.id, JobAccepted(task_id=task_id, job_id=job.id))
        return {
            "task_id": task_id,
            "method": method,
            "ranking": job.result["ranking"][:k],
            "novelty": job.result.get("novelty"),
        }


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
    callback: CallbackUrl,
    started: Started,
    method: Method,
    key: IdempotencyKey,
    upload: DatasetUpload,
    k: K = 5,
    wait: Wait = 0.0,
) -> JSONResponse:
    tenant = caller.tenant
    waits: Waits = request.app.state.waits
    # A wait holds a slot of the key's for the whole request; past the cap it does not wait.
    with waits.slot(caller.key_id or tenant, settings.max_waits_per_key) as may_wait:
        deadline = started + (min(wait, settings.max_wait_seconds) if may_wait else 0.0)
        ranking = _UploadRanking(
            request, session, settings, zoo, tenant, callback, method, k, upload, started, deadline
        )
        parts = {"file": upload.stored.sha256}
        return await idempotent(
            request, settings, tenant, key, parts, ranking.answer, ignore=("wait",)
        )
