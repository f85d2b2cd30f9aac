"""Uploads are validated on a bounded pool: with one validation thread, four uploads sent at
once decode one at a time, and the API answers other requests meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import uploads
from app.settings import Settings
from tests.helpers import npz_upload


def test_validations_share_a_bounded_pool(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = threading.Lock()
    running, most = 0, 0
    validate = uploads.validate

    def slow(**kwargs: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.5)
        with lock:
            running -= 1
        return validate(**kwargs)

    monkeypatch.setattr(uploads, "validate", slow)
    one = settings.model_copy(update={"validation_threads": 1})
    with TestClient(create_app(one)) as client:
        answers: list[int] = []

        def send(i: int) -> None:
            response = client.post("/v1/tasks", files={"file": (f"{i}.npz", npz_upload(i))})
            answers.append(response.status_code)

        threads = [threading.Thread(target=send, args=(i,)) for i in (1, 2, 3, 4)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert client.get("/v1/zoo").status_code == 200  # not stuck behind the uploads
        # Stuck behind them, it would wait for the validations still queued, 1.8 s at least;
        # on two busy cores the answer itself once took 0.64 s.
        assert time.monotonic() - started < 1.0
        for thread in threads:
            thread.join(60)
    assert answers == [202] * 4
    assert most == 1
