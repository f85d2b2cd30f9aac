"""POST /v1/zoo/import: for admins only; a bundle is verified in full before the answer, and a
worker imports it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.db.models import Job
from app.db.session import session_scope
from app.services.layout import DataLayout
from app.settings import Settings
from app.zoo.zoo import Zoo
from tests.bundles import REFUSALS, empty_deployment, naming
from tests.helpers import create_key, run_job
from tests.services.test_bundles import OUTSIDE, expanding
from tests.zoo.test_bundle import rewrite
from workers import tasks


def test_the_api_imports_for_admins_only(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    settings = empty_deployment(tmp_path, api_keys="required")
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    _, reader = create_key(settings, "acme", ["tasks:write", "tasks:read"])
    _, admin = create_key(settings, "platform", ["zoo:admin", "tasks:read"])
    body = exported[0].read_bytes()
    with TestClient(create_app(settings)) as client:
        url = "/v1/zoo/import"
        files = {"file": ("zoo.t2vzoo", body)}
        denied = client.post(url, files=files, headers={"Authorization": f"Bearer {reader}"})
        assert denied.status_code == 403
        auth = {"Authorization": f"Bearer {admin}"}
        tampered = rewrite(exported[0], REFUSALS["tampered"]).read_bytes()
        refused = client.post(url, files={"file": ("zoo.t2vzoo", tampered)}, headers=auth)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/bundle-hash-mismatch")
        assert "matrix.npy" in refused.json()["detail"]
        internal = {"callback_url": "http://127.0.0.1:9/hook"}  # the webhook guard holds
        hook = client.post(url, params=internal, files=files, headers=auth)
        assert hook.json()["type"].endswith("/invalid-callback-url")
        assert sent == []
        answer = client.post(url, files=files, headers=auth)
        assert answer.status_code == 202, answer.text
        accepted = answer.json()
        assert (accepted["tasks"], accepted["experts"]) == (9, 3)
        assert (
            answer.headers["location"] == f"/v1/jobs/{accepted['job_id']}" == "/v1/jobs/" + sent[-1]
        )
        run_job(settings, sent[-1])
        job = client.get(accepted["links"]["job"], headers=auth).json()
        assert job["status"] == "succeeded", job
        assert (job["result"]["tasks"], job["result"]["experts"]) == (9, 3)
        assert not list(DataLayout.of(settings).bundles.rglob("*.t2vzoo"))  # gone once imported
        zoo = client.get("/v1/zoo", headers=auth).json()
        assert (zoo["tasks"], zoo["experts"]) == (9, 3)
        conflict = client.post(url, files=files, headers=auth)
        assert conflict.status_code == 409
        assert conflict.json()["type"].endswith("/bundle-conflict")


def _files(settings: Settings) -> list[str]:
    root = settings.data_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _jobs(settings: Settings) -> int:
    with session_scope(settings.resolved_database_url()) as session:
        return len(list(session.query(Job)))


def test_the_api_refuses_a_bundle_naming_a_file_here_before_any_job(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    """A task that names a path as its dataset: 422 naming the task and the field, the same
    answer whether the file exists, no job and no file kept."""
    settings = empty_deployment(tmp_path, api_keys="required")
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    _, admin = create_key(settings, "platform", ["zoo:admin", "tasks:read"])
    auth = {"Authorization": f"Bearer {admin}"}
    answers = []
    with TestClient(create_app(settings)) as client:
        before = _files(settings)
        for target in OUTSIDE:
            body = rewrite(exported[0], naming(target)).read_bytes()
            answer = client.post("/v1/zoo/import", files={"file": ("z.t2vzoo", body)}, headers=auth)
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            answers.append({k: answer.json()[k] for k in ("type", "title", "status", "detail")})
        assert _files(settings) == before
    assert answers[0] == answers[1]
    assert answers[0]["type"].endswith("/bundle-external-reference")
    assert "field 'dataset'" in answers[0]["detail"]
    assert sent == []
    assert _jobs(settings) == 0


def test_the_api_refuses_a_bundle_past_the_decompressed_limit(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    crafted, limit = expanding(exported[0], tmp_path)
    settings = empty_deployment(tmp_path, api_keys="required", max_bundle_bytes=limit)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    _, admin = create_key(settings, "platform", ["zoo:admin", "tasks:read"])
    auth = {"Authorization": f"Bearer {admin}"}
    with TestClient(create_app(settings)) as client:
        before = _files(settings)
        body = crafted.read_bytes()
        answer = client.post("/v1/zoo/import", files={"file": ("z.t2vzoo", body)}, headers=auth)
        assert answer.status_code == 422, answer.text
        assert answer.json()["type"].endswith("/bundle-too-large")
        assert f"{limit} bytes" in answer.json()["detail"]
        assert "T2V_MAX_BUNDLE_BYTES" in answer.json()["detail"]
        assert _files(settings) == before
    assert sent == []
    assert _jobs(settings) == 0
