"""A TorchScript or ONNX expert that would touch files is refused through the real paths: the
API's registration (a 422 problem naming the operator, before anything of it runs) and the
worker that downloads remote weights (the job fails with the same reason). Nothing it names is
ever created."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import Expert
from app.db.session import session_scope
from app.settings import Settings
from tests.helpers import run_job
from tests.hostile_models import Creates, OnLoad, Reads, Wraps, custom_domain_onnx, scripted_bytes

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
    ),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


def _register(client: TestClient, architecture: str, weights: bytes) -> Any:
    form = {"name": "hostile", "architecture": architecture, "input_size": "8"}
    return client.post("/v1/experts", data=form, files={"weights": ("w", weights)})


def _refused(response: Any) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/invalid-expert"), body
    detail: str = body["detail"]
    return detail


def _rows_named(settings: Settings, name: str) -> int:
    with session_scope(settings.resolved_database_url()) as session:
        query = select(func.count()).select_from(Expert).where(Expert.name == name)
        return int(session.scalar(query) or 0)


def test_a_torchscript_expert_that_maps_or_reads_files_is_refused_with_its_operator(
    client: TestClient, settings: Settings, sent: list[str], tmp_path: Path
) -> None:
    created = tmp_path / "created-by-the-expert.bin"
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")
    for module in (Wraps(Creates(str(created))), Reads(str(secret), 8)):
        detail = _refused(_register(client, "torchscript", scripted_bytes(module)))
        assert "aten::from_file" in detail, detail
        assert "operator" in detail
    on_load = tmp_path / "created-while-loading.bin"
    detail = _refused(_register(client, "torchscript", scripted_bytes(Wraps(OnLoad(str(on_load))))))
    assert "__setstate__" in detail, detail
    assert not created.exists()
    assert not on_load.exists()
    assert _rows_named(settings, "hostile") == 0
    assert sent == []


def test_an_onnx_expert_of_a_custom_domain_is_refused(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    detail = _refused(_register(client, "onnx", custom_domain_onnx()))
    assert "'com.microsoft'" in detail, detail
    assert sent == []


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback, and its address."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_worker_refuses_downloaded_torchscript_that_maps_a_file(
    client: TestClient, settings: Settings, sent: list[str], tmp_path: Path, www: tuple[Path, str]
) -> None:
    folder, base = www
    settings.allow_private_urls = True  # the server above listens on loopback
    created = tmp_path / "created-in-the-worker.bin"
    (folder / "expert.pt").write_bytes(scripted_bytes(Creates(str(created))))
    form = {
        "name": "remote-hostile",
        "architecture": "torchscript",
        "input_size": "8",
        "weights_uri": f"{base}/expert.pt",
    }
    accepted = client.post("/v1/experts", data=form)
    assert accepted.status_code == 202, accepted.text  # remote weights: the worker checks them
    run_job(settings, sent[-1])
    job = client.get(f"/v1/jobs/{sent[-1]}").json()
    assert job["status"] == "failed", job
    assert "aten::from_file" in job["error"]["detail"], job
    assert client.get("/v1/experts/remote-hostile").json()["status"] == "failed"
    assert not created.exists()
