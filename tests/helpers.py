"""Helpers the tests share: archive writers, random images, throwaway databases, service
settings on the tiny zoo, uploads, expert weights, and running a job as a worker would."""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import torch
from PIL import Image
from sqlalchemy import Connection, create_engine, text

from app.db.migrate import upgrade
from app.db.models import Job, utcnow
from app.db.session import engine_for, session_scope
from app.services import api_keys
from app.services.jobs import JobKind
from app.settings import Settings
from app.zoo.experts import SmallCNN
from app.zoo.presets import recipe, tiny
from app.zoo.tasks import materialize
from workers import tasks

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: How long a test waits for another process or thread before it calls it stuck, in seconds:
#: a guard against hanging, never a claim about speed (no test asserts how long anything
#: took). A machine slower than any seen yet can raise it with T2V_TEST_PATIENCE.
PATIENCE = float(os.environ.get("T2V_TEST_PATIENCE", "300"))

T = TypeVar("T")

#: Leases short enough for a fault drill to see one expire and a sweep re-send its job.
FAST_LEASES = {"job_lease_seconds": 4.0, "sweep_seconds": 1.0, "job_resend_seconds": 3.0}


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


@functools.cache
def _sqlite_template() -> Path:
    """A SQLite database migrated to head, once per test session, to copy."""
    folder = Path(tempfile.mkdtemp(prefix="t2v-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    upgrade(f"sqlite:///{folder / 'state.db'}")
    engine_for.cache_clear()
    return folder / "state.db"


@functools.cache
def _postgres_template() -> str:
    """A PostgreSQL database migrated to head, once per test session, that new databases are
    created from (``CREATE DATABASE ... TEMPLATE``: a file copy on the server)."""
    name = f"t2v_template_{uuid.uuid4().hex[:12]}"
    url = _admin_url(name)
    with _admin() as admin:
        admin.execute(text(f'CREATE DATABASE "{name}"'))
    atexit.register(_drop, name)
    upgrade(url)
    engine_for(url).dispose()  # a template takes no connections while it is copied
    engine_for.cache_clear()
    return name


def _admin_url(name: str) -> str:
    return POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def _admin() -> Iterator[Connection]:
    engine = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _drop(name: str) -> None:
    with _admin() as admin:
        admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def fresh_database(kind: str, tmp_path: Path, *, migrated: bool = True) -> Iterator[str]:
    """The URL of a database of its own: a SQLite file, or a new PostgreSQL database dropped
    after. Migrated to head, it is a copy of a database the migrations built once for the
    session (the same schema for a fraction of the time; tests/db/test_migrations.py runs
    the migrations themselves on empty ones)."""
    if kind == "sqlite":
        path = tmp_path / "state.db"
        if migrated:
            shutil.copyfile(_sqlite_template(), path)
        yield f"sqlite:///{path}"
        return
    name = f"t2v_{uuid.uuid4().hex[:12]}"
    template = f' TEMPLATE "{_postgres_template()}"' if migrated else ""
    with _admin() as admin:
        admin.execute(text(f'CREATE DATABASE "{name}"{template}'))
    try:
        yield _admin_url(name)
    finally:
        engine_for.cache_clear()
        _drop(name)


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
        api_keys="off",  # as on loopback; tests/api/test_access.py turns keys on
    )


def npz_upload(task_index: int = 1) -> bytes:
    """A tiny-zoo task's images (those its zoo entry was made of) as an .npz upload
    (x: images, y: class names)."""
    data = materialize(tiny()[task_index], split=recipe("tiny").protocol.split)
    buffer = io.BytesIO()
    np.savez(buffer, x=data.images, y=np.array(data.classes)[data.labels])
    return buffer.getvalue()


def later(seconds: float) -> datetime:
    """A moment ``seconds`` from now: a sweep or a try as of then sees what waiting would,
    without the wait."""
    return utcnow() + timedelta(seconds=seconds)


def job_row(settings: Settings, job_id: str) -> Job:
    """The job's row as it is now (read in a transaction of its own)."""
    with session_scope(settings.resolved_database_url()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def job_reaching(
    settings: Settings,
    job_id: str,
    statuses: set[str],
    worker: subprocess.Popen[bytes],
    log: Path,
) -> Job:
    """The job's row once its status is one of ``statuses``; fails at once if ``worker``
    exits (with the end of its ``log``)."""

    def reached() -> Job | None:
        job = job_row(settings, job_id)
        return job if job.status in statuses else None

    what = f"job {job_id} to be {'/'.join(sorted(statuses))}"
    return eventually(reached, what, processes=[worker], log=log)


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


def eventually(
    check: Callable[[], T],
    what: str,
    *,
    processes: Iterable[subprocess.Popen[bytes]] = (),
    log: Path | None = None,
    patience: float = PATIENCE,
    pause: float | None = None,
) -> T:
    """``check()``'s first true answer, asked again and again: every ``pause`` seconds, or
    from every 20 ms growing to every half second when none is given. It fails as soon as
    one of ``processes`` has exited (what it was waiting for will never come), and after
    ``patience`` seconds: a guard against a hang, not a bound on speed. The failure says
    ``what`` was awaited, with the end of ``log``."""
    started, wait = time.monotonic(), pause or 0.02
    watched = list(processes)
    while True:
        found = check()
        if found:
            return found
        dead = [p.args for p in watched if p.poll() is not None]
        waited = time.monotonic() - started
        if dead or waited > patience:
            why = f"exited: {dead}" if dead else f"still not so after {waited:.0f} s"
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"waiting for {what}: {why}\n{tail}")
        time.sleep(wait)
        wait = wait if pause else min(wait * 1.5, 0.5)


@contextmanager
def in_background(call: Callable[[], T], *release: threading.Event) -> Iterator[Callable[[], T]]:
    """``call`` on a thread of its own for the block, which gets a function that waits for
    its answer (or raises what it raised). However the block ends, every event in
    ``release`` is set, so that nothing the call waits on can hold it, and the thread is
    joined: a test that fails while one of its requests is in flight fails there and then,
    instead of leaving ``TestClient`` waiting on a request that never ends."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def answer() -> T:
        thread.join(PATIENCE)
        assert outcome, f"{call!r} is stuck"
        ok, value = outcome[0]
        if not ok:
            raise value
        result: T = value
        return result

    try:
        yield answer
    finally:
        for event in release:
            event.set()
        thread.join(PATIENCE)


def api_ready(port: int) -> bool:
    """Whether an API on ``port`` answers ``/readyz`` with 200."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def start_api(settings: Settings, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``task2vec serve`` on ``port`` (loopback; keys off unless ``env`` sets
    ``T2V_API_KEYS``), in its own process group; ready once ``/readyz`` answers 200."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=worker_env(settings, **{"T2V_API_KEYS": "off", **env}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: api_ready(port), "the API to be ready", processes=[process], log=log)
    except BaseException:
        stop(process)
        raise
    return process
