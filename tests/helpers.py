"""Helpers the tests share: archive writers, random images, throwaway databases, service
settings on the tiny zoo, uploads, expert weights, and running a job as a worker would."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from app.db.migrate import upgrade
from app.db.models import Job
from app.db.session import engine_for, session_scope
from app.services import api_keys
from app.services.jobs import JobKind
from app.settings import Settings
from app.zoo.experts import SmallCNN
from app.zoo.presets import recipe, tiny
from app.zoo.tasks import materialize
from workers import tasks

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def random_images(n: int, size: int = 12, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


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


def npz_upload(task_index: int = 1) -> bytes:
    """A tiny-zoo task's images (those its zoo entry was made of) as an .npz upload
    (x: images, y: class names)."""
    data = materialize(tiny()[task_index], split=recipe("tiny").protocol.split)
    buffer = io.BytesIO()
    np.savez(buffer, x=data.images, y=np.array(data.classes)[data.labels])
    return buffer.getvalue()


def run_job(settings: Settings, job_id: str) -> None:
    """Run a job with the worker's own code, as the broker would deliver it."""
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        kind = job.kind
    tasks.RUNNERS[JobKind(kind)](job_id, settings)


def cnn_weights(width: int = 4, seed: int = 0) -> bytes:
    """A cnn-<width>x1 expert's state_dict (seeded random weights), as a client uploads it."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(SmallCNN(width, 1).state_dict(), buffer)
    return buffer.getvalue()


def small_extractor(seed: int = 0) -> torch.nn.Module:
    """A small convolutional feature extractor (8 features), seeded, in eval mode."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


class NanFeatures(torch.nn.Module):
    """An expert that gives NaN features (refused by its admission forward pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) * float("nan")


class ScalarOutput(torch.nn.Module):
    """An expert that gives one number for a whole batch (refused: not a row per image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()


def onnx_model(module: torch.nn.Module | None = None, size: int = 28) -> bytes:
    """``module`` (by default ``small_extractor()``) exported to ONNX, any batch size."""
    buffer = io.BytesIO()
    torch.onnx.export(
        module or small_extractor(),
        (torch.rand(1, 3, size, size),),
        buffer,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
        dynamo=False,
    )
    return buffer.getvalue()


def torchvision_weights(builder: str) -> bytes:
    """A torchvision classifier's full state dict (random weights) as safetensors."""
    from safetensors.torch import save
    from torchvision import models

    torch.manual_seed(0)
    return save(models.get_model(builder, weights=None).state_dict())


def create_key(settings: Settings, tenant: str, scopes: list[str]) -> tuple[str, str]:
    """A new API key for ``tenant``: its id and its token."""
    with session_scope(settings.resolved_database_url()) as session:
        row, token = api_keys.create(session, tenant=tenant, scopes=scopes)
        return row.id, token


def revoke_key(settings: Settings, key_id: str) -> bool:
    with session_scope(settings.resolved_database_url()) as session:
        return api_keys.revoke(session, key_id=key_id)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker process needs to serve ``settings``."""
    return {
        **os.environ,
        "T2V_DATA_DIR": str(settings.data_dir),
        "T2V_DATABASE_URL": settings.resolved_database_url(),
        "T2V_BROKER_URL": settings.resolved_broker_url(),
        "T2V_ZOO": settings.zoo,
        "T2V_JOB_LEASE_SECONDS": str(settings.job_lease_seconds),
        "T2V_JOB_RESEND_SECONDS": str(settings.job_resend_seconds),
        "T2V_SWEEP_SECONDS": str(settings.sweep_seconds),
        "T2V_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        **extra,
    }


def start_worker(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real Celery worker process (``task2vec worker``) in its own process group."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=worker_env(settings, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process group started with ``start_new_session`` (SIGKILL after 30 s)."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextmanager
def worker(settings: Settings, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    process = start_worker(settings, log, **env)
    try:
        yield process
    finally:
        stop(process)


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(settings: Settings, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``task2vec serve`` on ``port`` (keys off, loopback), in its own process group; ready
    once ``/readyz`` answers 200."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=worker_env(settings, T2V_API_KEYS="off", **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
