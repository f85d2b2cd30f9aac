"""A worker process's execution plan: read from the data directory's cache when this CPU
model has one, measured otherwise, and the default one when it cannot be measured."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.settings import Settings
from app.task2vec import EmbedConfig
from app.task2vec.calibration import Calibration, PlanCache, plan_key
from app.task2vec.errors import DatasetError
from app.task2vec.plans import DEFAULT, ExecutionPlan
from workers import execution

CONFIG = EmbedConfig(probe="resnet18", probe_weights="random:0", image_size=32, device="cpu")
STATE: Any = SimpleNamespace(
    zoo=SimpleNamespace(tasks=["first"], protocol=SimpleNamespace(split=None), embeddings=[])
)


def measuring(data_dir: Path) -> Settings:
    """Settings of a worker that measures its plan."""
    return Settings(data_dir=data_dir, execution_plan="measured")


@pytest.fixture(autouse=True)
def default_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execution, "_PLAN", [DEFAULT])


def test_a_cached_plan_is_used_without_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, execution_plan="measured")
    one_lane = ExecutionPlan(1, False)
    cache = PlanCache(tmp_path / execution.PLAN_CACHE)
    cache.put(plan_key(CONFIG.probe, CONFIG.image_size), Calibration(one_lane, {}))

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached plan is not measured again")

    monkeypatch.setattr(execution, "materialize", measured)
    monkeypatch.setattr(execution, "measured_plan", measured)
    assert execution.measure(settings, STATE, CONFIG, probe=None) == one_lane  # type: ignore[arg-type]
    assert execution.plan() == one_lane


def test_a_plan_is_measured_on_the_zoos_first_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    def materialize(task: object, **kwargs: object) -> str:
        seen.append(task)
        return "data"

    monkeypatch.setattr(execution, "materialize", materialize)
    monkeypatch.setattr(execution, "measured_plan", lambda *a, **kw: ExecutionPlan(1, True))
    plan = execution.measure(measuring(tmp_path), STATE, CONFIG, probe=None)  # type: ignore[arg-type]
    assert plan == ExecutionPlan(1, True) == execution.plan()
    assert seen == ["first"]


@pytest.mark.parametrize(
    "error",
    [DatasetError("the task's images are gone", "bad-layout"), RuntimeError("oneDNN refused")],
)
def test_a_plan_that_cannot_be_measured_leaves_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(execution, "materialize", missing)
    assert execution.measure(measuring(tmp_path), STATE, CONFIG, probe=None) == DEFAULT  # type: ignore[arg-type]


def test_a_worker_left_at_the_default_plan_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``T2V_EXECUTION_PLAN=default`` (``task2vec run``'s): no trial embeddings beside the
    first jobs, not even a cached plan read."""

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker at the default plan measures nothing")

    cache = PlanCache(tmp_path / execution.PLAN_CACHE)
    cache.put(plan_key(CONFIG.probe, CONFIG.image_size), Calibration(ExecutionPlan(1, True), {}))
    monkeypatch.setattr(execution, "materialize", measured)
    monkeypatch.setattr(execution, "measured_plan", measured)
    assert execution.measure(Settings(data_dir=tmp_path), STATE, CONFIG, probe=None) == DEFAULT  # type: ignore[arg-type]


def test_an_embedding_runs_on_the_process_threads_whatever_faiss_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FAISS's omp_set_num_threads is torch's (one OpenMP runtime): a search that leaves the
    calling thread at one thread must not turn the Fisher's two lanes into one."""
    import faiss
    import torch

    from app.task2vec.lanes import cpu_lanes

    before = torch.get_num_threads()
    seen: list[int] = []

    def fake_embed(*args: object, **kwargs: object) -> None:
        with cpu_lanes(torch.device("cpu")) as lanes:
            seen.append(lanes.count)

    monkeypatch.setattr(execution, "embed", fake_embed)
    monkeypatch.setattr(execution, "_THREADS", [0])
    try:
        execution.set_threads(2)
        faiss.omp_set_num_threads(1)
        assert torch.get_num_threads() == 1  # the shared runtime: what the workers met
        execution.embed_here(None, CONFIG, None)  # type: ignore[arg-type]
        assert seen == [2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
