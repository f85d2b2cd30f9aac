"""The zoo over HTTP: its experts and tasks, the version being served, and zoo management.

Reads come from the database (every expert and zoo task, with its status: pending, ready or
failed) joined with the version this process serves (errors, best experts). Writes — a new
expert, a new zoo task — store their files, commit a row and a job, and return 202: a worker
computes the matrix entries and publishes a new version, which the API then swaps in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from app import catalog, jobs
from app.api.auth import Admin, CallerDep
from app.api.deps import SettingsDep, ZooDep
from app.api.idempotency import idempotent, key_of
from app.api.problems import ProblemError, documented
from app.api.submit import chunks, discard_unreferenced, send, store_upload, validate
from app.db.models import Expert, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.ranking import ZooState
from app.settings import Settings
from app.storage import UploadTooLargeError, store_stream
from app.task2vec.errors import Task2VecError
from app.task2vec.probes import PROBES
from app.zoo.experts import ExpertSpec, load_expert
from app.zoo.tasks import uploaded_task

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 503)
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
Limit = Annotated[int, Query(ge=1, le=500)]
Item = Expert | ZooTask
#: The name of each kind of zoo item in problem types, job kinds and messages.
_KIND: dict[type[Item], str] = {Expert: "expert", ZooTask: "zoo-task"}
View = Callable[[Any, ZooState], dict[str, Any]]
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


@router.get("/zoo", summary="The zoo version being served, and what is still being added")
def zoo_version(settings: SettingsDep, zoo: ZooDep, _: CallerDep) -> dict[str, Any]:
    v = zoo.version
    with session_scope(settings.resolved_database_url()) as session:
        pending = {
            kind: session.scalar(
                select(func.count()).select_from(model).where(model.status == ZooItemStatus.pending)
            )
            for kind, model in (("experts", Expert), ("tasks", ZooTask))
        }
    return {
        "version": v.content,
        "tasks": v.tasks,
        "experts": v.experts,
        "probe": zoo.zoo.probe,
        "embedding": {"dim": zoo.zoo.index().version.dim, **vars(zoo.zoo.embed_config)},
        "protocol": zoo.zoo.protocol.describe(),
        "pending": pending,
    }


def _expert_view(row: Expert, zoo: ZooState) -> dict[str, Any]:
    served = [i for i, e in enumerate(zoo.zoo.experts) if e.name == row.name]
    return {
        "id": row.name,
        "architecture": row.architecture,
        "input_size": row.input_size,
        "mean": row.mean,
        "std": row.std,
        "source_task": row.source_task,
        "tags": row.tags,
        "status": row.status,
        "in_served_zoo": bool(served),
        "mean_error": float(zoo.zoo.errors[:, served[0]].mean()) if served else None,
        "error": row.error,
        "links": _links("experts", row.name, row.job_id),
    }


def _page(
    settings: Settings, zoo: ZooState, model: type[Item], view: View, limit: int, offset: int
) -> dict[str, Any]:
    """One page of experts or zoo tasks, oldest first, with the total."""
    with session_scope(settings.resolved_database_url()) as session:
        total = session.scalar(select(func.count()).select_from(model)) or 0
        rows = session.scalars(select(model).order_by(model.id).offset(offset).limit(limit))
        return {"total": total, "items": [view(row, zoo) for row in rows]}


def _one(settings: Settings, zoo: ZooState, model: type[Item], view: View, name: str) -> Any:
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(select(model).where(model.name == name))
        if row is None:
            what = _KIND[model].replace("-", " ")
            raise ProblemError(
                404, "not-found", f"No such {what}", f"{what} {name!r} does not exist"
            )
        return view(row, zoo)


@router.get("/experts", summary="The zoo's experts (paginated), with their status")
def experts(
    settings: SettingsDep, zoo: ZooDep, _: CallerDep, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    return _page(settings, zoo, Expert, _expert_view, limit, offset)


@router.get("/experts/{expert_id}", summary="One expert")
def expert(expert_id: str, settings: SettingsDep, zoo: ZooDep, _: CallerDep) -> dict[str, Any]:
    view: dict[str, Any] = _one(settings, zoo, Expert, _expert_view, expert_id)
    return view


def _zoo_task_view(row: ZooTask, zoo: ZooState) -> dict[str, Any]:
    served = [i for i, t in enumerate(zoo.zoo.tasks) if t.name == row.name]
    best = zoo.zoo.experts[zoo.zoo.best_expert(served[0])].name if served else None
    return {
        "name": row.name,
        "domain": row.domain,
        "size": row.size,
        "classes": row.classes,
        "status": row.status,
        "in_served_zoo": bool(served),
        "best_expert": best,
        "error": row.error,
        "links": _links("zoo/tasks", row.name, row.job_id),
    }


@router.get("/zoo/tasks", summary="The zoo's tasks (paginated), with their status")
def zoo_tasks(
    settings: SettingsDep, zoo: ZooDep, _: CallerDep, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    return _page(settings, zoo, ZooTask, _zoo_task_view, limit, offset)


@router.get("/zoo/tasks/{name}", summary="One zoo task")
def zoo_task(name: str, settings: SettingsDep, zoo: ZooDep, _: CallerDep) -> dict[str, Any]:
    view: dict[str, Any] = _one(settings, zoo, ZooTask, _zoo_task_view, name)
    return view


# --------------------------------------------------------------------------------------------
# Zoo management


def _accepted(kind: str, name: str, job_id: str, status: str) -> JSONResponse:
    body = {
        "name": name,
        "job_id": job_id,
        "status": status,
        "links": {"self": f"/v1/{kind}/{name}", "job": f"/v1/jobs/{job_id}"},
    }
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


def _check_free(settings: Settings, model: type[Expert] | type[ZooTask], name: str) -> None:
    """409 before anything is stored when the name is taken (the unique constraint still
    decides a race)."""
    with session_scope(settings.resolved_database_url()) as session:
        status = session.scalar(select(model.status).where(model.name == name))
    _refuse_taken(_KIND[model], name, status)


def _refuse_taken(kind: str, name: str, status: str | None) -> None:
    """409 for a name in use by an item that has not failed (a failed one may be replaced)."""
    if status is not None and status != ZooItemStatus.failed:
        what = kind.replace("-", " ")
        raise ProblemError(
            409, f"{kind}-exists", f"The {what} exists", f"{what} {name!r} is already {status}"
        )


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
) -> str:
    """Where the expert's weights are: a stored file, a URL a worker downloads, or a
    keyword of the probe loader. Local files are copied into the data directory."""
    if (uri is None) == (upload is None):
        raise ProblemError(
            422,
            "invalid-expert",
            "Invalid expert",
            "give the weights either as an uploaded file (weights) or as weights_uri",
        )
    if upload is not None:
        try:
            stored = await store_stream(
                chunks(upload),
                settings.data_dir / "experts",
                settings.max_upload_bytes,
                suffix=".pt",
            )
        except UploadTooLargeError as exc:
            raise ProblemError(
                413, "upload-too-large", "The upload is too large", str(exc)
            ) from None
        return str(stored.path)
    assert uri is not None
    if catalog.remote_weights(uri):
        return uri
    if architecture in PROBES and (uri == "imagenet" or uri.startswith("random")):
        return uri
    return str(await run_in_threadpool(_import_weights, settings, uri))


def _import_weights(settings: Settings, uri: str) -> Path:
    """A weight file named by path: only under ``weights_import_dir`` (a folder the operator
    shares for this), at most ``max_upload_bytes``; copied into the data directory."""

    def refuse(why: str) -> ProblemError:
        return ProblemError(422, "invalid-expert", "Invalid expert", f"weights_uri {uri!r}: {why}")

    root = settings.weights_import_dir
    if root is None:
        raise refuse(
            f"not an http(s) URL or (for {', '.join(PROBES)}) 'imagenet' / 'random:N'; "
            "weight files are uploaded as `weights`, or named by path when the service sets "
            "T2V_WEIGHTS_IMPORT_DIR"
        )
    try:
        path = Path(uri.removeprefix("file://")).resolve()
        inside = path.is_relative_to(root.resolve())
        size = path.stat().st_size if inside and path.is_file() else None
    except (OSError, ValueError):
        size, inside = None, False
    if not inside:
        raise refuse(f"not a file under the weights import folder {str(root)!r}")
    if size is None:
        raise refuse("no such file in the weights import folder")
    if size > settings.max_upload_bytes:
        raise refuse(f"larger than the limit of {settings.max_upload_bytes} bytes")
    try:
        return catalog.store_weights(settings, path)
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror})") from None


def _check_loads(spec: ExpertSpec) -> None:
    try:
        load_expert(spec)
    except Task2VecError as exc:
        raise ProblemError(422, "invalid-expert", "The expert does not load", str(exc)) from None


def _register(settings: Settings, row: Expert | ZooTask, tenant: str) -> tuple[str, str]:
    """Commit a new expert or zoo task and the job that computes its matrix entries, then
    send the job. A failed item of the same name is replaced, with its entries."""
    name, is_expert = row.name, isinstance(row, Expert)
    model: type[Expert] | type[ZooTask] = Expert if is_expert else ZooTask
    kind = _KIND[model]
    try:
        with session_scope(settings.resolved_database_url()) as session:
            old = cast(
                "Expert | ZooTask | None",
                session.scalar(select(model).where(model.name == name)),
            )
            if old is not None:
                _refuse_taken(kind, name, old.status)
                column = MatrixEntry.expert_id if is_expert else MatrixEntry.zoo_task_id
                session.execute(delete(MatrixEntry).where(column == old.id))
                session.delete(old)
                session.flush()
            session.add(row)
            job = jobs.create(session, kind, None, tenant=tenant, **{kind.replace("-", "_"): name})
            row.job_id = job.id
            job_id, status = job.id, job.status
    except IntegrityError:
        what = kind.replace("-", " ")
        detail = f"{what} {name!r} was registered at the same time"
        raise ProblemError(409, f"{kind}-exists", f"The {what} exists", detail) from None
    try:
        send(settings, job_id)
    except ProblemError as exc:  # the job failed unsent: so does the item, freeing its name
        error = jobs.problem(exc.status, exc.kind, exc.title, exc.detail)
        catalog.fail_item(settings, model, name, error)
        raise
    return job_id, status


@router.post(
    "/experts",
    status_code=202,
    summary="Register an expert and evaluate it on every zoo task (admin)",
)
async def register_expert(
    request: Request,
    settings: SettingsDep,
    zoo: ZooDep,
    caller: Admin,
    name: Annotated[str, Form(description="unique name: letters, digits, '.', '_', '-'")],
    architecture: Annotated[str, Form(description="cnn-<width>x<depth>, or a probe network")],
    input_size: Annotated[int, Form(ge=8, le=1024, description="input resolution")],
    weights: Annotated[UploadFile | None, File(description="a state_dict (.pt)")] = None,
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
    source_task: Annotated[str | None, Form(description="the zoo task it was trained on")] = None,
    tags: Annotated[str | None, Form(description="comma-separated tags")] = None,
) -> JSONResponse:
    _check_name("expert", name)
    key = key_of(request)
    if key is None:  # 409 before anything is stored (a retry with a key may be a replay)
        await run_in_threadpool(_check_free, settings, Expert, name)
    where = await _weights(settings, architecture, weights_uri, weights)
    fields = {
        "name": name,
        "architecture": architecture,
        "input_size": input_size,
        "weights": where,
        "mean": mean,
        "std": std,
        "source_task": source_task,
        "tags": tags,
    }

    async def answer() -> JSONResponse:
        await run_in_threadpool(_check_free, settings, Expert, name)
        if source_task and source_task not in {t.name for t in zoo.zoo.tasks}:
            detail = f"source_task {source_task!r} is not a zoo task"
            raise ProblemError(422, "invalid-expert", "Invalid expert", detail)
        default = ExpertSpec("", "", "", 0)
        spec_mean = _floats("mean", mean, default.mean)
        spec_std = _floats("std", std, default.std)
        spec = ExpertSpec(
            name=name,
            architecture=architecture,
            weights=where,
            input_size=input_size,
            mean=(spec_mean[0], spec_mean[1], spec_mean[2]),
            std=(spec_std[0], spec_std[1], spec_std[2]),
            source_task=source_task or None,
            tags=tuple(t.strip() for t in (tags or "").split(",") if t.strip()),
        )
        if not catalog.remote_weights(where):  # remote weights are checked once downloaded
            await run_in_threadpool(_check_loads, spec)
        job_id, status = await run_in_threadpool(
            _register, settings, catalog.expert_row(spec), caller.tenant
        )
        return _accepted("experts", name, job_id, status)

    try:
        return await idempotent(request, settings, caller.tenant, key, fields, answer)
    except ProblemError:
        await run_in_threadpool(_discard_weights, settings, where)
        raise


def _discard_weights(settings: Settings, where: str) -> None:
    """A rejected expert leaves no weight file behind, unless another expert uses it."""
    path = Path(where)
    if not path.is_relative_to(settings.data_dir / "experts"):
        return
    with session_scope(settings.resolved_database_url()) as session:
        if session.scalar(select(Expert.id).where(Expert.weights == where).limit(1)) is None:
            path.unlink(missing_ok=True)


@router.post(
    "/zoo/tasks",
    status_code=202,
    summary="Add a labelled dataset to the zoo: its embedding and matrix row (admin)",
)
async def add_zoo_task(
    request: Request,
    settings: SettingsDep,
    zoo: ZooDep,
    caller: Admin,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
    name: Annotated[str, Form(description="unique zoo task name")],
    domain: Annotated[str | None, Form(description="what the images show")] = None,
) -> JSONResponse:
    _check_name("zoo task", name)
    key = key_of(request)
    if key is None:  # 409 before anything is stored (a retry with a key may be a replay)
        await run_in_threadpool(_check_free, settings, ZooTask, name)
    filename = file.filename or "upload"
    stored = await store_upload(file, settings)

    async def answer() -> JSONResponse:
        await run_in_threadpool(_check_free, settings, ZooTask, name)
        data = await run_in_threadpool(
            validate, settings, stored, filename, zoo.zoo.embed_config.image_size
        )
        spec = uploaded_task(name, str(stored.path), data, (domain or "").strip()[:64] or None)
        job_id, status = await run_in_threadpool(
            _register, settings, catalog.zoo_task_row(spec), caller.tenant
        )
        return _accepted("zoo/tasks", name, job_id, status)

    fields = {"name": name, "domain": domain, "file": stored.sha256}
    try:
        return await idempotent(request, settings, caller.tenant, key, fields, answer)
    except ProblemError:
        await run_in_threadpool(discard_unreferenced, settings, stored)
        raise
