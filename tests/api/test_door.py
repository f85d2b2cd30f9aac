"""The key is checked at the door: a request with a body is authenticated before any byte of
the body is read, and failed authentication is rate limited per client address (an unknown key
is looked up once; an address past its budget is answered 429 without a lookup)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import api_keys
from app.settings import Settings
from tests.helpers import create_key, npz_upload, revoke_key


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": "required"})


def _post(app: FastAPI, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """POST /v1/tasks straight through the ASGI app: the status, and whether the app read
    any of the body."""
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/tasks",
        "raw_path": b"/v1/tasks",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"multipart/form-data; boundary=x"),
            (b"content-length", b"1000"),
            *headers,
        ],
        "client": ("203.0.113.7", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], read


def test_a_body_is_not_read_before_its_key_is_checked(keyed: Settings) -> None:
    _, revoked = create_key(keyed, "acme", ["tasks:read", "tasks:write"])
    assert revoke_key(keyed, revoked.split("_")[1])
    _, reader = create_key(keyed, "acme", ["tasks:read"])
    app = create_app(keyed)
    for headers in (
        [],
        [(b"authorization", b"Bearer x")],
        [(b"authorization", b"Basic dXNlcjpwYXNz")],
        [(b"authorization", f"Bearer {revoked}".encode())],
    ):
        assert _post(app, headers) == (401, False), headers
    # A key without the scope: 403, still before the body.
    assert _post(app, [(b"authorization", f"Bearer {reader}".encode())]) == (403, False)
    _, writer = create_key(keyed, "acme", ["tasks:read", "tasks:write"])
    status, read = _post(app, [(b"authorization", f"Bearer {writer}".encode())])
    assert read  # a good key: the body is read (and the malformed form refused)
    assert status == 400


def test_failed_authentication_is_rate_limited_per_address(
    keyed: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = keyed.model_copy(update={"auth_failures_per_minute": 5})
    lookups: list[str] = []
    authenticate = api_keys.authenticate

    def counted(session: Any, *, token: str) -> Any:
        lookups.append(token)
        return authenticate(session, token=token)

    monkeypatch.setattr(api_keys, "authenticate", counted)
    _, good = create_key(strict, "acme", ["tasks:read"])
    with TestClient(create_app(strict)) as client:
        answers = [
            client.get("/v1/zoo", headers={"Authorization": "Bearer t2v_bogus_key"})
            for _ in range(5)
        ]
        assert [a.status_code for a in answers] == [401] * 5
        assert lookups == ["t2v_bogus_key"]  # an unknown key is remembered as unknown
        limited = client.get("/v1/zoo")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["type"].endswith("/rate-limited")
        posted = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload())})
        assert posted.status_code == 429
        # The address is locked out, good key or not, until its budget refills: no lookup.
        locked = client.get("/v1/zoo", headers={"Authorization": f"Bearer {good}"})
        assert locked.status_code == 429
        assert lookups == ["t2v_bogus_key"]
    # Another address has its own budget.
    with TestClient(create_app(strict), client=("198.51.100.9", 4000)) as other:
        assert other.get("/v1/zoo", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert other.get("/v1/zoo").status_code == 401
