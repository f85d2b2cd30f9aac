"""A platform plugged in, end to end on PostgreSQL + Redis with real processes (the API under
uvicorn, a Celery worker): it registers an ONNX expert and a torchvision expert through the
Python client, is called back (signed) when each is in the zoo, ranks a dataset with the new
zoo version through the client, and is called back for that job too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from task2vec_client import Client, UploadRanking, ZooOut
from task2vec_client.webhooks import verify

from app.services import deliveries
from app.settings import Settings
from tests.helpers import (
    PATIENCE,
    eventually,
    free_port,
    fresh_database,
    npz_upload,
    onnx_model,
    service_settings,
    start_api,
    stop,
    torchvision_weights,
    worker,
)
from tests.receiver import Receiver, receiving

REDIS = "redis://127.0.0.1:6379/10"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]


@pytest.fixture
def platform(tiny_zoo: Path, tmp_path: Path) -> Iterator[tuple[Settings, Client, Receiver]]:
    """PostgreSQL, Redis, a worker and the API, callbacks to loopback allowed; the client."""
    redis.Redis.from_url(REDIS).flushdb()
    with fresh_database("postgresql", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path).model_copy(
            update={"broker_url": REDIS, "allow_private_urls": True}
        )
        allowed = {"T2V_ALLOW_PRIVATE_URLS": "true", "T2V_WEBHOOK_RETRY_BASE_SECONDS": "0.5"}
        port = free_port()
        with (
            worker(settings, tmp_path / "worker.log", **allowed) as running,
            receiving() as receiver,
        ):
            api = start_api(settings, port, tmp_path / "api.log", **allowed)
            receiver.senders = [running, api]
            try:
                with Client(f"http://127.0.0.1:{port}", timeout=PATIENCE) as client:
                    yield settings, client, receiver
            finally:
                stop(api)


def _signed(settings: Settings, receiver: Receiver, path: str, tries: int = 1) -> dict[str, object]:
    """The job view delivered to ``path`` (after ``tries`` tries), its signature verified."""
    got = receiver.wait(path, tries)[-1]
    verify(got.body, got.headers["X-T2V-Signature"], deliveries.secret_for(settings, "local"))
    assert got.headers["X-T2V-Event"] == "job.succeeded"
    view: dict[str, object] = json.loads(got.body)
    return view


def test_register_rank_and_be_called_back(
    platform: tuple[Settings, Client, Receiver],
) -> None:
    settings, client, receiver = platform
    before = client.zoo()
    onnx = client.register_expert(
        "edge-onnx", "onnx", 28, onnx_model(), callback_url=receiver.plan("/onnx", 503)
    )
    vision = client.register_expert(
        "mnv3",
        "torchvision/mobilenet_v3_small",
        28,
        torchvision_weights("mobilenet_v3_small"),
        tags=["torchvision"],
        callback_url=receiver.plan("/mnv3"),
    )
    for accepted, path, tries in ((onnx, "/onnx", 2), (vision, "/mnv3", 1)):
        view = _signed(settings, receiver, path, tries)  # the first /onnx try answered 503
        assert view["id"] == accepted.job_id
        assert client.wait_for(accepted.job_id, timeout=PATIENCE).status == "succeeded"

    def with_both() -> ZooOut | None:
        zoo = client.zoo()
        return zoo if zoo.experts == before.experts + 2 else None

    zoo = eventually(with_both, "the API to serve the version with both experts")
    assert zoo.version != before.version
    assert client.expert("edge-onnx").in_served_zoo

    answer = client.recommend(
        npz_upload(2), k=zoo.experts, wait=PATIENCE, callback_url=receiver.plan("/rank")
    )
    assert isinstance(answer, UploadRanking), answer
    assert answer.zoo_version == zoo.version
    assert {"edge-onnx", "mnv3"} <= {r.expert for r in answer.ranking}
    view = _signed(settings, receiver, "/rank")
    assert view["id"] == answer.job_id
