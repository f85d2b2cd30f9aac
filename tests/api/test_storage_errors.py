"""A write the data directory's disk refuses answers 503 with Retry-After, as a database
outage does, naming no path; any other OS error is still the internal error. ``/readyz``
reports the free space and answers not ready below ``min_free_bytes``; ``/healthz`` does not
look at the disk. The ENOSPC is the kernel's own (``/dev/full``); tests/drills/test_disk.py
fills a real disk under the upload route."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings
from app.task2vec.errors import DatasetError
from tests.disks import DEV_FULL


def _client(tmp_path: Path, **values: object) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        zoo=str(tmp_path / "no-zoo"),  # not ready for that too: only the disk's check counts
        api_keys="off",
        **values,
    )
    app = create_app(settings)

    @app.get("/v1/saving")
    def saving() -> None:
        with DEV_FULL.open("wb", buffering=0) as out:
            out.write(b"bytes")

    @app.get("/v1/unpacking")
    def unpacking() -> None:
        try:
            saving()
        except OSError:
            raise DatasetError("cannot unpack the archive", "invalid-archive") from None

    @app.get("/v1/missing")
    def missing() -> None:
        Path("/nonexistent/upload").read_bytes()

    return TestClient(app, raise_server_exceptions=False)


def test_a_full_disk_answers_503_with_retry_after_and_no_path(tmp_path: Path) -> None:
    client = _client(tmp_path)
    for path in ("/v1/saving", "/v1/unpacking"):
        answer = client.get(path)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        assert body["type"].endswith("/storage-unavailable")
        assert body["title"] == "Storage is unavailable"
        assert "no space" in body["detail"]
        assert str(DEV_FULL) not in answer.text
    assert client.get("/v1/missing").status_code == 500


def test_readyz_reports_the_free_space_and_is_not_ready_below_the_minimum(
    tmp_path: Path,
) -> None:
    ready = _client(tmp_path, min_free_bytes=2**62).get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage"] == "unavailable"
    assert ready.json()["data_free_bytes"] > 0
    assert str(tmp_path) not in ready.text
    assert _client(tmp_path, min_free_bytes=2**62).get("/healthz").status_code == 200
    roomy = _client(tmp_path, min_free_bytes=0).get("/readyz")
    assert roomy.json()["checks"]["storage"] == "ok"
