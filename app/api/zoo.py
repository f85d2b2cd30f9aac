"""The zoo over HTTP: its experts and tasks, the version being served, and zoo management.

Reads come from the database (every expert and zoo task, with its status: pending, ready or
failed) joined with the version this process serves (errors, best experts). Writes — a new
expert, a new zoo task — store their files, commit a row and a job, and return 202: a worker
computes the matrix entries and publishes a new version, which the API then swaps in.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.auth import Admin, CallerDep
from app.api.callbacks import CallbackUrl
from app.api.deps import SessionDep, SettingsDep, ZooDep
from app.api.idempotency import idempotent, key_of
from app.api.problems import documented
from app.api.schemas import (
    ExpertOut,
    ExpertPage,
    ItemAccepted,
    ZooOut,
    ZooTaskOut,
    ZooTaskPage,
)
from app.api.tasks import accepted
from app.api.uploads import store_upload, validate
from app.db.models import Expert, ZooTask
from app.db.session import session_scope
from app.services import uploads, zoo_admin, zoo_items
from app.services import weights as expert_weights
from app.services.layout import DataLayout
from app.services.problems import ProblemError, public
from app.services.serving import ZooState
from app.services.storage import WEIGHTS_SUFFIX, StoredFile
from app.settings import Settings
from app.task2vec.errors import Task2VecError
from app.zoo import architectures
from app.zoo.experts import ExpertSpec, default_normalisation, known
from app.zoo.features import load_checked
from app.zoo.tasks import uploaded_task

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 503)
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


def _check_name(what: str, name: str) -> None:
    if not NAME.match(name):
        raise ProblemError(
            422,
            "invalid-name",
            f"Invalid {what} name",
            f"{what} name {name!r}: 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )


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


# --------------------------------------------------------------------------------------------
# Zoo management


def _accepted(kind: str, name: str, job_id: str, status: str) -> JSONResponse:
    links = {"self": f"/v1/{kind}/{name}", "job": f"/v1/jobs/{job_id}"}
    return accepted(job_id, ItemAccepted(name=name, job_id=job_id, status=status, links=links))


def _floats(field: str, raw: str | None, default: tuple[float, float, float]) -> list[float]:
    if raw is None or not raw.strip():
        return list(default)
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ProblemError(
            422, "invalid-expert", "Invalid expert", f"{field}: three comma-separated numbers"
        )
    if field == "std" and min(values) <= 0:
        raise ProblemError(422, "invalid-expert", "Invalid expert", "std: positive numbers only")
    return values


async def _weights(
    settings: Settings, architecture: str, uri: str | None, upload: UploadFile | None
) -> tuple[str, StoredFile | None]:
    """Where the expert's weights will be (a stored upload's content-addressed name, or what
    ``weights_uri`` names), and the upload still under its request's own name."""
    if (uri is None) == (upload is None):
        raise ProblemError(
            422,
            "invalid-expert",
            "Invalid expert",
            "give the weights either as an uploaded file (weights) or as weights_uri",
        )
    if upload is not None:
        root = DataLayout.of(settings).weights
        stored = await store_upload(upload, root, settings.max_upload_bytes, WEIGHTS_SUFFIX)
        return str(stored.final), stored
    assert uri is not None
    return await run_in_threadpool(expert_weights.place, settings, architecture, uri), None


def _check_loads(spec: ExpertSpec) -> None:
    """The expert loads and passes a forward pass on a few images, or 422 with the reason."""
    try:
        load_checked(spec)
    except Task2VecError as exc:
        raise ProblemError(422, "invalid-expert", "The expert does not load", str(exc)) from None


Triple = tuple[float, float, float]


def _normalisation(
    architecture: str, mean: str | None, std: str | None, normalisation: str | None
) -> tuple[Triple, Triple]:
    """The expert's mean and std: as given, the model's own preset, or the default of its
    architecture (ImageNet's; 0.5 for the small networks the service trains)."""
    if normalisation not in (None, "", "imagenet", "preset"):
        detail = f"normalisation {normalisation!r}: 'imagenet' or 'preset'"
        raise ProblemError(422, "invalid-expert", "Invalid expert", detail)
    if normalisation and (mean or std):
        detail = "give either mean and std, or normalisation, not both"
        raise ProblemError(422, "invalid-expert", "Invalid expert", detail)
    try:
        default = (
            architectures.preset_normalisation(architecture)
            if normalisation == "preset"
            else architectures.IMAGENET_NORMALISATION
            if normalisation == "imagenet"
            else default_normalisation(architecture)
        )
    except Task2VecError as exc:
        raise ProblemError(422, "invalid-expert", "Invalid expert", str(exc)) from None
    m, s = _floats("mean", mean, default[0]), _floats("std", std, default[1])
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _check_free(settings: Settings, model: type[Expert] | type[ZooTask], name: str) -> None:
    """409 when the name is taken: a check before anything is stored, in a short transaction
    of its own (the request's session stays unopened while files are stored and checked)."""
    with session_scope(settings.resolved_database_url()) as session:
        zoo_items.check_free(session, model=model, name=name)


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
    name: Annotated[str, Form(description="unique name: letters, digits, '.', '_', '-'")],
    architecture: Annotated[
        str,
        Form(
            max_length=64,
            description="torchvision/<builder>, timm/<name>, torchscript, onnx, "
            "cnn-<width>x<depth>, mlp-<width>x<depth>, or a probe network",
        ),
    ],
    input_size: Annotated[int, Form(ge=8, le=1024, description="input resolution")],
    weights: Annotated[
        UploadFile | None,
        File(
            description="a state_dict (safetensors, or a PyTorch file read weights_only), "
            "a TorchScript archive or an ONNX model"
        ),
    ] = None,
    weights_uri: Annotated[
        str | None,
        Form(
            max_length=1000,
            description="http(s) URL, a path under the weights import folder, or "
            "'imagenet' / 'random:N' for the probe networks",
        ),
    ] = None,
    mean: Annotated[str | None, Form(description="normalisation mean, 'r,g,b'")] = None,
    std: Annotated[str | None, Form(description="normalisation std, 'r,g,b'")] = None,
    normalisation: Annotated[
        str | None,
        Form(
            description="'imagenet' or 'preset' (the model's own, e.g. timm's) instead of mean/std"
        ),
    ] = None,
    source_task: Annotated[str | None, Form(description="the zoo task it was trained on")] = None,
    tags: Annotated[str | None, Form(description="comma-separated tags")] = None,
) -> JSONResponse:
    _check_name("expert", name)
    if not known(architecture):
        detail = (
            f"unknown expert architecture {architecture!r}; use torchvision/<builder>, "
            "timm/<name>, torchscript, onnx, cnn-<width>x<depth>, mlp-<width>x<depth>, "
            "efficientnet_lite0, resnet18 or resnet34"
        )
        raise ProblemError(422, "invalid-expert", "Invalid expert", detail)
    key = key_of(request)
    if key is None:  # 409 before anything is stored (a retry with a key may be a replay)
        await run_in_threadpool(_check_free, settings, Expert, name)
    where, stored = await _weights(settings, architecture, weights_uri, weights)
    fields = {
        "name": name,
        "architecture": architecture,
        "input_size": input_size,
        "weights": where,
        "mean": mean,
        "std": std,
        "normalisation": normalisation,
        "source_task": source_task,
        "tags": tags,
    }

    async def answer() -> JSONResponse:
        await run_in_threadpool(_check_free, settings, Expert, name)
        if source_task and source_task not in {t.name for t in zoo.zoo.tasks}:
            detail = f"source_task {source_task!r} is not a zoo task"
            raise ProblemError(422, "invalid-expert", "Invalid expert", detail)
        spec_mean, spec_std = await run_in_threadpool(
            _normalisation, architecture, mean, std, normalisation
        )
        spec = ExpertSpec(
            name=name,
            architecture=architecture,
            weights=where,
            input_size=input_size,
            mean=spec_mean,
            std=spec_std,
            source_task=source_task or None,
            tags=tuple(t.strip() for t in (tags or "").split(",") if t.strip()),
        )
        if not expert_weights.remote(where):  # remote weights are checked once downloaded
            here = spec if stored is None else replace(spec, weights=str(stored.path))
            await run_in_threadpool(_check_loads, here)
        if stored is not None:
            stored.keep()  # in place before the row naming it commits
        job = await run_in_threadpool(
            zoo_admin.register,
            session,
            settings=settings,
            item=zoo_items.expert_row(spec),
            tenant=caller.tenant,
            callback_url=callback,
        )
        return _accepted("experts", name, job.id, job.status)

    try:
        return await idempotent(request, settings, caller.tenant, key, fields, answer)
    except ProblemError:
        session.rollback()
        raise
    finally:
        if stored is not None:
            stored.discard()  # the request's own file, unless its row took it


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
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
    name: Annotated[str, Form(description="unique zoo task name")],
    domain: Annotated[str | None, Form(description="what the images show")] = None,
) -> JSONResponse:
    _check_name("zoo task", name)
    key = key_of(request)
    if key is None:  # 409 before anything is stored (a retry with a key may be a replay)
        await run_in_threadpool(_check_free, settings, ZooTask, name)
    filename = uploads.safe_filename(file.filename)
    stored = await store_upload(file, DataLayout.of(settings).uploads, settings.max_upload_bytes)

    async def answer() -> JSONResponse:
        await run_in_threadpool(_check_free, settings, ZooTask, name)
        data = await validate(request, settings, stored, filename, zoo.zoo.embed_config.image_size)
        spec = uploaded_task(name, str(stored.final), data, (domain or "").strip()[:64] or None)
        stored.keep()  # in place before the row naming it commits
        job = await run_in_threadpool(
            zoo_admin.register,
            session,
            settings=settings,
            item=zoo_items.zoo_task_row(spec),
            tenant=caller.tenant,
            callback_url=callback,
        )
        return _accepted("zoo/tasks", name, job.id, job.status)

    fields = {"name": name, "domain": domain, "file": stored.sha256}
    try:
        return await idempotent(request, settings, caller.tenant, key, fields, answer)
    except ProblemError:
        session.rollback()
        raise
    finally:
        stored.discard()  # the request's own file, unless its row took it
