"""The service's real processes for a benchmark: ``task2vec serve`` and ``task2vec worker`` on
the embedded default (SQLite, the SQLite-backed Celery broker), on a fresh data directory that
uses a zoo built under ``./data/zoos`` (or, for the starter zoo when none is built there, the
shipped bundle, imported as on a first start), and a fixed Fashion-MNIST upload that is no zoo
task."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from app.data.offline import fashion_mnist
from app.services.bundles import STARTER_BUNDLE
from app.services.queue import WARMED_UP
from app.task2vec.sampling import stratified_subset
from app.zoo.build import zoo_folder as preset_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fashion_upload(images: int, seed: int = 7) -> bytes:
    """An .npz of ``images`` 28x28 test-set images (a seeded stratified subset, 10 classes)."""
    x, y, names = fashion_mnist("test")
    keep = stratified_subset(y, images, torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    np.savez(buffer, x=x[keep], y=np.array(names)[y[keep]])
    return buffer.getvalue()


@dataclass
class Service:
    base: str
    data_dir: Path
    worker: subprocess.Popen[bytes]
    api: subprocess.Popen[bytes]

    def log_tail(self, chars: int = 3000) -> str:
        return (self.data_dir / "processes.log").read_text()[-chars:]

    def stop_worker(self) -> None:
        """Stop the worker (its work done), so it takes no CPU from what is measured next."""
        self.worker.terminate()
        self.worker.wait(timeout=60)


@contextmanager
def running(zoo: str, api_workers: int = 1, env: dict[str, str] | None = None) -> Iterator[Service]:
    """The API (``api_workers`` processes) and one worker, ready: database, broker and the
    zoo's index loaded. Both are stopped on exit."""
    zoo_folder = preset_folder(Path("data"), zoo).resolve()
    built = (zoo_folder / "zoo.json").is_file()
    if not built and not (zoo == "starter" and STARTER_BUNDLE.is_file()):
        raise SystemExit(f"no zoo at {zoo_folder}: run `task2vec zoo build --preset {zoo}` first")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        environ = {
            **os.environ,
            "T2V_DATA_DIR": str(data_dir),
            # Without a built folder the API imports the shipped starter bundle on start.
            "T2V_ZOO": str(zoo_folder) if built else zoo,
            **(env or {}),
        }
        subprocess.run(
            [sys.executable, "-m", "app.cli", "db", "upgrade"],
            env=environ,
            check=True,
            capture_output=True,
        )
        port = free_port()
        logs = (data_dir / "processes.log").open("w")
        command = [sys.executable, "-m", "app.cli"]
        worker = subprocess.Popen(
            [*command, "worker"], env=environ, stdout=logs, stderr=subprocess.STDOUT
        )
        api = subprocess.Popen(
            [*command, "serve", "--port", str(port), "--workers", str(api_workers)],
            env=environ,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        service = Service(f"http://127.0.0.1:{port}", data_dir, worker, api)
        try:
            _until_ready(service, api_workers)
            _until_warm(service)
            yield service
        finally:
            for proc in (api, worker):
                if proc.poll() is None:
                    proc.terminate()
            for proc in (api, worker):
                proc.wait(timeout=60)
            logs.close()


def _until_warm(service: Service, timeout: float = 120) -> None:
    """Until the worker has loaded the zoo and the probe (its log says so): what is measured
    is the service's steady state, not its start."""
    deadline = time.monotonic() + timeout
    while f'"{WARMED_UP}' not in service.log_tail(10**7):
        if time.monotonic() > deadline or service.worker.poll() is not None:
            raise SystemExit(service.log_tail())
        time.sleep(0.2)


def _until_ready(service: Service, api_workers: int) -> None:
    """Until /readyz answers 200 as often in a row as there are API processes (each loads
    the zoo on its own; the kernel spreads new connections over them)."""
    deadline = time.monotonic() + 180
    ready = 0
    while ready < 4 * api_workers:
        try:
            with httpx.Client(base_url=service.base, timeout=30) as client:
                ok = client.get("/readyz").status_code == 200
            ready = ready + 1 if ok else 0
        except httpx.TransportError:
            ready = 0
        if time.monotonic() > deadline:
            raise SystemExit(service.log_tail())
        if not ready:
            time.sleep(0.5)
