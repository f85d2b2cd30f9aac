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


def test_a_malformed_callback_url_or_weights_uri_is_a_422_naming_it(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    """An unparseable URL (an unclosed IPv6 bracket), or one with a space, a control or a
    non-ASCII character, is refused when the request names it, never retried later."""
    for url in (
        "http://[::1/",
        "http://example.org/a b",
        "http://example.org/hook\r\nX-Injected: 1",
        "http://example.org/\x01",
        "http://example.org/caf\u00e9",
    ):
        answer = client.post(
            "/v1/tasks", params={"callback_url": url}, files={"file": ("a.npz", npz_upload(1))}
        )
        assert answer.status_code == 422, (url, answer.text)
        problem = answer.json()
        assert problem["type"].endswith("/invalid-callback-url")
        assert problem["detail"].startswith("callback_url: ")
        assert "not a valid URL" in problem["detail"]
        assert problem["errors"][0]["location"] == ["query", "callback_url"]
    expert = {"name": "e", "architecture": "cnn-4x1", "input_size": "28"}
    for url in ("http://[::1/", "https://[64:ff9b::/w.pt", "http://example.org/w .pt"):
        answer = client.post("/v1/experts", data={**expert, "weights_uri": url})
        assert answer.status_code == 422, (url, answer.text)
        problem = answer.json()
        assert problem["type"].endswith("/invalid-expert")
        assert problem["detail"].startswith("weights_uri ")
        assert "not a valid URL" in problem["detail"]
    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert sent == []
