"""Importing a zoo bundle over HTTP (admin): ``POST /v1/zoo/import``.

The upload is stored under a name of the request's own and verified in full before the answer
(every member's hash, the manifest, the zoo it holds, its configuration against the zoo
served here, names already taken), on the pool that validates uploads: a refused bundle
answers 422 or 409 and leaves nothing. An accepted one moves to its content-addressed name and
a worker imports it and publishes a new version (202 with the job), as other zoo additions.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.api.auth import Admin
from app.api.callbacks import CallbackUrl
from app.api.deps import SessionDep, SettingsDep
from app.api.idempotency import IdempotencyKey, idempotent
from app.api.problems import documented
from app.api.schemas import Links
from app.api.shares import FairPool
from app.api.tasks import accepted
from app.api.uploads import BundleUpload
from app.services import bundles
from app.settings import Settings
from app.zoo.bundle import BundleError

router = APIRouter(
    prefix="/v1", responses=documented(400, 401, 403, 409, 411, 413, 422, 429, 500, 503)
)


class BundleAccepted(BaseModel):
    """A verified bundle, left to a worker to import: follow the job."""

    job_id: str
    status: str
    sha256: str
    tasks: int
    experts: int
    probe: str
    links: Links


def _verify(settings: Settings, path: Path) -> dict[str, Any]:
    try:
        return bundles.check_file(settings, path)
    except BundleError as exc:
        raise bundles.problem_of(exc) from None


@router.post(
    "/zoo/import",
    status_code=202,
    response_model=BundleAccepted,
    summary="Import a zoo bundle: its experts, tasks and matrix join the zoo (admin)",
)
async def import_bundle(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    caller: Admin,
    callback: CallbackUrl,
    key: IdempotencyKey,
    upload: BundleUpload,
) -> JSONResponse:
    async def answer() -> JSONResponse:
        pool: FairPool | None = getattr(request.app.state, "validation", None)
        verify = partial(_verify, settings, upload.path)
        if pool is None:  # the app's lifespan has not run (a bare ASGI call)
            found = await anyio.to_thread.run_sync(verify)
        else:
            found = await pool.run(caller.tenant, verify)
        upload.keep()  # in place before the job naming it commits
        job = await run_in_threadpool(
            partial(
                bundles.submit,
                session,
                settings=settings,
                sha256=upload.sha256,
                tenant=caller.tenant,
                callback_url=callback,
            )
        )
        links = {"job": f"/v1/jobs/{job.id}", "zoo": "/v1/zoo"}
        body = BundleAccepted(
            job_id=job.id, status=job.status, sha256=upload.sha256, links=links, **found
        )
        return accepted(job.id, body)

    parts = {"file": upload.sha256}
    return await idempotent(request, settings, caller.tenant, key, parts, answer)
