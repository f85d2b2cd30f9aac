"""The key is checked at the door: a request with a body is authenticated before any byte of
the body is read, and failed authentication is rate limited per client address (an unknown key
is looked up once; an address past its budget has its further failures answered 429, while a
good key from it is served). The client address is the peer's, or the one a trusted proxy
names in X-Forwarded-For; the failure counters forget and are bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.auth import RateLimiter
from app.api.main import create_app
from app.services import api_keys
from app.settings import Settings
from tests.helpers import create_key, free_port, npz_upload, revoke_key, start_api, stop


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
        again = client.get("/v1/zoo", headers={"Authorization": "Bearer t2v_bogus_key"})
        assert again.status_code == 429
        assert lookups == ["t2v_bogus_key"]  # no lookup for what is known to fail
        # Only failures are locked out: a good key from the same address is served.
        for _ in range(3):
            served = client.get("/v1/zoo", headers={"Authorization": f"Bearer {good}"})
            assert served.status_code == 200
        other = client.get("/v1/zoo", headers={"Authorization": "Bearer t2v_0123456789ab_x"})
        assert other.status_code == 429
    # Another address has its own budget.
    with TestClient(create_app(strict), client=("198.51.100.9", 4000)) as other:
        assert other.get("/v1/zoo", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert other.get("/v1/zoo").status_code == 401


def test_the_failure_counters_forget_and_are_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(max_keys=100, clock=lambda: now[0])
    for n in range(1000):  # a thousand addresses fail once each
        limiter.wait_needed(f"198.51.100.{n}", 5)
    assert len(limiter) <= 100
    for _ in range(5):
        limiter.wait_needed("203.0.113.7", 5)
    assert limiter.peek("203.0.113.7", 5) > 0  # spent
    now[0] += 30.0
    assert limiter.peek("203.0.113.7", 5) == 0  # refilled in part: one more may go
    now[0] += 31.0  # a minute without a failure: every bucket is full again, and forgotten
    limiter.wait_needed("192.0.2.1", 5)
    assert len(limiter) == 1


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(keyed: Settings) -> None:
    strict = keyed.model_copy(update={"auth_failures_per_minute": 3})
    bogus = {"Authorization": "Bearer t2v_bogus_key"}

    def statuses(app: FastAPI, peer: str) -> list[int]:
        with TestClient(app, client=(peer, 4000)) as client:
            return [
                client.get(
                    "/v1/zoo", headers={**bogus, "X-Forwarded-For": f"192.0.2.{n}"}
                ).status_code
                for n in range(5)
            ]

    # By default no proxy is trusted, a local one neither: the peer's address counts.
    assert statuses(create_app(strict), "127.0.0.1") == [401, 401, 401, 429, 429]
    trusting = strict.model_copy(update={"trusted_proxies": ["10.0.0.0/8"]})
    assert statuses(create_app(trusting), "10.1.2.3") == [401] * 5  # five clients behind it
    assert statuses(create_app(trusting), "127.0.0.1") == [401, 401, 401, 429, 429]


@pytest.mark.slow
def test_a_local_client_cannot_move_the_counter_of_a_served_api(
    keyed: Settings, tmp_path: Path
) -> None:
    """The served API (uvicorn under ``task2vec serve``) takes X-Forwarded-For from nobody
    unless told: a client on the same machine cannot spread its failures over made-up
    addresses, nor spend another address's budget."""
    port = free_port()
    api = start_api(
        keyed,
        port,
        tmp_path / "api.log",
        T2V_API_KEYS="required",
        T2V_AUTH_FAILURES_PER_MINUTE="3",
    )
    try:
        answers = [
            httpx.get(
                f"http://127.0.0.1:{port}/v1/zoo",
                headers={
                    "Authorization": "Bearer t2v_bogus_key",
                    "X-Forwarded-For": f"192.0.2.{n}",
                },
                timeout=30,
            ).status_code
            for n in range(5)
        ]
    finally:
        stop(api)
    assert answers == [401, 401, 401, 429, 429]
