"""The caller's tasks and jobs as lists, on SQLite and the real PostgreSQL: newest first,
paginated, and never another tenant's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import create_key, npz_upload, run_job
from workers import tasks


@pytest.fixture
def keyed(settings: Settings, monkeypatch: pytest.MonkeyPatch, sent: list[str]) -> Settings:
    """Keys required; jobs are sent nowhere (a test runs the ones it needs)."""
    keyed = settings.model_copy(update={"api_keys": "required"})
    monkeypatch.setattr(tasks, "get_settings", lambda: keyed)
    return keyed


@pytest.fixture
def api(keyed: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed)) as client:
        yield client


def _auth(settings: Settings, tenant: str, *scopes: str) -> dict[str, str]:
    _, token = create_key(settings, tenant, list(scopes))
    return {"Authorization": f"Bearer {token}"}


def _upload(client: TestClient, headers: dict[str, str], index: int, name: str) -> Any:
    response = client.post("/v1/tasks", headers=headers, files={"file": (name, npz_upload(index))})
    assert response.status_code == 202, response.text
    return response.json()


def test_tasks_and_jobs_are_the_callers_own_newest_first(api: TestClient, keyed: Settings) -> None:
    acme = _auth(keyed, "acme", "tasks:read", "tasks:write")
    globex = _auth(keyed, "globex", "tasks:read", "tasks:write")
    first = _upload(api, acme, 1, "shoes.npz")
    run_job(keyed, first["job_id"])
    second = _upload(api, acme, 2, "digits.npz")
    theirs = _upload(api, globex, 1, "theirs.npz")  # the same bytes: another tenant's task

    listed = api.get("/v1/tasks", headers=acme)
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert page["total"] == 2
    assert [t["id"] for t in page["items"]] == [second["task_id"], first["task_id"]]
    newest, oldest = page["items"]
    assert newest["status"] == "queued"
    assert oldest["status"] == "succeeded"
    assert oldest["filename"] == "shoes.npz"
    assert oldest["num_images"] == 120
    assert oldest["num_classes"] == len(
        api.get(oldest["links"]["self"], headers=acme).json()["dataset"]["classes"]
    )
    assert oldest["job_id"] == first["job_id"]
    assert oldest["created_at"].endswith("+00:00")
    assert oldest["links"] == {
        "self": f"/v1/tasks/{first['task_id']}",
        "job": f"/v1/jobs/{first['job_id']}",
        "recommendations": f"/v1/tasks/{first['task_id']}/recommendations",
    }
    second_page = api.get("/v1/tasks", headers=acme, params={"limit": 1, "offset": 1}).json()
    assert second_page == {"total": 2, "items": [oldest]}

    their_list = api.get("/v1/tasks", headers=globex).json()
    assert [t["id"] for t in their_list["items"]] == [theirs["task_id"]]

    jobs = api.get("/v1/jobs", headers=acme).json()
    assert jobs["total"] == 2
    assert [j["id"] for j in jobs["items"]] == [second["job_id"], first["job_id"]]
    # The same view as the job's own route.
    assert jobs["items"][1] == api.get(f"/v1/jobs/{first['job_id']}", headers=acme).json()
    assert api.get("/v1/jobs", headers=acme, params={"limit": 1}).json()["items"] == [
        jobs["items"][0]
    ]
    assert [j["id"] for j in api.get("/v1/jobs", headers=globex).json()["items"]] == [
        theirs["job_id"]
    ]


def test_the_lists_need_a_reading_key_and_valid_pages(api: TestClient, keyed: Settings) -> None:
    writer_only = _auth(keyed, "acme", "tasks:write")
    reader = _auth(keyed, "acme", "tasks:read")
    for path in ("/v1/tasks", "/v1/jobs"):
        assert api.get(path).status_code == 401
        assert api.get(path, headers=writer_only).status_code == 403
        assert api.get(path, headers=reader).json() == {"total": 0, "items": []}
        for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
            refused = api.get(path, headers=reader, params=bad)
            assert refused.status_code == 422, (path, bad)
            assert refused.headers["content-type"] == "application/problem+json"
    # The upload beside the list is still the door's: a reading key is refused before the
    # body is read, a writing one is accepted.
    denied = api.post("/v1/tasks", headers=reader, files={"file": ("a.npz", npz_upload())})
    assert denied.status_code == 403
    assert denied.json()["type"].endswith("/insufficient-scope")
    assert api.post("/v1/tasks", files={"file": ("a.npz", npz_upload())}).status_code == 401
