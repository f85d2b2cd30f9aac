"""prometheus_client's multiprocess mode for a worker or an API of several processes: a
private directory that every process writes its values to, chosen before prometheus_client
is first imported (the mode is fixed at import, and forked processes inherit it), and a
collector that merges them (the worker's main process serves it on an HTTP endpoint of its
own; the API's ``/metrics`` answers it).

This module imports prometheus_client only inside its functions, after ``enable``."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def enable(role: str) -> Path:
    """Create a fresh private directory and put this process (and the processes it starts)
    in multiprocess mode on it. Raises if prometheus_client was already imported: its values
    would stay in memory, unseen by the scrape."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError(f"prometheus_client was imported before {VARIABLE} was set")
    prefix = f"t2v-{role}-metrics-"
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):  # of processes killed
        owner = stale.name.removeprefix(prefix).split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    os.environ[VARIABLE] = str(directory)
    return directory


def disable(directory: Path) -> None:
    os.environ.pop(VARIABLE, None)
    shutil.rmtree(directory, ignore_errors=True)


def merged(directory: Path) -> Any:
    """A collector of every process's values under ``directory``. Before each scrape it
    drops the live gauges of processes that are gone without saying so (a pool process
    killed by a signal never runs its exit hook)."""
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    values = MultiProcessCollector(None, path=str(directory))

    class Reaping(Collector):
        def collect(self) -> Any:
            _reap(directory)
            return values.collect()

    return Reaping()


def serve(port: int, host: str, directory: Path) -> Any:
    """Serve the merged metrics of every process on ``host:port`` (a daemon thread); the
    server, to ``shutdown``."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(merged(directory))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def process_exited(pid: int) -> None:
    """Drop a pool process's live gauges (its counters and histograms stay in the totals)."""
    from prometheus_client import multiprocess

    if os.environ.get(VARIABLE):
        multiprocess.mark_process_dead(pid)


def _reap(directory: Path) -> None:
    from prometheus_client import multiprocess

    for path in glob.glob(str(directory / "gauge_live*_*.db")):
        pid = int(Path(path).stem.rsplit("_", 1)[1])
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
