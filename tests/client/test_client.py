"""The Python client against the real API (in process): typed answers, upload progress,
waiting for a job, problem errors, retries that honour Retry-After with one Idempotency-Key,
the async client, and its models checked field by field against the service's OpenAPI."""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from task2vec_client import (
    AsyncClient,
    Client,
    ItemAccepted,
    JobAccepted,
    ProblemError,
    Ranking,
    TaskAccepted,
    ZooOut,
)
from task2vec_client.models import MODELS

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import npz_upload, onnx_model, run_job


def test_upload_wait_and_rank_through_the_client(
    client: TestClient, settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    t2v = Client(http=client)
    progress: list[tuple[int, int]] = []
    upload = npz_upload(2)
    accepted = t2v.upload_task(upload, filename="shoes.npz", progress=lambda *p: progress.append(p))
    assert isinstance(accepted, TaskAccepted)
    assert progress[-1] == (len(upload), len(upload))
    run_job(settings, accepted.job_id)
    polled: list[str] = []
    job = t2v.wait_for(accepted.job_id, timeout=30, on_poll=lambda j: polled.append(j.status))
    assert job.status == "succeeded"
    assert polled == ["succeeded"]
    ranked = t2v.recommendations(accepted.task_id, k=2)
    assert isinstance(ranked, Ranking)
    assert [r.rank for r in ranked.ranking] == [1, 2]
    queued = t2v.recommendations(accepted.task_id, method="logme")
    assert isinstance(queued, JobAccepted)
    assert t2v.neighbors(accepted.task_id, k=3).neighbors[0].distance == pytest.approx(0, abs=1e-9)
    assert t2v.task(accepted.task_id).dataset.filename == "shoes.npz"
    with pytest.raises(ProblemError) as missing:
        t2v.job("nope")
    assert (missing.value.status, missing.value.kind) == (404, "not-found")
    assert "nope" in missing.value.detail


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_register_an_expert_through_the_client(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    t2v = Client(http=client)
    progress: list[tuple[int, int]] = []
    model = onnx_model()
    accepted = t2v.register_expert(
        "small-onnx",
        "onnx",
        28,
        model,
        tags=["onnx", "small"],
        progress=lambda *p: progress.append(p),
    )
    assert isinstance(accepted, ItemAccepted)
    assert progress[-1] == (len(model), len(model))
    run_job(settings, accepted.job_id)
    assert t2v.wait_for(accepted.job_id, timeout=30).status == "succeeded"
    expert = t2v.expert("small-onnx")
    assert (expert.architecture, expert.tags, expert.status) == ("onnx", ["onnx", "small"], "ready")
    with pytest.raises(ProblemError) as refused:  # a loopback callback without the setting
        t2v.register_expert(
            "other", "onnx", 28, model, mean=(0.5, 0.5, 0.5), callback_url="http://127.0.0.1:9/"
        )
    assert (refused.value.status, refused.value.kind) == (422, "invalid-callback-url")
    with pytest.raises(ProblemError) as invalid:
        t2v.register_expert("other", "onnx", 28, model, std=(0.0, 1.0, 1.0))
    assert "std: positive numbers only" in invalid.value.detail


def test_429_and_503_are_retried_after_retry_after_with_one_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json={"type": "x/rate-limited"}
            )
        if len(seen) == 2:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"type": "x/broker"})
        body = {"task_id": "t", "job_id": "j", "status": "queued", "skipped": [], "links": {}}
        return httpx.Response(202, json=body)

    http = httpx.Client(base_url="http://t2v", transport=httpx.MockTransport(answer))
    accepted = Client(api_key="t2v_k_s", http=http).upload_task(b"bytes", filename="a.zip")
    assert accepted.job_id == "j"
    assert len(seen) == 3
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(keys) == 1
    assert all(r.headers["authorization"] == "Bearer t2v_k_s" for r in seen)


def test_the_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_API_KEY", "t2v_env_key")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"type": "x/unauthorized", "title": "An API key is needed"})

    http = httpx.Client(base_url="http://t2v", transport=httpx.MockTransport(answer))
    with pytest.raises(ProblemError) as refused:
        Client(http=http).zoo()
    assert refused.value.status == 401
    assert seen[0].headers["authorization"] == "Bearer t2v_env_key"
    assert "idempotency-key" not in seen[0].headers  # GETs need none


def test_the_async_client(settings: Settings, sent: list[str]) -> None:
    app = create_app(settings)

    async def scenario() -> tuple[ZooOut, Any]:
        transport = httpx.ASGITransport(app=app)
        http = httpx.AsyncClient(transport=transport, base_url="http://t2v")
        async with AsyncClient(http=http) as t2v:
            zoo = await t2v.zoo()
            accepted = await t2v.upload_task(npz_upload(3), filename="a.npz")
            return zoo, accepted

    zoo, accepted = asyncio.run(scenario())
    assert zoo.tasks == 8
    assert isinstance(accepted, TaskAccepted)
    assert sent == [accepted.job_id]


def test_the_client_models_match_the_openapi(settings: Settings) -> None:
    """Each client model has the fields, and the required ones, of the schema it mirrors."""
    schemas = create_app(settings).openapi()["components"]["schemas"]
    assert len(MODELS) >= 14
    for name, model in MODELS.items():
        schema = schemas[name]
        assert set(model.model_fields) == set(schema["properties"]), name
        required = {f for f, info in model.model_fields.items() if info.is_required()}
        assert required == set(schema.get("required", [])), name


def test_the_client_stands_alone() -> None:
    """It imports httpx, pydantic and the standard library only: never the service."""
    root = Path(__file__).resolve().parents[2] / "client" / "task2vec_client"
    imported = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "task2vec_client"}
    assert third_party == {"httpx", "pydantic"}


def test_a_ranked_expert_reads_its_evidence_whatever_the_service_left_out() -> None:
    from task2vec_client.models import RankedExpert

    def item(evidence: dict[str, Any]) -> RankedExpert:
        return RankedExpert(rank=1, expert="e", score=0.0, evidence=evidence)

    full = item({"predicted_error": 0.12, "error_interval": [0.08, 0.2], "interval_level": 0.8})
    assert (full.predicted_error, full.error_interval, full.interval_level) == (
        0.12,
        (0.08, 0.2),
        0.8,
    )
    for evidence in ({}, {"predicted_error": "n/a", "error_interval": [0.1]}):
        bare = item(evidence)
        assert (bare.predicted_error, bare.error_interval, bare.interval_level) == (None,) * 3
    assert item({"error_interval": [0.1, None]}).error_interval is None
