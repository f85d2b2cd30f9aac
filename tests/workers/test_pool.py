"""A worker pool process's share of the cores for torch."""

from __future__ import annotations

import os

import pytest

from app.settings import Settings
from workers.tasks import worker_torch_threads


def test_pool_processes_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    shared = Settings(worker_torch_threads=0)
    assert worker_torch_threads(shared, None) == 8  # one process: every core
    assert worker_torch_threads(shared, 3) == 2
    assert worker_torch_threads(shared, 16) == 1  # never none
    assert worker_torch_threads(Settings(worker_torch_threads=3), 4) == 3  # as configured
