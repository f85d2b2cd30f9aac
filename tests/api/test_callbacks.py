"""Callback URLs are checked when a request names them: an internal address, another scheme or
no host is refused with 422 before any row is written or job sent."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import (
    Job,
)
from app.db.session import session_scope
from app.settings import Settings
from tests.helpers import (
    npz_upload,
)


def test_a_callback_to_an_internal_address_is_refused(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    assert not settings.allow_private_urls
    hook = {"callback_url": "http://127.0.0.1:9/hook"}
    refused = client.post("/v1/tasks", params=hook, files={"file": ("a.npz", npz_upload(1))})
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["type"].endswith("/invalid-callback-url")
    assert problem["detail"].startswith("callback_url: ")
    assert "address is not allowed" in problem["detail"]
    assert problem["errors"][0]["location"] == ["query", "callback_url"]
    expert = {"name": "e", "architecture": "cnn-4x1", "input_size": "28", "weights_uri": "x"}
    for url in ("http://127.0.0.1:9/hook", "ftp://example.org/hook", "http:///no-host"):
        answer = client.post("/v1/experts", params={"callback_url": url}, data=expert)
        assert answer.status_code == 422
        assert answer.json()["type"].endswith("/invalid-callback-url")
    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert sent == []
