"""API keys, scopes and tenant isolation, on SQLite and the real PostgreSQL: another tenant's
ids answer 404 on every endpoint that takes one; the zoo is readable with any key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.idempotency import claim, release
from app.api.main import create_app
from app.services import queue
from app.services.problems import ProblemError
from app.settings import Settings
from tests.helpers import create_key, npz_upload, revoke_key
from workers import tasks


@pytest.fixture
def keyed(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    keyed = settings.model_copy(update={"api_keys": "required"})
    monkeypatch.setattr(tasks, "get_settings", lambda: keyed)
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: _run(keyed, job_id, kind))
    return keyed


def _run(settings: Settings, job_id: str, kind: str) -> None:
    """Embeddings and rankings run at once; zoo management jobs stay queued here."""
    runners = {"embed": tasks.run_embed, "rank": tasks.run_rank}
    if kind in runners:
        runners[kind](job_id, settings)


def _auth(settings: Settings, tenant: str, *scopes: str) -> dict[str, str]:
    _, token = create_key(settings, tenant, list(scopes))
    return {"Authorization": f"Bearer {token}"}


def test_keys_are_required_and_checked(keyed: Settings) -> None:
    with TestClient(create_app(keyed)) as client:
        missing = client.get("/v1/zoo")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        assert (
            client.get("/v1/zoo", headers={"Authorization": "Bearer t2v_nope_x"}).status_code == 401
        )
        reader = _auth(keyed, "acme", "tasks:read")
        assert client.get("/v1/zoo", headers=reader).status_code == 200
        assert client.get("/v1/experts", headers=reader).json()["total"] == 3
        denied = client.post("/v1/tasks", headers=reader, files={"file": ("a.npz", npz_upload())})
        assert denied.status_code == 403
        assert denied.json()["type"].endswith("/insufficient-scope")
        admin = client.post("/v1/experts", headers=reader, data={"name": "x"})
        assert admin.status_code == 403
        assert client.get("/healthz").status_code == 200  # probes need no key
        anonymous = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload())})
        assert anonymous.status_code == 401  # refused before the body is read
        writer = _auth(keyed, "acme", "tasks:read", "tasks:write")
        mine = client.post("/v1/tasks", headers=writer, files={"file": ("a.npz", npz_upload())})
        ranked = f"/v1/tasks/{mine.json()['task_id']}/recommendations"
        # The default ranking was stored by the embedding job: any reader may read it.
        assert client.get(ranked, headers=reader).json()["method"] == "hybrid"
        logme = client.get(ranked, headers=reader, params={"method": "logme"})
        assert logme.status_code == 403  # a new worker ranking is work: it needs tasks:write

        _, token = create_key(keyed, "acme", ["tasks:read"])
        key_id = token.split("_")[1]
        assert revoke_key(keyed, key_id)
        revoked = client.get("/v1/zoo", headers={"Authorization": f"Bearer {token}"})
        assert revoked.status_code == 401


def test_a_tenant_never_sees_another_tenants_data(keyed: Settings) -> None:
    acme = _auth(keyed, "acme", "tasks:read", "tasks:write")
    globex = _auth(keyed, "globex", "tasks:read", "tasks:write")
    upload = npz_upload(2)
    with TestClient(create_app(keyed)) as client:
        mine = client.post("/v1/tasks", headers=acme, files={"file": ("a.npz", upload)}).json()
        task, job = mine["task_id"], mine["job_id"]
        ranked = client.get(f"/v1/tasks/{task}/recommendations", headers=acme)
        assert ranked.status_code == 200, ranked.text
        queued = client.get(
            f"/v1/tasks/{task}/recommendations", headers=acme, params={"method": "logme"}
        )
        rank_job = queued.json()["job_id"]
        for path in (
            f"/v1/jobs/{job}",
            f"/v1/jobs/{rank_job}",
            f"/v1/tasks/{task}",
            f"/v1/tasks/{task}/neighbors",
            f"/v1/tasks/{task}/recommendations",
            f"/v1/tasks/{task}/recommendations?method=logme",
        ):
            assert client.get(path, headers=acme).status_code in (200, 202), path
            theirs = client.get(path, headers=globex)
            assert theirs.status_code == 404, (path, theirs.text)
            assert theirs.json()["type"].endswith("/not-found")
        # The same bytes from the other tenant: its own task, its own job.
        other = client.post("/v1/tasks", headers=globex, files={"file": ("b.npz", upload)}).json()
        assert (other["task_id"], other["job_id"]) != (task, job)
        assert client.get(f"/v1/tasks/{other['task_id']}", headers=acme).status_code == 404
        # The zoo is shared.
        assert client.get("/v1/zoo/tasks", headers=globex).json()["total"] == 8


@pytest.mark.slow
def test_no_keys_only_on_loopback(tmp_path: Path) -> None:
    env = {**os.environ, "T2V_DATA_DIR": str(tmp_path), "T2V_API_KEYS": "off"}
    refused = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "only allowed on a loopback address" in refused.stderr


def test_idempotency_key_replays_or_refuses(keyed: Settings) -> None:
    acme = _auth(keyed, "acme", "tasks:read", "tasks:write")
    with TestClient(create_app(keyed)) as client:

        def post(key: str, upload: bytes) -> Any:
            headers = {**acme, "Idempotency-Key": key}
            return client.post("/v1/tasks", headers=headers, files={"file": ("a.npz", upload)})

        first = post("retry-1", npz_upload(1))
        assert first.status_code == 202
        again = post("retry-1", npz_upload(1))  # a new multipart boundary, the same request
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == first.headers["location"]
        uploads = sorted((keyed.data_dir / "uploads").rglob("*.*"))
        reused = post("retry-1", npz_upload(3))
        assert reused.status_code == 422
        assert reused.json()["type"].endswith("/idempotency-key-reused")
        assert sorted((keyed.data_dir / "uploads").rglob("*.*")) == uploads  # nothing kept
        # Keys are per tenant: another tenant's same key is its own.
        globex = _auth(keyed, "globex", "tasks:write")
        other = client.post(
            "/v1/tasks",
            headers={**globex, "Idempotency-Key": "retry-1"},
            files={"file": ("b.npz", npz_upload(3))},
        )
        assert other.status_code == 202
        bad = post("x" * 300, npz_upload(1))
        assert bad.json()["type"].endswith("/invalid-idempotency-key")


def test_rate_limit_per_key_and_cors_off_by_default(keyed: Settings) -> None:
    limited = keyed.model_copy(update={"rate_limit_per_minute": 3})
    reader = _auth(limited, "acme", "tasks:read")
    other = _auth(limited, "acme", "tasks:read")
    with TestClient(create_app(limited)) as client:
        for _ in range(3):
            assert client.get("/v1/experts", headers=reader).status_code == 200
        refused = client.get("/v1/experts", headers=reader)
        assert refused.status_code == 429
        assert refused.json()["type"].endswith("/rate-limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        assert client.get("/v1/experts", headers=other).status_code == 200  # per key
        browser = client.get("/v1/zoo", headers={**other, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in browser.headers
    allowed = keyed.model_copy(update={"cors_origins": ["https://ui.example"]})
    with TestClient(create_app(allowed)) as client:
        headers = {**_auth(allowed, "acme", "tasks:read"), "Origin": "https://ui.example"}
        answer = client.get("/v1/zoo", headers=headers)
        assert answer.headers["access-control-allow-origin"] == "https://ui.example"


def test_zoo_management_jobs_are_their_tenants_own(keyed: Settings) -> None:
    admin = _auth(keyed, "platform", "zoo:admin", "tasks:read")
    other = _auth(keyed, "acme", "tasks:read")
    with TestClient(create_app(keyed)) as client:
        form = {"name": "iso", "architecture": "resnet18", "input_size": "32"}
        registered = client.post(
            "/v1/experts", headers=admin, data={**form, "weights_uri": "random:3"}
        )
        assert registered.status_code == 202, registered.text
        job = registered.headers["location"]
        assert client.get(job, headers=admin).status_code == 200
        assert client.get(job, headers=other).status_code == 404
        assert client.get("/v1/experts/iso", headers=other).status_code == 200  # the zoo is shared


def test_a_key_is_claimed_before_the_work(settings: Settings) -> None:
    """Two requests with one key at once: the second waits (409) instead of working too."""
    assert claim(settings, "acme", "k", "print-a") is None
    with pytest.raises(ProblemError) as running:
        claim(settings, "acme", "k", "print-a")
    assert (running.value.status, running.value.kind) == (409, "idempotency-key-in-progress")
    with pytest.raises(ProblemError) as other:
        claim(settings, "acme", "k", "print-b")
    assert other.value.kind == "idempotency-key-reused"
    release(settings, "acme", "k")  # the first request failed: a retry may do the work
    assert claim(settings, "acme", "k", "print-b") is None
