"""Uploads are validated on a bounded pool: with one validation thread, four uploads sent at
once decode one at a time, and the API answers other requests meanwhile.

The first validation is held until the test lets it go, so what is asserted is an order of
events (one validating, three waiting, another request answered), however busy the machine."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.api.shares import FairPool
from app.services import uploads
from app.settings import Settings
from tests.helpers import PATIENCE, eventually, in_background, npz_upload


def test_validations_share_a_bounded_pool(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lock, release = threading.Lock(), threading.Event()
    running, most = 0, 0
    validate = uploads.validate

    def held(**kwargs: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            assert release.wait(PATIENCE), "never released"
            return validate(**kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(uploads, "validate", held)
    one = settings.model_copy(update={"validation_threads": 1})
    with TestClient(create_app(one)) as client, ExitStack() as uploading:
        pool: FairPool = client.app.state.validation  # type: ignore[attr-defined]

        def send(i: int) -> int:
            response = client.post("/v1/tasks", files={"file": (f"{i}.npz", npz_upload(i))})
            return response.status_code

        answers = [
            uploading.enter_context(in_background(lambda i=i: send(i), release))
            for i in (1, 2, 3, 4)
        ]

        def queued() -> bool:
            assert most <= 1, "two validations ran at once"
            return running == 1 and pool.waiting == 3

        # One upload holds the pool's only thread; the other three wait for it.
        eventually(queued, "one validation running and three uploads queued")
        assert client.get("/v1/zoo").status_code == 200  # not stuck behind the uploads
        assert (running, pool.waiting) == (1, 3)
        release.set()
        assert [answer() for answer in answers] == [202] * 4
    assert most == 1
