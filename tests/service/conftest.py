"""Service fixtures: the tiny zoo, a fresh database per backend (SQLite and the machine's real
PostgreSQL), settings pointing at them, and the API (helpers: ``tests.helpers``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import queue
from app.services.jobs import JobKind
from app.settings import Settings
from app.zoo.build import ZooBuilder
from app.zoo.presets import recipe
from tests.helpers import fresh_database, service_settings
from workers import tasks


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("zoo-data")
    ZooBuilder(recipe("tiny"), data_dir).build()
    return data_dir / "zoos" / "tiny"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def settings(tiny_zoo: Path, database_url: str, tmp_path: Path) -> Settings:
    return service_settings(tiny_zoo, database_url, tmp_path)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids the API sends to the broker, in order (nothing is sent)."""
    ids: list[str] = []

    def record(job_id: str, kind: JobKind, broker: str) -> None:
        ids.append(job_id)

    monkeypatch.setattr(queue, "dispatch", record)
    return ids


@pytest.fixture
def client(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API on ``settings``; the workers' code (run by ``run_job``) sees the same."""
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    with TestClient(create_app(settings)) as c:
        yield c
