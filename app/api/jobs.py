"""A job as the API shows it: status, progress, timings, result or error, and links; and
the caller's jobs, newest first."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.auth import Reader
from app.api.deps import SessionDep
from app.api.problems import documented
from app.api.schemas import JobOut, JobPage
from app.api.tasks import Limit, Offset
from app.db.models import Job
from app.services import jobs

router = APIRouter(prefix="/v1", responses=documented(401, 403, 404, 429, 500, 503))


def job_view(job: Job) -> JobOut:
    """The job's view: the same document its webhook delivers (``jobs.view``)."""
    return JobOut.model_validate(jobs.view(job))


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="A job's status, progress, timings, result or error",
)
def get_job(job_id: str, session: SessionDep, caller: Reader) -> JobOut:
    return job_view(jobs.get(session, job_id=job_id, tenant=caller.tenant))


@router.get("/jobs", response_model=JobPage, summary="The caller's jobs, newest first")
def list_jobs(
    session: SessionDep, caller: Reader, limit: Limit = 100, offset: Offset = 0
) -> JobPage:
    total, rows = jobs.page(session, tenant=caller.tenant, limit=limit, offset=offset)
    return JobPage(total=total, items=[job_view(job) for job in rows])
