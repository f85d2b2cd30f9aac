"""A job as the API shows it: status, progress, timings, result or error, and links."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.auth import Reader
from app.api.deps import SessionDep
from app.api.problems import documented
from app.api.schemas import JobOut, Progress
from app.db.models import Job
from app.services import jobs
from app.services.jobs import JobKind

router = APIRouter(prefix="/v1", responses=documented(401, 403, 404, 429, 500, 503))


def _links(job: Job) -> dict[str, str]:
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.task_id:
        links["task"] = f"/v1/tasks/{job.task_id}"
        if job.kind == JobKind.embed:
            links["neighbors"] = f"/v1/tasks/{job.task_id}/neighbors"
            links["recommendations"] = f"/v1/tasks/{job.task_id}/recommendations"
    if job.kind == JobKind.expert:
        links["expert"] = f"/v1/experts/{job.params['expert']}"
    if job.kind == JobKind.zoo_task:
        links["zoo_task"] = f"/v1/zoo/tasks/{job.params['zoo_task']}"
    if job.kind in (JobKind.expert, JobKind.zoo_task):
        links["zoo"] = "/v1/zoo"
    return links


def job_view(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        progress=Progress(stage=job.stage, fraction=job.progress),
        task_id=job.task_id,
        params=job.params,
        timings=job.timings,
        created_at=job.created_at.isoformat(),
        started_at=job.started_at.isoformat() if job.started_at else None,
        finished_at=job.finished_at.isoformat() if job.finished_at else None,
        error=job.error,
        result=job.result,
        links=_links(job),
    )


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="A job's status, progress, timings, result or error",
)
def get_job(job_id: str, session: SessionDep, caller: Reader) -> JobOut:
    return job_view(jobs.get(session, job_id=job_id, tenant=caller.tenant))
