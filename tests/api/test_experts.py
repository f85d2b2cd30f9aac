"""Registering experts a team already has over HTTP: a torchvision classifier by name, an ONNX
model, a TorchScript module, a timm model with its own normalisation. Each is checked by a
forward pass before anything is kept; a refused one leaves no row and no file."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import Expert
from app.db.session import session_scope
from app.services.layout import DataLayout
from app.settings import Settings
from app.task2vec.probes import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import (
    NanFeatures,
    ScalarOutput,
    eventually,
    onnx_model,
    run_job,
    small_extractor,
    torchvision_weights,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def _served_experts(client: TestClient, experts: int) -> dict[str, Any]:
    def served() -> dict[str, Any] | None:
        zoo: dict[str, Any] = client.get("/v1/zoo").json()
        return zoo if zoo["experts"] == experts else None

    return eventually(served, f"the API to serve {experts} experts")


def _register(client: TestClient, name: str, architecture: str, weights: bytes, **form: str) -> Any:
    data = {"name": name, "architecture": architecture, "input_size": "28", **form}
    return client.post("/v1/experts", data=data, files={"weights": ("w", weights)})


def test_torchvision_onnx_and_torchscript_experts_join_the_zoo(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    _served_experts(client, 3)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(small_extractor(1)), scripted)
    for name, architecture, weights in (
        ("mnv3", "torchvision/mobilenet_v3_small", torchvision_weights("mobilenet_v3_small")),
        ("small-onnx", "onnx", onnx_model()),
        ("small-script", "torchscript", scripted.getvalue()),
    ):
        response = _register(client, name, architecture, weights)
        assert response.status_code == 202, response.text
        run_job(settings, sent[-1])
        job = client.get(f"/v1/jobs/{sent[-1]}").json()
        assert job["status"] == "succeeded", job
    _served_experts(client, 6)
    for name in ("mnv3", "small-onnx", "small-script"):
        expert = client.get(f"/v1/experts/{name}").json()
        assert (expert["status"], expert["in_served_zoo"]) == ("ready", True), expert
        assert expert["mean"] == pytest.approx(IMAGENET_MEAN)  # the default when omitted
        assert expert["std"] == pytest.approx(IMAGENET_STD)
        assert 0 <= expert["mean_error"] <= 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_timm_expert_with_its_preset_normalisation(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    import timm
    from safetensors.torch import save

    net = timm.create_model("resnet10t", pretrained=False)
    response = _register(
        client, "timm-r10", "timm/resnet10t", save(net.state_dict()), normalisation="preset"
    )
    assert response.status_code == 202, response.text
    expert = client.get("/v1/experts/timm-r10").json()
    assert expert["mean"] == pytest.approx(net.pretrained_cfg["mean"])
    both = _register(client, "x", "timm/resnet10t", b"", normalisation="preset", mean="0,0,0")
    assert both.status_code == 422
    assert "either mean and std, or normalisation" in both.json()["detail"]


def test_a_model_that_fails_its_forward_pass_is_refused_and_nothing_is_kept(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    _served_experts(client, 3)
    weights_dir = DataLayout.of(settings).weights
    before = sorted(weights_dir.iterdir()) if weights_dir.exists() else []
    cases = [
        ("onnx", onnx_model(NanFeatures()), "NaN or infinite features"),
        ("onnx", onnx_model(ScalarOutput()), "returns shape () for 4 images"),
        ("onnx", b"\x08\x01garbage", "not an ONNX model"),
        ("torchscript", b"PK\x03\x04junk", "not a TorchScript module"),
        ("torchvision/resnet18", torchvision_weights("squeezenet1_1"), "do not fit"),
        ("torchvision/fasterrcnn_resnet50_fpn", b"", "no classification builder"),
        ("keras/resnet50", b"", "unknown expert architecture 'keras/resnet50'"),
    ]
    for architecture, weights, why in cases:
        response = _register(client, "refused", architecture, weights)
        assert response.status_code == 422, (architecture, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert why in response.json()["detail"], response.json()
    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Expert)) == 3
    after = sorted(weights_dir.iterdir()) if weights_dir.exists() else []
    assert after == before
    assert sent == []
