"""Zoo management through the API, on SQLite and the real PostgreSQL: register an expert (by
upload, by file path, by URL), add a task to the zoo; the worker's code computes the matrix
entries and publishes a version, and the API swaps to it without a restart."""

from __future__ import annotations

import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Expert, IndexVersionRow, MatrixEntry, Recommendation, ZooTask
from app.db.session import session_scope
from app.services import publishing, queue
from app.services.jobs import JobKind
from app.services.serving import ZooStates
from app.settings import Settings
from app.zoo.presets import tiny
from app.zoo.tasks import TaskSpec, materialize
from tests.helpers import PATIENCE, cnn_weights, eventually, run_job


def _serving(client: TestClient, tasks: int, experts: int) -> dict[str, Any]:
    """The zoo the API serves, once it is a version of this size (it loads in the
    background)."""

    def of_that_size() -> dict[str, Any] | None:
        zoo: dict[str, Any] = client.get("/v1/zoo").json()
        return zoo if (zoo["tasks"], zoo["experts"]) == (tasks, experts) else None

    return eventually(of_that_size, f"a zoo of {tasks} tasks and {experts} experts")


def _expert_form(name: str, **extra: str) -> dict[str, str]:
    return {"name": name, "architecture": "cnn-4x1", "input_size": "28", **extra}


def _npz(spec: TaskSpec) -> bytes:
    data = materialize(spec)
    buffer = io.BytesIO()
    np.savez(buffer, x=data.images, y=np.array(data.classes)[data.labels])
    return buffer.getvalue()


def test_register_an_expert_and_the_api_swaps_to_the_new_version(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    first = _serving(client, 8, 3)
    response = client.post(
        "/v1/experts",
        data=_expert_form("cnn-4x1-random", tags="random,tiny"),
        files={"weights": ("w.pt", cnn_weights())},
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{sent[-1]}"
    pending = client.get("/v1/experts/cnn-4x1-random").json()
    assert (pending["status"], pending["in_served_zoo"]) == ("pending", False)
    assert client.get("/v1/zoo").json()["pending"]["experts"] == 1

    run_job(settings, sent[-1])
    job = client.get(f"/v1/jobs/{sent[-1]}").json()
    assert job["status"] == "succeeded", job
    assert (job["result"]["tasks"], job["result"]["experts"]) == (8, 4)
    assert "matrix" in job["timings"]

    # The API swaps by itself, with no request asking for the zoo.
    zoos: ZooStates = client.app.state.zoos  # type: ignore[attr-defined]
    eventually(
        lambda: zoos.served is not None and zoos.served.version.experts == 4,
        "the API to load the new version by itself",
    )
    second = _serving(client, 8, 4)
    assert second["version"] != first["version"]
    ready = client.get("/v1/experts/cnn-4x1-random").json()
    assert (ready["status"], ready["in_served_zoo"]) == ("ready", True)
    assert 0 <= ready["mean_error"] <= 1
    assert ready["tags"] == ["random", "tiny"]
    assert client.get("/v1/experts").json()["total"] == 4

    # Users' rankings now include it.
    user = client.post("/v1/tasks", files={"file": ("u.npz", _npz(tiny()[3]))}).json()
    run_job(settings, user["job_id"])
    ranked = client.get(
        f"/v1/tasks/{user['task_id']}/recommendations", params={"method": "learned", "k": 10}
    ).json()
    assert "cnn-4x1-random" in {r["expert"] for r in ranked["ranking"]}
    assert ranked["zoo_version"] == second["version"]
    with session_scope(settings.resolved_database_url()) as session:
        version_id = session.scalar(
            select(IndexVersionRow.id).where(IndexVersionRow.content == second["version"])
        )
        served = session.scalars(select(Recommendation)).all()
        # The embedding job's default ranking and the learned one: both on the new version.
        assert {(s.method, s.index_version_id) for s in served} == {
            ("hybrid", version_id),
            ("learned", version_id),
        }


def test_add_a_zoo_task(client: TestClient, settings: Settings, sent: list[str]) -> None:
    _serving(client, 8, 3)
    base = tiny()[1]
    spec = TaskSpec("shoes-again", base.source, base.groups, base.group_names, 90, seed=7)
    upload = _npz(spec)
    response = client.post(
        "/v1/zoo/tasks",
        data={"name": "shoes-again", "domain": "clothing"},
        files={"file": ("shoes.npz", upload)},
    )
    assert response.status_code == 202, response.text
    assert client.get("/v1/zoo/tasks/shoes-again").json()["status"] == "pending"
    run_job(settings, sent[-1])
    job = client.get(f"/v1/jobs/{sent[-1]}").json()
    assert job["status"] == "succeeded", job
    assert {"features", "fisher", "matrix"} <= set(job["timings"])

    _serving(client, 9, 3)
    added = client.get("/v1/zoo/tasks/shoes-again").json()
    assert (added["status"], added["in_served_zoo"], added["domain"]) == ("ready", True, "clothing")
    assert added["size"] == 90
    assert added["best_expert"] is not None
    # The same images uploaded by a user: their nearest zoo task is the one just added.
    user = client.post("/v1/tasks", files={"file": ("same.npz", upload)}).json()
    run_job(settings, user["job_id"])
    near = client.get(f"/v1/tasks/{user['task_id']}/neighbors", params={"k": 1}).json()
    assert near["neighbors"][0]["task"] == "shoes-again"
    assert near["neighbors"][0]["distance"] == pytest.approx(0.0, abs=1e-9)


def test_weights_by_file_path_and_by_url(
    client: TestClient, settings: Settings, sent: list[str], tmp_path: Path
) -> None:
    _serving(client, 8, 3)
    first = publishing.current_version(settings)
    assert first is not None
    settings.zoo_versions_kept = 2
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "w.pt").write_bytes(cnn_weights(seed=1))
    (tmp_path / "secret.pt").write_bytes(cnn_weights(seed=1))
    by_path = _expert_form("by-path", weights_uri=str(tmp_path / "www" / "w.pt"))
    refused = client.post("/v1/experts", data=by_path)
    assert "T2V_WEIGHTS_IMPORT_DIR" in _problem(refused, 422, "invalid-expert")["detail"]
    settings.weights_import_dir = tmp_path / "www"
    outside = _expert_form("by-path", weights_uri=str(tmp_path / "www" / ".." / "secret.pt"))
    escaped = client.post("/v1/experts", data=outside)
    assert "not a file under" in _problem(escaped, 422, "invalid-expert")["detail"]
    by_path = client.post("/v1/experts", data=by_path)
    assert by_path.status_code == 202, by_path.text
    run_job(settings, sent[-1])

    settings.allow_private_urls = True  # the server below listens on loopback
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        missing = client.post("/v1/experts", data=_expert_form("by-url", weights_uri=f"{base}/x"))
        assert missing.status_code == 202  # checked by the worker, which downloads it
        run_job(settings, sent[-1])
        failed = client.get("/v1/experts/by-url").json()
        assert failed["status"] == "failed"
        assert failed["error"]["type"].endswith("/invalid-expert")
        job = client.get(f"/v1/jobs/{sent[-1]}").json()
        assert job["status"] == "failed"
        assert "could not be fetched" in job["error"]["detail"]

        # A failed expert's name can be registered again.
        again = client.post("/v1/experts", data=_expert_form("by-url", weights_uri=f"{base}/w.pt"))
        assert again.status_code == 202, again.text
        run_job(settings, sent[-1])
    finally:
        server.shutdown()
    _serving(client, 8, 5)
    experts = {e["id"]: e for e in client.get("/v1/experts").json()["items"]}
    assert experts["by-url"]["status"] == experts["by-path"]["status"] == "ready"
    # Same bytes by path and by URL: one stored file.
    with session_scope(settings.resolved_database_url()) as session:
        stored = set(session.scalars(select(Expert.weights).where(Expert.name.like("by-%"))))
    assert len(stored) == 1
    assert Path(stored.pop()).is_relative_to(settings.data_dir / "experts")
    # Three versions published, two folders kept; every row stays.
    with session_scope(settings.resolved_database_url()) as session:
        folders = [Path(f) for f in session.scalars(select(IndexVersionRow.zoo))]
    assert len(folders) == 3
    assert [f.is_dir() for f in folders] == [f != first.folder for f in folders]


def _problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"].endswith(f"/{kind}"), body
    return body


def test_bad_registrations_are_refused_and_store_nothing(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    _serving(client, 8, 3)
    weights = ("w.pt", cnn_weights())
    post = partial(client.post, "/v1/experts")
    _problem(post(data=_expert_form("../x"), files={"weights": weights}), 422, "invalid-name")
    wrong = post(data=_expert_form("a", architecture="vgg"), files={"weights": weights})
    assert "vgg" in _problem(wrong, 422, "invalid-expert")["detail"]
    garbage = post(data=_expert_form("a"), files={"weights": ("w.pt", b"not torch")})
    _problem(garbage, 422, "invalid-expert")
    mismatched = post(data=_expert_form("a", architecture="cnn-8x1"), files={"weights": weights})
    _problem(mismatched, 422, "invalid-expert")
    both = post(data=_expert_form("a", weights_uri="/nope.pt"), files={"weights": weights})
    _problem(both, 422, "invalid-expert")
    _problem(post(data=_expert_form("a")), 422, "invalid-expert")
    no_file = post(data=_expert_form("a", weights_uri="/does/not/exist.pt"))
    assert "/does/not/exist.pt" in _problem(no_file, 422, "invalid-expert")["detail"]
    source = post(data=_expert_form("a", source_task="nope"), files={"weights": weights})
    _problem(source, 422, "invalid-expert")
    for mean in ("1,2", "1e999,0,0", "nan,0,0"):
        form = _expert_form("a", mean=mean)
        _problem(post(data=form, files={"weights": weights}), 422, "invalid-expert")
    _problem(post(data=_expert_form("a", weights_uri="x" * 1001)), 422, "invalid-request")
    taken = client.get("/v1/experts").json()["items"][0]["id"]
    _problem(post(data=_expert_form(taken), files={"weights": weights}), 409, "expert-exists")

    zoo_post = partial(client.post, "/v1/zoo/tasks")
    bad = zoo_post(data={"name": "broken"}, files={"file": ("b.zip", b"not an archive")})
    _problem(bad, 422, "not-a-dataset")
    existing = client.get("/v1/zoo/tasks").json()["items"][0]["name"]
    dup = zoo_post(data={"name": existing}, files={"file": ("s.npz", _npz(tiny()[1]))})
    _problem(dup, 409, "zoo-task-exists")

    assert sent == []
    with session_scope(settings.resolved_database_url()) as session:
        assert len(session.scalars(select(Expert)).all()) == 3
        assert len(session.scalars(select(ZooTask)).all()) == 8
    stored = [p for p in (settings.data_dir / "experts").rglob("*") if p.is_file()]
    imported = {p for p in stored if p.suffix == ".pt"}
    with session_scope(settings.resolved_database_url()) as session:
        assert imported == {Path(w) for w in session.scalars(select(Expert.weights)) if "/" in w}
    assert not [p for p in (settings.data_dir / "uploads").rglob("*") if p.is_file()]
    leftovers = [p for p in settings.data_dir.rglob("*") if p.suffix in (".tmp", ".download")]
    assert leftovers == []


def test_a_dead_broker_fails_the_item_and_frees_its_name(
    client: TestClient, settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serving(client, 8, 3)

    def refuse(job_id: str, kind: JobKind, broker: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "dispatch", refuse)
    form, files = _expert_form("later"), {"weights": ("w.pt", cnn_weights())}
    down = client.post("/v1/experts", data=form, files=files)
    assert "broker down" not in _problem(down, 503, "broker-unavailable")["detail"]
    assert client.get("/v1/experts/later").json()["status"] == "failed"
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: sent.append(job_id))
    assert client.post("/v1/experts", data=form, files=files).status_code == 202
    assert client.get("/v1/experts/later").json()["status"] == "pending"


def test_an_expert_and_a_task_added_at_once(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    """Two workers at once: each computes only what it sees as ready, and the later publish
    fills the entry between the new task and the new expert."""
    _serving(client, 8, 3)
    form, files = _expert_form("concurrent"), {"weights": ("w.pt", cnn_weights(seed=3))}
    assert client.post("/v1/experts", data=form, files=files).status_code == 202
    base = tiny()[2]
    spec = TaskSpec("concurrent-task", base.source, base.groups, base.group_names, 80, seed=5)
    upload = {"file": ("t.npz", _npz(spec))}
    assert client.post("/v1/zoo/tasks", data={"name": spec.name}, files=upload).status_code == 202
    threads = [threading.Thread(target=run_job, args=(settings, job_id)) for job_id in sent]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
        assert not thread.is_alive(), "a job is stuck"
    for job_id in sent:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
    _serving(client, 9, 4)
    with session_scope(settings.resolved_database_url()) as session:
        assert len(session.scalars(select(MatrixEntry)).all()) == 9 * 4


def test_idempotency_key_on_zoo_management(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    _serving(client, 8, 3)
    weights = {"weights": ("w.pt", cnn_weights(seed=4))}
    headers = {"Idempotency-Key": "expert-1"}
    first = client.post("/v1/experts", data=_expert_form("idem"), files=weights, headers=headers)
    again = client.post("/v1/experts", data=_expert_form("idem"), files=weights, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json()
    assert len(sent) == 1
    other = client.post("/v1/experts", data=_expert_form("idem2"), files=weights, headers=headers)
    assert _problem(other, 422, "idempotency-key-reused")
    without = client.post("/v1/experts", data=_expert_form("idem"), files=weights)
    _problem(without, 409, "expert-exists")
