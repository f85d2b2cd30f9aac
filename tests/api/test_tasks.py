"""The API against SQLite and the real PostgreSQL. Jobs run through the worker's own code
(``run_embed``/``run_rank``) as the broker would deliver them; tests/e2e/test_stack.py runs
real worker processes."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api import problems
from app.api.deps import SessionDep
from app.api.main import create_app
from app.db.models import ApiKey, Job, Recommendation
from app.db.session import session_scope
from app.services import queue
from app.services.problems import ProblemError
from app.services.serving import DEFAULT_METHOD
from app.settings import Settings
from app.zoo import recommenders
from tests.helpers import npz_upload, run_job


def _assert_a_readable_answer(body: dict[str, object]) -> None:
    """Every item predicts its error with an 80% interval; the answer says whether the task
    is out of the zoo's distribution (a zoo task's own images are not)."""
    novelty = body["novelty"]
    assert isinstance(novelty, dict)
    assert novelty["out_of_distribution"] is False
    assert novelty["nearest_distance"] <= novelty["threshold"]
    items = body["ranking"]
    assert isinstance(items, list)
    for item in items:
        evidence = item["evidence"]
        low, high = evidence["error_interval"]
        assert 0 <= low <= evidence["predicted_error"] <= high <= 1
        assert evidence["interval_level"] == 0.8
        nearest = evidence["nearest_tasks"]
        assert len(nearest) == 3
        assert [n["distance"] for n in nearest] == sorted(n["distance"] for n in nearest)
        assert all(0 <= n["error"] <= 1 for n in nearest)
        assert evidence["architecture"]


def test_upload_embed_neighbours_and_recommendations(
    client: TestClient, settings: Settings, sent: list[str]
) -> None:
    upload = npz_upload()
    response = client.post("/v1/tasks", files={"file": ("shoes.npz", upload)})
    assert response.status_code == 202
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['job_id']}"
    assert sent == [body["job_id"]]

    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "queued"
    not_ready = client.get(f"/v1/tasks/{body['task_id']}/recommendations")
    assert not_ready.status_code == 409
    assert not_ready.headers["content-type"] == "application/problem+json"

    run_job(settings, body["job_id"])
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "succeeded", job
    assert job["progress"]["fraction"] == 1.0
    assert {"features", "fisher"} <= set(job["timings"])

    task = client.get(f"/v1/tasks/{body['task_id']}").json()
    assert task["dataset"]["num_images"] == 120
    assert task["embedding"]["dim"] > 0
    assert task["probe"] == "efficientnet_lite0"

    near = client.get(f"/v1/tasks/{body['task_id']}/neighbors", params={"k": 3}).json()
    assert len(near["neighbors"]) == 3
    # The upload is a zoo task's own images: its nearest zoo task is itself.
    assert near["neighbors"][0]["distance"] == pytest.approx(0.0, abs=1e-9)

    for method in ("learned", "task2vec-knn", "task2vec-asym", "global-best"):
        ranked = client.get(
            f"/v1/tasks/{body['task_id']}/recommendations", params={"method": method, "k": 2}
        )
        assert ranked.status_code == 200, ranked.text
        assert ranked.json()["method"] == method
        assert 1 <= len(ranked.json()["ranking"]) <= 2
        assert ranked.json()["cached"] is False
        _assert_a_readable_answer(ranked.json())
    # Read again: the ranking this process computed for the zoo version, and no new row.
    learned = {"method": "learned", "k": 3}
    first = client.get(f"/v1/tasks/{body['task_id']}/recommendations", params=learned).json()
    again = client.get(f"/v1/tasks/{body['task_id']}/recommendations", params=learned).json()
    assert first["cached"]
    assert again["cached"]
    assert again["ranking"] == first["ranking"]

    queued = client.get(f"/v1/tasks/{body['task_id']}/recommendations", params={"method": "logme"})
    assert queued.status_code == 202
    run_job(settings, sent[-1])
    result = client.get(queued.headers["location"]).json()
    assert result["status"] == "succeeded"
    assert len(result["result"]["ranking"]) == 3
    _assert_a_readable_answer(result["result"])
    assert result["links"]["task"] == f"/v1/tasks/{body['task_id']}"
    by_logme = {r["expert"]: r["evidence"]["logme"] for r in result["result"]["ranking"]}
    # Asked again, LogME's ranking is the one its job stored: no second job.
    stored = client.get(f"/v1/tasks/{body['task_id']}/recommendations", params={"method": "logme"})
    assert stored.status_code == 200
    assert stored.json()["ranking"] == result["result"]["ranking"][:5]

    # The default, the hybrid, was ranked by the embedding job while it had the images: the
    # answer is there with no job of its own. The served tiny zoo has no LogME matrix, so the
    # default rule's shortlist (9) holds all 3 experts, ordered by LogME alone: the same
    # values and order as the logme ranking's.
    default = client.get(f"/v1/tasks/{body['task_id']}/recommendations")
    assert default.status_code == 200, default.text
    answer = default.json()
    assert answer["method"] == DEFAULT_METHOD == "hybrid"
    _assert_a_readable_answer(answer)
    items = answer["ranking"]
    assert [i["evidence"]["logme_rank"] for i in items] == [1, 2, 3]
    assert {i["expert"]: i["evidence"]["logme"] for i in items} == pytest.approx(by_logme)
    assert [i["expert"] for i in items] == sorted(by_logme, key=lambda e: -by_logme[e])
    with session_scope(settings.resolved_database_url()) as session:
        rows = session.query(Recommendation).order_by(Recommendation.id).all()
        methods = [r.method for r in rows]
        in_process = rows[1].ranking
    # One row per ranking computed (method and zoo version), whatever k asked; the whole order.
    assert methods == [
        "hybrid", "learned", "task2vec-knn", "task2vec-asym", "global-best", "logme"
    ]  # fmt: skip
    assert [r["expert"] for r in in_process] == [r["expert"] for r in first["ranking"]]

    # The same bytes again: the same task, the same job, nothing new to compute.
    again = client.post("/v1/tasks", files={"file": ("other-name.npz", upload)}).json()
    assert (again["task_id"], again["job_id"]) == (body["task_id"], body["job_id"])
    assert len(sent) == 2  # the embedding job and logme's


def test_one_call_recommendation_waits_for_the_job(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[str] = []

    def dispatch(job_id: str, kind: str, broker: str) -> None:
        kinds.append(kind)
        run_job(settings, job_id)

    monkeypatch.setattr(queue, "dispatch", dispatch)
    response = client.post(
        "/v1/recommendations",
        params={"wait": 60, "k": 3},
        files={"file": ("digits.npz", npz_upload(5))},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "hybrid"
    assert len(body["ranking"]) == 3
    _assert_a_readable_answer(body)
    assert {"upload_s", "queue_wait_s", "job_s", "job_stages", "total_s"} <= set(body["timings"])
    # The embedding job ranked with the hybrid while it had the images: one job, no other.
    assert kinds == ["embed"]
    assert "ranking (hybrid)" in body["timings"]["job_stages"]

    # Asked for the fast method, the embedding job ranks with nothing: the answer waits for
    # the embedding alone.
    fast = client.post(
        "/v1/recommendations",
        params={"wait": 60, "method": "learned"},
        files={"file": ("shoes.npz", npz_upload(2))},
    ).json()
    assert fast["method"] == "learned"
    assert kinds == ["embed", "embed"]
    assert not any(stage.startswith("ranking") for stage in fast["timings"]["job_stages"])
    with session_scope(settings.resolved_database_url()) as session:
        methods = session.scalars(
            select(Recommendation.method).where(Recommendation.task_id == fast["task_id"])
        ).all()
    assert methods == ["learned"]


def test_errors_are_problem_details(client: TestClient, sent: list[str]) -> None:
    bad = client.post("/v1/tasks", files={"file": ("broken.zip", b"not an archive")})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert "broken.zip" in bad.json()["detail"]
    assert sent == []  # nothing queued, nothing stored
    missing = client.post("/v1/tasks")
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["location"][-1] == "file"
    assert client.get("/v1/jobs/nope").status_code == 404
    unknown = client.get("/v1/tasks/nope/recommendations", params={"method": "magic"})
    assert unknown.status_code == 422
    assert "magic" in unknown.json()["detail"]


def test_the_methods_served_are_the_registrys(client: TestClient) -> None:
    """``/v1/methods`` and the OpenAPI enum of ``method`` both read the registry; an
    evaluation-only baseline (it needs a label a user does not have) is refused by name."""
    listed = client.get("/v1/methods").json()
    assert [m["name"] for m in listed] == list(recommenders.served())
    assert [m["name"] for m in listed if m["default"]] == [DEFAULT_METHOD]
    assert {m["runs"] for m in listed} == {"api", "worker"}
    operation = client.get("/openapi.json").json()["paths"]["/v1/recommendations"]["post"]
    (method,) = [p for p in operation["parameters"] if p["name"] == "method"]
    assert method["schema"]["enum"] == list(recommenders.served())
    refused = client.get("/v1/tasks/nope/recommendations", params={"method": "domain-best"})
    assert refused.status_code == 422
    assert "learned" in refused.json()["detail"]


def test_catalogue_and_health(client: TestClient) -> None:
    experts = client.get("/v1/experts").json()
    assert experts["total"] == 3
    name = experts["items"][0]["id"]
    assert client.get(f"/v1/experts/{name}").json()["id"] == name
    assert client.get("/v1/experts/none").status_code == 404
    zoo = client.get("/v1/zoo/tasks", params={"limit": 2, "offset": 1}).json()
    assert zoo["total"] == 8
    assert len(zoo["items"]) == 2
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_a_dead_broker_fails_the_job_and_answers_503(settings: Settings) -> None:
    dead = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead)) as client:
        response = client.post("/v1/tasks", files={"file": ("x.npz", npz_upload())})
        assert response.status_code == 503
        assert response.json()["type"].endswith("/broker-unavailable")
        # Where the queue lives is the operator's to know: the log has it, the answer not.
        assert response.json()["detail"] == "the job queue is unavailable; try again later"
        assert "127.0.0.1" not in response.text
        with session_scope(dead.resolved_database_url()) as session:
            (job,) = session.query(Job).all()
            assert job.status == "failed"
            assert job.error is not None
            assert "127.0.0.1" not in str(job.error)
        assert client.get("/readyz").status_code == 503


def test_a_request_is_one_unit_of_work(settings: Settings) -> None:
    """The request's session commits before the answer leaves and rolls back when the route
    raises: a client never sees a success that was not stored, nor half of a failure."""
    app = FastAPI()
    app.state.settings = settings
    problems.install(app)
    seen_at_answer: list[bool] = []

    def stored(key_id: str) -> bool:
        with session_scope(settings.resolved_database_url()) as other:
            return other.get(ApiKey, key_id) is not None

    @app.post("/keys/{key_id}")
    def add(key_id: str, session: SessionDep, fail: bool = False) -> dict[str, str]:
        session.add(ApiKey(id=key_id, secret_sha256="0" * 64, tenant="t", scopes=["tasks:read"]))
        session.flush()
        if fail:
            raise ProblemError(409, "conflict", "Conflict", "refused after the write")
        return {"id": key_id}

    @app.middleware("http")
    async def check_before_answer(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        seen_at_answer.append(stored(request.path_params.get("key_id", "kept")))
        return response

    with TestClient(app) as client:
        assert client.post("/keys/kept").status_code == 200
        assert client.post("/keys/dropped", params={"fail": True}).status_code == 409
    assert stored("kept")
    assert not stored("dropped")
    assert seen_at_answer[0] is True  # committed before the answer went out
