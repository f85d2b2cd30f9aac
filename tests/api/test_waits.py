"""Waits inside a request stop when the client goes, back off between polls, and are capped
per key (past the cap a request answers 202 at once)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api import waits
from app.api.main import create_app
from app.api.waits import Waits, wait_for
from app.settings import Settings
from tests.helpers import free_port, npz_upload, start_api, stop


@pytest.fixture
def queued_job(client: TestClient, sent: list[str]) -> str:
    """A job that never finishes here (nothing runs it)."""
    response = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload())})
    return str(response.json()["job_id"])


def _polls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    polls: list[float] = []
    state = waits._job_state

    def counted(*args: Any) -> Any:
        polls.append(time.monotonic())
        return state(*args)

    monkeypatch.setattr(waits, "_job_state", counted)
    return polls


async def _connected() -> bool:
    return False


async def _gone() -> bool:
    return True


def test_a_wait_backs_off_between_polls(
    settings: Settings, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _polls(monkeypatch)
    started = time.monotonic()
    job = asyncio.run(wait_for(settings, queued_job, "local", started + 4.0, _connected))
    assert job.status == "queued"
    assert time.monotonic() - started == pytest.approx(4.0, abs=0.5)
    assert len(polls) <= 14  # 0.1 s growing to 0.5 s; at a fixed 0.1 s it would be 40
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert gaps[-2] > 3 * gaps[0]


def test_a_wait_ends_when_the_client_has_gone(
    settings: Settings, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _polls(monkeypatch)
    started = time.monotonic()
    asyncio.run(wait_for(settings, queued_job, "local", started + 600.0, _gone))
    assert time.monotonic() - started < 1.0
    assert len(polls) == 1


def test_waits_are_capped_per_key(settings: Settings, sent: list[str]) -> None:
    slots = Waits()
    with slots.slot("k", 2) as first, slots.slot("k", 2) as second:
        with slots.slot("k", 2) as third, slots.slot("other", 2) as other:
            assert (first, second, third, other) == (True, True, False, True)
        assert slots.waiting("k") == 2
    assert slots.waiting("k") == 0
    # Through the API: with no wait allowed the call answers 202 at once, whatever wait says.
    capped = settings.model_copy(update={"max_waits_per_key": 0})
    with TestClient(create_app(capped)) as client:
        started = time.monotonic()
        response = client.post(
            "/v1/recommendations", params={"wait": 60}, files={"file": ("a.npz", npz_upload(4))}
        )
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 30


def test_a_client_that_hangs_up_frees_its_wait(settings: Settings, tmp_path: Path) -> None:
    """A real server, one wait allowed per key: a client asks to wait 600 s and hangs up; its
    slot is free again at once, so the next call waits its full 3 s instead of being turned
    away with an immediate 202 (which is what a wait still held until its deadline does)."""
    port = free_port()
    api = start_api(settings, port, tmp_path / "api.log", T2V_MAX_WAITS_PER_KEY="1")
    try:
        with socket.create_connection(("127.0.0.1", port)) as hung_up:
            body = _multipart(npz_upload(5))
            hung_up.sendall(
                b"POST /v1/recommendations?wait=600 HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=B\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(2)  # stored and registered; now waiting
        time.sleep(1)
        started = time.monotonic()
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/recommendations",
            params={"wait": 3},
            files={"file": ("b.npz", npz_upload(6))},
            timeout=60,
        )
        waited = time.monotonic() - started
    finally:
        stop(api)
    assert response.status_code == 202, response.text
    assert waited > 2.5
    assert "server" not in response.headers  # no software banner


def _multipart(data: bytes) -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--B--\r\n"
    )
