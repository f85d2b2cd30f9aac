"""The zoo over HTTP: its experts and tasks, the version being served, and zoo management.

Reads come from the database (every expert and zoo task, with its status: pending, ready or
failed) joined with the version this process serves (errors, best experts). Writes — a new
expert, a new zoo task — store their files, commit a row and a job, and return 202: a worker
computes the matrix entries and publishes a new version, which the API then swaps in.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.api.auth import Admin, CallerDep, lacking
from app.api.callbacks import CallbackUrl
from app.api.deps import SessionDep, SettingsDep, ZooDep
from app.api.forms import ExpertForm, ZooTaskForm
from app.api.idempotency import IdempotencyKey, idempotent
from app.api.problems import documented
from app.api.schemas import (
    ExpertOut,
    ExpertPage,
    ItemAccepted,
    ZooDistances,
    ZooMap,
    ZooMatrix,
    ZooOut,
    ZooTaskOut,
    ZooTaskPage,
)
from app.api.tasks import accepted
from app.api.uploads import DatasetUpload, WeightsUpload, validate
from app.db.models import Expert, ZooTask
from app.services import experts as new_experts
from app.services import tasks as user_tasks
from app.services import thumbnails, zoo_admin, zoo_items, zoo_views
from app.services.problems import public
from app.services.serving import ZooState
from app.zoo.experts import parameter_count

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 503)
)

Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


def _links(kind: str, name: str, job_id: str | None) -> dict[str, str]:
    links = {"self": f"/v1/{kind}/{name}"}
    if job_id:
        links["job"] = f"/v1/jobs/{job_id}"
    return links


# --------------------------------------------------------------------------------------------
# Reads


@router.get(
    "/zoo",
    response_model=ZooOut,
    summary="The zoo version being served, and what is still being added",
)
def zoo_version(session: SessionDep, zoo: ZooDep, _: CallerDep) -> ZooOut:
    return ZooOut(
        version=zoo.version.content,
        tasks=zoo.version.tasks,
        experts=zoo.version.experts,
        probe=zoo.zoo.probe,
        embedding={"dim": zoo.zoo.index().version.dim, **vars(zoo.zoo.embed_config)},
        protocol=zoo.zoo.protocol.describe(),
        pending=zoo_items.pending(session),
    )


def _expert_view(row: Expert, zoo: ZooState) -> ExpertOut:
    served = [i for i, e in enumerate(zoo.zoo.experts) if e.name == row.name]
    return ExpertOut(
        id=row.name,
        architecture=row.architecture,
        input_size=row.input_size,
        parameters=parameter_count(row.architecture, row.input_size),
        mean=row.mean,
        std=row.std,
        source_task=row.source_task,
        tags=row.tags,
        status=row.status,
        in_served_zoo=bool(served),
        mean_error=float(zoo.zoo.errors[:, served[0]].mean()) if served else None,
        error=public(row.error),
        links=_links("experts", row.name, row.job_id),
    )


def _zoo_task_view(row: ZooTask, zoo: ZooState) -> ZooTaskOut:
    served = [i for i, t in enumerate(zoo.zoo.tasks) if t.name == row.name]
    best = zoo.zoo.experts[zoo.zoo.best_expert(served[0])].name if served else None
    return ZooTaskOut(
        name=row.name,
        domain=row.domain,
        size=row.size,
        classes=row.classes,
        status=row.status,
        in_served_zoo=bool(served),
        best_expert=best,
        error=public(row.error),
        links=_links("zoo/tasks", row.name, row.job_id),
    )


@router.get(
    "/experts",
    response_model=ExpertPage,
    summary="The zoo's experts (paginated), with their status",
)
def experts(
    session: SessionDep, zoo: ZooDep, _: CallerDep, limit: Limit = 100, offset: Offset = 0
) -> ExpertPage:
    total, rows = zoo_items.page(session, Expert, limit=limit, offset=offset)
    return ExpertPage(total=total, items=[_expert_view(r, zoo) for r in rows])


@router.get("/experts/{expert_id}", response_model=ExpertOut, summary="One expert")
def expert(expert_id: str, session: SessionDep, zoo: ZooDep, _: CallerDep) -> ExpertOut:
    return _expert_view(zoo_items.one(session, Expert, expert_id), zoo)


@router.get(
    "/zoo/tasks",
    response_model=ZooTaskPage,
    summary="The zoo's tasks (paginated), with their status",
)
def zoo_tasks(
    session: SessionDep, zoo: ZooDep, _: CallerDep, limit: Limit = 100, offset: Offset = 0
) -> ZooTaskPage:
    total, rows = zoo_items.page(session, ZooTask, limit=limit, offset=offset)
    return ZooTaskPage(total=total, items=[_zoo_task_view(r, zoo) for r in rows])


@router.get("/zoo/tasks/{name}", response_model=ZooTaskOut, summary="One zoo task")
def zoo_task(name: str, session: SessionDep, zoo: ZooDep, _: CallerDep) -> ZooTaskOut:
    return _zoo_task_view(zoo_items.one(session, ZooTask, name), zoo)


@router.get(
    "/zoo/map",
    response_model=ZooMap,
    summary="The zoo's tasks laid out in two dimensions, and a task of yours placed among them",
)
def zoo_map(
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: CallerDep,
    task: Annotated[
        str | None, Query(description="one of your tasks (embedded) to place on the map")
    ] = None,
) -> ZooMap:
    """The layout is computed once per zoo version in each API process; a task is placed on
    it by its symmetric distance to every zoo task (its own data: it needs tasks:read)."""
    placed = None
    if task is not None:
        if "tasks:read" not in caller.scopes:
            raise lacking("tasks:read", caller)
        embedding = user_tasks.embedding_of(
            session, task_id=task, tenant=caller.tenant, settings=settings
        )
        placed = (task, embedding)
    return ZooMap.model_validate(zoo_views.map_view(zoo, placed))


@router.get(
    "/zoo/matrix",
    response_model=ZooMatrix,
    summary="The served zoo's task × expert error matrix",
)
def zoo_matrix(zoo: ZooDep, _: CallerDep) -> ZooMatrix:
    return ZooMatrix.model_validate(zoo_views.matrix_view(zoo))


@router.get(
    "/zoo/distances",
    response_model=ZooDistances,
    summary="The symmetric distance between every two tasks of the served zoo",
)
def zoo_distances(zoo: ZooDep, _: CallerDep) -> ZooDistances:
    """Computed once per zoo version in each API process, with the map."""
    return ZooDistances.model_validate(zoo_views.distances_view(zoo))


@router.get(
    "/zoo/tasks/{name}/thumbnails",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A PNG strip",
        }
    },
    summary="A strip of a served zoo task's images (PNG)",
    # An image for a page to show, not an answer a generated client types: the schema
    # describes JSON answers only (tests/test_architecture.py).
    include_in_schema=False,
)
def zoo_task_thumbnails(
    name: str,
    settings: SettingsDep,
    zoo: ZooDep,
    _: CallerDep,
    n: Annotated[
        int, Query(ge=1, le=thumbnails.MAX_IMAGES, description="how many images to show")
    ] = 6,
) -> Response:
    """``n`` of the task's images, one of each class first, each 48 px square, side by side.
    A private cache may keep it for an hour: it changes only with the zoo version."""
    png = thumbnails.strip(settings, zoo, name, n)
    headers = {"Cache-Control": "private, max-age=3600"}
    return Response(png, media_type="image/png", headers=headers)


# --------------------------------------------------------------------------------------------
# Zoo management


def _accepted(kind: str, name: str, job_id: str, status: str) -> JSONResponse:
    links = {"self": f"/v1/{kind}/{name}", "job": f"/v1/jobs/{job_id}"}
    return accepted(job_id, ItemAccepted(name=name, job_id=job_id, status=status, links=links))


@router.post(
    "/experts",
    status_code=202,
    response_model=ItemAccepted,
    summary="Register an expert and evaluate it on every zoo task (admin)",
)
async def register_expert(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Admin,
    callback: CallbackUrl,
    form: ExpertForm,
    key: IdempotencyKey,
    upload: WeightsUpload,
) -> JSONResponse:
    where = await run_in_threadpool(new_experts.weights_at, settings, form, upload)

    async def answer() -> JSONResponse:
        job = await run_in_threadpool(
            partial(
                new_experts.register,
                session,
                settings=settings,
                expert=form,
                where=where,
                upload=upload,
                zoo=zoo,
                tenant=caller.tenant,
                callback_url=callback,
            )
        )
        return _accepted("experts", form.name, job.id, job.status)

    fields = {k: v for k, v in asdict(form).items() if k != "weights_uri"} | {"weights": where}
    return await idempotent(request, settings, caller.tenant, key, fields, answer)


@router.post(
    "/zoo/tasks",
    status_code=202,
    response_model=ItemAccepted,
    summary="Add a labelled dataset to the zoo: its embedding and matrix row (admin)",
)
async def add_zoo_task(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    zoo: ZooDep,
    caller: Admin,
    callback: CallbackUrl,
    form: ZooTaskForm,
    key: IdempotencyKey,
    upload: DatasetUpload,
) -> JSONResponse:
    async def answer() -> JSONResponse:
        await run_in_threadpool(zoo_admin.check_name_free, settings, model=ZooTask, name=form.name)
        image_size = zoo.zoo.embed_config.image_size
        data = await validate(request, settings, upload, image_size, caller.tenant)
        job = await run_in_threadpool(
            partial(
                zoo_admin.register_task,
                session,
                settings=settings,
                task=form,
                stored=upload.stored,
                data=data,
                tenant=caller.tenant,
                callback_url=callback,
            )
        )
        return _accepted("zoo/tasks", form.name, job.id, job.status)

    fields = {"name": form.name, "domain": form.domain, "file": upload.stored.sha256}
    return await idempotent(request, settings, caller.tenant, key, fields, answer)
