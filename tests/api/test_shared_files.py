"""A request never removes a file another request holds: an upload stays under its request's
own name until the row naming it is about to commit, and a refused request removes only its
own file. Here tenant B, refused for reusing an Idempotency-Key with the same bytes, runs
while tenant A's upload of those bytes is still being validated."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import uploads
from app.settings import Settings
from tests.helpers import PATIENCE, create_key, in_background, npz_upload, run_job


def _bearer(settings: Settings, tenant: str) -> dict[str, str]:
    _, token = create_key(settings, tenant, ["tasks:read", "tasks:write"])
    return {"Authorization": f"Bearer {token}"}


def test_a_refused_request_leaves_another_tenants_upload_alone(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = settings.model_copy(update={"api_keys": "required"})
    acme, globex = _bearer(keyed, "acme"), _bearer(keyed, "globex")
    upload = npz_upload(2)
    validating, refused = threading.Event(), threading.Event()
    validate = uploads.validate

    def held(*args: Any, **kwargs: Any) -> Any:
        validating.set()
        assert refused.wait(PATIENCE), "never let go"
        return validate(*args, **kwargs)

    with TestClient(create_app(keyed)) as client:
        first = client.post(
            "/v1/tasks",
            headers={**globex, "Idempotency-Key": "k1"},
            files={"file": ("other.npz", npz_upload(3))},
        )
        assert first.status_code == 202, first.text
        monkeypatch.setattr(uploads, "validate", held)

        def acme_uploads() -> Any:
            return client.post("/v1/tasks", headers=acme, files={"file": ("a.npz", upload)})

        with in_background(acme_uploads, refused) as acme_answer:
            assert validating.wait(PATIENCE), "acme's upload never reached validation"
            reused = client.post(
                "/v1/tasks",
                headers={**globex, "Idempotency-Key": "k1"},
                files={"file": ("a.npz", upload)},
            )
            refused.set()
            answer = acme_answer()
        assert reused.status_code == 422, reused.text
        assert reused.json()["type"].endswith("/idempotency-key-reused")
        assert answer.status_code == 202, answer.text
        body = answer.json()
        run_job(keyed, body["job_id"])
        job = client.get(f"/v1/jobs/{body['job_id']}", headers=acme).json()
        assert job["status"] == "succeeded", job
    # Only the two datasets' files remain: no request's own file is left behind.
    files = sorted(p.name for p in (keyed.data_dir / "uploads").rglob("*") if p.is_file())
    assert len(files) == 2
    assert not any(name.startswith(".") for name in files)
    assert all(Path(keyed.data_dir / "uploads" / n[:2] / n).is_file() for n in files)


def test_no_request_leaves_its_own_file_behind(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    """A replayed request (the same Idempotency-Key and bytes) is answered from the record,
    and the bytes it streamed under its own name go with it, as do a refused request's."""
    key = {"Idempotency-Key": "again"}
    upload = npz_upload(2)
    first = client.post("/v1/tasks", headers=key, files={"file": ("a.npz", upload)})
    replay = client.post("/v1/tasks", headers=key, files={"file": ("a.npz", upload)})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    reused = client.post("/v1/tasks", headers=key, files={"file": ("b.npz", npz_upload(3))})
    assert reused.status_code == 422
    files = [p.name for p in (settings.data_dir / "uploads").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert not files[0].startswith(".")
