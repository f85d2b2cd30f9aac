"""Waits inside a request stop when the client goes, back off between polls, and are capped
per key (past the cap a request answers 202 at once)."""

from __future__ import annotations

import asyncio
import socket
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api import waits
from app.api.main import create_app
from app.api.waits import Waits, wait_for
from app.settings import Settings
from tests.helpers import (
    PATIENCE,
    eventually,
    free_port,
    in_background,
    npz_upload,
    start_api,
    stop,
)


@pytest.fixture
def queued_job(client: TestClient, sent: list[str]) -> str:
    """A job that never finishes here (nothing runs it)."""
    response = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload())})
    return str(response.json()["job_id"])


def _polls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job reads a wait makes, in order."""
    polls: list[str] = []
    state = waits._job_state

    def counted(*args: Any) -> Any:
        job = state(*args)
        polls.append(job.status)
        return job

    monkeypatch.setattr(waits, "_job_state", counted)
    return polls


WAITING = "t2v_http_waiting_requests"


class _Steps:
    """A clock that moves only when the wait pauses: every pause is seen exactly, however
    busy the machine."""

    def __init__(self) -> None:
        self.time = 0.0
        self.pauses: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.time += seconds


async def _connected() -> bool:
    return False


async def _gone() -> bool:
    return True


def test_a_wait_backs_off_between_polls(
    settings: Settings, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls, clock = _polls(monkeypatch), _Steps()
    job = asyncio.run(wait_for(settings, queued_job, "local", 4.0, _connected, clock))
    assert job.status == "queued"
    # 0.1 s growing by half to 0.5 s, then 0.5 s, and the rest up to the deadline: 12 polls
    # in 4 s, where a fixed 0.1 s would make 40.
    growing = [0.1, 0.15, 0.225, 0.3375]
    assert clock.pauses == pytest.approx([*growing, *[0.5] * 6, 4.0 - sum(growing) - 3.0])
    assert clock.time == pytest.approx(4.0)
    assert polls == ["queued"] * 12


def test_a_wait_ends_when_the_client_has_gone(
    settings: Settings, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls, clock = _polls(monkeypatch), _Steps()
    asyncio.run(wait_for(settings, queued_job, "local", 600.0, _gone, clock))
    assert (polls, clock.pauses) == (["queued"], [])


def test_waits_are_capped_per_key(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = Waits()
    with slots.slot("k", 2) as first, slots.slot("k", 2) as second:
        with slots.slot("k", 2) as third, slots.slot("other", 2) as other:
            assert (first, second, third, other) == (True, True, False, True)
        assert slots.waiting("k") == 2
    assert slots.waiting("k") == 0
    # Through the API: with no wait allowed the call answers 202 after one look at its job,
    # whatever wait says (waiting its 60 s, it would look again and again).
    polls = _polls(monkeypatch)
    capped = settings.model_copy(update={"max_waits_per_key": 0})
    with TestClient(create_app(capped)) as client:
        response = client.post(
            "/v1/recommendations", params={"wait": 60}, files={"file": ("a.npz", npz_upload(4))}
        )
    assert response.status_code == 202, response.text
    assert polls == ["queued"]


def _waiting(port: int) -> float:
    """``t2v_http_waiting_requests`` as the API's /metrics says it now."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == WAITING)
    return float(family.samples[0].value)


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_wait(settings: Settings, tmp_path: Path) -> None:
    """A real server, one wait allowed per key: a client asks to wait 600 s and hangs up; its
    slot is freed (not held until its deadline), so the next call gets the slot and waits,
    instead of being turned away with an immediate 202. Which request holds a slot is read
    off the API's own gauge of waiting requests."""
    port, log = free_port(), tmp_path / "api.log"
    api = start_api(settings, port, log, T2V_MAX_WAITS_PER_KEY="1")
    try:
        until = partial(eventually, processes=[api], log=log)
        with socket.create_connection(("127.0.0.1", port)) as hung_up:
            body = _multipart(npz_upload(5))
            hung_up.sendall(
                b"POST /v1/recommendations?wait=600 HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=B\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            until(lambda: _waiting(port) == 1, "the first request to wait")
        until(lambda: _waiting(port) == 0, "the hung-up request to free its slot")

        def ranked() -> httpx.Response:
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/recommendations",
                params={"wait": 10},
                files={"file": ("b.npz", npz_upload(6))},
                timeout=PATIENCE,
            )

        with in_background(ranked) as answer:
            until(lambda: _waiting(port) == 1, "the next request to get the slot and wait")
            response = answer()
    finally:
        stop(api)
    assert response.status_code == 202, response.text  # nothing embeds here: still queued
    assert "server" not in response.headers  # no software banner


def _multipart(data: bytes) -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--B--\r\n"
    )
