"""Answers carry nosniff, tenant data is never stored by caches, and the API's description is
not public when keys are required (unless T2V_PUBLIC_DOCS says so)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings


def test_every_answer_says_nosniff_and_tenant_data_no_store(
    client: TestClient, settings: Settings
) -> None:
    for path, status in (("/v1/zoo", 200), ("/v1/jobs/nope", 404), ("/healthz", 200)):
        response = client.get(path)
        assert response.status_code == status
        assert response.headers["x-content-type-options"] == "nosniff"
        if path.startswith("/v1/"):
            assert response.headers["cache-control"] == "no-store"
    required = settings.model_copy(update={"api_keys": "required"})
    with TestClient(create_app(required)) as keyed:
        refused = keyed.post("/v1/tasks", files={"file": ("a.npz", b"x")})
        assert refused.status_code == 401  # answered by the door, outside the routes
        assert refused.headers["x-content-type-options"] == "nosniff"
        assert refused.headers["cache-control"] == "no-store"


def test_docs_are_private_when_keys_are_required(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": "required"})
    with TestClient(create_app(keyed)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
    public = keyed.model_copy(update={"public_docs": True})
    with TestClient(create_app(public)) as client:
        assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(settings)) as client:  # keys off: this machine only
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
