"""The ranking read's hot path: bounded caches, one recorded row per ranking computed, and
the numeric libraries of a serving process held to one thread."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import Recommendation
from app.db.session import session_scope
from app.services.layout import DataLayout
from app.services.publishing import ensure_published
from app.services.serving import FAST_METHODS, WORKER_METHODS, ZooState, ZooStates
from app.settings import Settings
from tests.helpers import npz_upload, run_job


def test_without_a_ranking_cache_every_read_computes_and_one_row_is_kept(
    settings: Settings, sent: list[str]
) -> None:
    uncached = settings.model_copy(update={"ranking_cache_size": 0})
    with TestClient(create_app(uncached)) as client:
        body = client.post("/v1/tasks", files={"file": ("a.npz", npz_upload(3))}).json()
        run_job(uncached, body["job_id"])
        url = f"/v1/tasks/{body['task_id']}/recommendations"
        learned = {"k": 2, "method": "learned"}
        answers = [client.get(url, params=learned).json() for _ in range(3)]
    assert [a["cached"] for a in answers] == [False, False, False]
    assert answers[0]["ranking"] == answers[1]["ranking"] == answers[2]["ranking"]
    with session_scope(uncached.resolved_database_url()) as session:
        rows = session.scalar(
            select(func.count())
            .select_from(Recommendation)
            .where(Recommendation.method == "learned")
        )
    assert rows == 1


@pytest.mark.slow
def test_a_serving_process_runs_its_numeric_libraries_on_one_thread() -> None:
    """``app.api.main:app`` (what uvicorn imports) caps BLAS, OpenMP and torch threads."""
    code = (
        "import app.api.main as m, torch, faiss\n"
        "from threadpoolctl import threadpool_info\n"
        "m.app\n"
        "print(sorted({i['num_threads'] for i in threadpool_info()}),"
        " torch.get_num_threads(), faiss.omp_get_max_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"T2V_API_KEYS": "off", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1]", "1", "1"]


def test_a_late_load_of_an_older_version_is_never_installed() -> None:
    """Background loads may finish out of order: only the version last asked for goes in."""
    states = ZooStates()
    old, older, newest = (SimpleNamespace(version=v) for v in ("v1", "v2", "v3"))
    states._state, states._wanted = old, "v3"  # type: ignore[assignment]
    assert states._install(older) is old  # type: ignore[arg-type]
    assert states._install(newest) is newest  # type: ignore[arg-type]
    assert states._install(older) is newest  # type: ignore[arg-type]


def test_a_process_fits_the_methods_it_runs_and_the_others_on_first_use(
    settings: Settings,
) -> None:
    """The API fits what it answers in-process, a worker what needs the images: neither pays
    for the other's (the hybrid's rule and scorer, in an API process)."""
    version = ensure_published(settings, DataLayout.of(settings).zoo(settings.zoo))
    state = ZooState.load(version, fitted=FAST_METHODS)
    assert set(state.methods) == set(FAST_METHODS)
    assert not set(state.methods) & set(WORKER_METHODS)
    embedding = state.zoo.embeddings[0]
    assert state.rank("learned", embedding)[0].evidence["predicted_error"] >= 0
    fitted = state.recommender("brute-force")  # fitted now, once
    assert state.recommender("brute-force") is fitted
    assert set(state.methods) == {*FAST_METHODS, "brute-force"}
