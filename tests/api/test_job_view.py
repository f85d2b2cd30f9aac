"""The job as ``GET /v1/jobs/{id}`` shows it: how many attempts it took, and moments that
carry their offset from UTC on every database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from app.services import leases
from app.settings import Settings
from tests.helpers import later, npz_upload


def _utc(moment: str) -> datetime:
    parsed = datetime.fromisoformat(moment)
    assert parsed.utcoffset() == timedelta(0), f"{moment} is not given in UTC"
    return parsed


def test_a_job_shows_how_many_attempts_it_took(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    quick = settings.model_copy(update={"job_lease_seconds": 60.0})
    job_id = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 0
    assert leases.claim(quick, job_id) == 1
    leases.sweep(quick, now=later(quick.job_lease_seconds + 1))  # its worker died: re-sent
    assert leases.claim(quick, job_id) == 2
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert (running["status"], running["attempts"]) == ("running", 2)


def test_a_jobs_moments_carry_their_offset_from_utc(
    settings: Settings, client: TestClient, sent: list[str]
) -> None:
    """SQLite hands back naive datetimes: without a zone attached on reading, the API showed
    them without an offset, and a client read them in its own zone."""
    before = datetime.now(UTC)
    job_id = client.post("/v1/tasks", files={"file": ("c.npz", npz_upload())}).json()["job_id"]
    assert leases.claim(settings, job_id) == 1
    job = client.get(f"/v1/jobs/{job_id}").json()
    created, started = _utc(job["created_at"]), _utc(job["started_at"])
    assert before - timedelta(seconds=1) <= created <= started <= datetime.now(UTC)
