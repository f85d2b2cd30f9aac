"""The stop drill: `task2vec run` stopped by one SIGTERM to its whole process group, as a
terminal, systemd or Kubernetes deliver it, leaves no process behind, every time: after it
served a ranking, while a job runs, and while its worker warms up. Real processes on a free
port, the tiny zoo on the embedded default (SQLite and the SQLite broker)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import api_ready, eventually, free_port, npz_upload

pytestmark = pytest.mark.slow

#: How long every process of the group gets to be gone after the SIGTERM: a bound on a
#: hang (a stop that hangs never ends), far above the few seconds a stop takes.
STOP_BOUND = 45.0
#: Stops per situation: a race that leaves a process behind one stop in a few shows here.
REPEATS = 3


def _group(pgid: int) -> list[str]:
    """The processes of group ``pgid`` still running (zombies, already dead, left out):
    ``pid state command`` each."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{entry.name} {fields[0]} {command[:120]}")
    return found


@pytest.fixture(scope="module")
def data_dir(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for every start: the first imports and publishes the zoo."""
    folder = tmp_path_factory.mktemp("stop") / "data"
    shutil.copytree(tiny_zoo.parent, folder / "zoos")
    return folder


@dataclass(frozen=True)
class Service:
    port: int
    pgid: int
    log: Path


@pytest.fixture
def start(data_dir: Path, tmp_path: Path) -> Iterator[Callable[[], Service]]:
    """Starts `task2vec run` in a process group of its own, ready once its API answers.
    Whatever a test leaves running is killed after it."""
    started: list[subprocess.Popen[bytes]] = []

    def run() -> Service:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")} | {
            "T2V_DATA_DIR": str(data_dir),
            "T2V_ZOO": "tiny",
        }
        log = tmp_path / f"run-{len(started)}.log"
        with log.open("wb") as out:
            service = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(service)
        eventually(lambda: api_ready(port), "the service", processes=[service], log=log)
        return Service(port, service.pid, log)

    yield run
    for service in started:
        if _group(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
        service.wait(timeout=60)


def _stop(service: Service) -> None:
    """SIGTERM to the group; every process of it gone within the bound."""
    os.killpg(service.pgid, signal.SIGTERM)
    sent = time.monotonic()
    while (left := _group(service.pgid)) and time.monotonic() < sent + STOP_BOUND:
        time.sleep(0.2)
    # A figure for the README (pytest -s shows it), not a bound: the outcome is asserted.
    print(f"stopped in {time.monotonic() - sent:.1f} s" if not left else "not stopped")
    tail = service.log.read_text(errors="replace")[-2500:]
    assert not left, f"still running {STOP_BOUND:.0f} s after SIGTERM: {left}\n{tail}"


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_sigterm_after_serving_a_ranking_stops_every_process(
    start: Callable[[], Service], repeat: int
) -> None:
    service = start()
    answer = httpx.post(
        f"http://127.0.0.1:{service.port}/v1/recommendations",
        params={"wait": 120},
        files={"file": ("a.npz", npz_upload(1 + repeat))},
        timeout=180,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["ranking"]
    _stop(service)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_sigterm_during_a_job_stops_every_process(
    start: Callable[[], Service], repeat: int
) -> None:
    service = start()
    base = f"http://127.0.0.1:{service.port}"
    accepted = httpx.post(
        f"{base}/v1/tasks", files={"file": ("b.npz", npz_upload(4 + repeat))}, timeout=60
    )
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()["job_id"]

    def running() -> bool:
        return bool(httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()["status"] == "running")

    eventually(running, f"job {job} to run", log=service.log, pause=0.05)
    _stop(service)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_sigterm_during_the_warm_up_stops_every_process(
    start: Callable[[], Service], repeat: int
) -> None:
    """The stop comes as soon as the API answers: the worker's pool process is then still
    loading the zoo and the probe (its log says "warmed up" once done)."""
    service = start()
    print("warmed up before the stop:", "warmed up" in service.log.read_text(errors="replace"))
    _stop(service)
