"""Shared fixtures: small synthetic labelled image tasks, the tiny zoo, a fresh database per
backend (SQLite and the machine's real PostgreSQL), settings pointing at them, the API, and a
real S3-compatible object store (helpers: ``tests.helpers``, ``tests.seaweedfs``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.services import queue
from app.services.jobs import JobKind
from app.settings import Settings
from app.task2vec.datasets import LabelledImages, from_arrays
from app.zoo.build import ZooBuilder
from app.zoo.presets import recipe
from app.zoo.zoo import Zoo
from tests.bundles import export_tiny
from tests.helpers import fresh_database, random_images, service_settings
from tests.seaweedfs import S3, seaweedfs
from workers import tasks

# anyio imports its file module on first use, which is the first file an API in a test serves
# (the console, the docs' assets): in a thread, while pytest, which rewrites anyio's modules
# as a plugin's, may be parsing another module in the main one. Python 3.11's ast.parse is
# not safe to run in two threads at once (cpython gh-106905: "AST constructor recursion depth
# mismatch"), so the module is imported here, once, before any test runs.
anyio.open_file  # noqa: B018


@pytest.fixture
def tiny_task() -> LabelledImages:
    """48 random 12-px grey images in 3 classes: enough to exercise every code path fast."""
    labels = np.repeat(np.arange(3), 16)
    return from_arrays(random_images(48), labels)


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The tiny zoo, built once for the session: read it, never change it (a test that
    rebuilds or edits a zoo builds its own)."""
    return ZooBuilder(recipe("tiny"), tmp_path_factory.mktemp("zoo-data")).build()


@pytest.fixture(scope="session")
def tiny_zoo(tiny_built: Zoo) -> Path:
    """The tiny zoo's folder (``<data>/zoos/tiny``), which service tests copy."""
    assert tiny_built.folder is not None
    return tiny_built.folder


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


@pytest.fixture(scope="session")
def exported(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Zoo]:
    """The tiny zoo plus an uploaded task, published by a service and exported as a bundle."""
    return export_tiny(tiny_zoo, tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A SeaweedFS server with a bucket, for the session: take a prefix of your own
    (``S3.url``). Its tests start a process: mark them slow."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
