"""Service fixtures: the tiny zoo, a fresh database per backend (SQLite and the machine's real
PostgreSQL), settings pointing at them, and an upload."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app import jobs
from app.api.main import create_app
from app.db.migrate import upgrade
from app.db.models import Job
from app.db.session import engine_for, session_scope
from app.settings import Settings
from app.zoo.build import ZooBuilder
from app.zoo.experts import SmallCNN
from app.zoo.presets import recipe, tiny
from app.zoo.tasks import materialize
from workers import tasks

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("zoo-data")
    ZooBuilder(recipe("tiny"), data_dir).build()
    return data_dir / "zoos" / "tiny"


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file, or a new PostgreSQL database dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    name = f"t2v_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        engine_for.cache_clear()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def service_settings(tiny_zoo: Path, database_url: str, tmp_path: Path) -> Settings:
    """Settings on a migrated database and a data directory holding the tiny zoo."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_zoo.parent, data_dir / "zoos")
    upgrade(database_url)
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        zoo="tiny",
        zoo_poll_seconds=0,
        api_keys="off",  # as on loopback; tests/service/test_access.py turns keys on
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def settings(tiny_zoo: Path, database_url: str, tmp_path: Path) -> Settings:
    return service_settings(tiny_zoo, database_url, tmp_path)


def npz_upload(task_index: int = 1) -> bytes:
    """A tiny-zoo task's images (those its zoo entry was made of) as an .npz upload
    (x: images, y: class names)."""
    data = materialize(tiny()[task_index], split=recipe("tiny").protocol.split)
    buffer = io.BytesIO()
    np.savez(buffer, x=data.images, y=np.array(data.classes)[data.labels])
    return buffer.getvalue()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids the API sends to the broker, in order (nothing is sent)."""
    ids: list[str] = []
    monkeypatch.setattr(jobs, "dispatch", lambda job, broker: ids.append(job.id))
    return ids


@pytest.fixture
def client(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API on ``settings``; the workers' code (run by ``run_job``) sees the same."""
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    with TestClient(create_app(settings)) as c:
        yield c


def run_job(settings: Settings, job_id: str) -> None:
    """Run a job with the worker's own code, as the broker would deliver it."""
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        kind = job.kind
    runners = {
        "embed": tasks.run_embed,
        "rank": tasks.run_rank,
        "expert": tasks.run_expert,
        "zoo-task": tasks.run_zoo_task,
    }
    runners[kind](job_id, settings)


def cnn_weights(width: int = 4, seed: int = 0) -> bytes:
    """A cnn-<width>x1 expert's state_dict (seeded random weights), as a client uploads it."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(SmallCNN(width, 1).state_dict(), buffer)
    return buffer.getvalue()
