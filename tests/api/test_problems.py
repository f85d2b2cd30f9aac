"""Errors leak nothing to other tenants: a failed zoo item shows every key its type, title
and status only (the detail is on the job, which only its tenant reads), stored details lose
the credentials of URLs, and an unforeseen worker error stores a fixed text, not the
exception's."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import create_key, free_port, npz_upload, run_job
from workers import ranking


def _bearer(settings: Settings, tenant: str, *scopes: str) -> dict[str, str]:
    _, token = create_key(settings, tenant, list(scopes))
    return {"Authorization": f"Bearer {token}"}


def test_a_failed_experts_detail_reaches_only_its_tenant(
    settings: Settings, sent: list[str]
) -> None:
    keyed = settings.model_copy(update={"api_keys": "required", "allow_private_urls": True})
    admin = _bearer(keyed, "platform", "zoo:admin", "tasks:read")
    other = _bearer(keyed, "acme", "tasks:read")
    url = f"http://bob:s3cret@127.0.0.1:{free_port()}/weights.pt"  # nothing listens there
    with TestClient(create_app(keyed)) as client:
        registered = client.post(
            "/v1/experts",
            headers=admin,
            data={
                "name": "leaky",
                "architecture": "cnn-4x1",
                "input_size": "28",
                "weights_uri": url,
            },
        )
        assert registered.status_code == 202, registered.text
        run_job(keyed, sent[-1])
        seen = client.get("/v1/experts/leaky", headers=other)
        assert seen.json()["status"] == "failed"
        assert set(seen.json()["error"]) == {"type", "title", "status"}
        listed = client.get("/v1/experts", headers=other)
        for text in (seen.text, listed.text):
            assert "s3cret" not in text
            assert "127.0.0.1" not in text
        assert client.get(f"/v1/jobs/{sent[-1]}", headers=other).status_code == 404
        job = client.get(f"/v1/jobs/{sent[-1]}", headers=admin).json()
        assert "could not be fetched" in job["error"]["detail"]
        assert "s3cret" not in job["error"]["detail"]
        assert "bob" not in job["error"]["detail"]


def test_an_unforeseen_worker_error_stores_no_exception_text(
    client: TestClient, settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload())}).json()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("postgresql://app:pw@db.internal/state at /srv/t2v/uploads/ab")

    monkeypatch.setattr(ranking, "load_dataset", broken)
    run_job(settings, body["job_id"])
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["status"] == 500
    for secret in ("pw", "db.internal", "/srv/t2v", "RuntimeError"):
        assert secret not in job["error"]["detail"]
