"""`task2vec run`, the command behind `make run`: on the embedded default it migrates, imports
and publishes the zoo, starts a worker and the API; Ctrl-C stops both."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import PATIENCE, api_ready, eventually, free_port

pytestmark = pytest.mark.slow


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_serves_and_ctrl_c_stops_the_worker_too(tiny_zoo: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_zoo.parent, data_dir / "zoos")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")} | {
        "T2V_DATA_DIR": str(data_dir),
        "T2V_ZOO": "tiny",
    }
    log = (tmp_path / "run.log").open("w")
    service = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        eventually(
            lambda: api_ready(port),
            "the service to be ready",
            processes=[service],
            log=tmp_path / "run.log",
        )
        zoo = httpx.get(f"http://127.0.0.1:{port}/v1/zoo").json()
        assert (zoo["tasks"], zoo["experts"]) == (8, 3)
        assert (data_dir / "task2vec.db").is_file()

        os.killpg(service.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        service.wait(timeout=PATIENCE)
        eventually(lambda: not _group_alive(service.pid), "the worker to stop with the service")
    finally:
        if _group_alive(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert "zoo version" in output
    assert "8 tasks, 3 experts" in output
    assert f"curl -F file=@shoes.zip 'http://127.0.0.1:{port}/v1/recommendations" in output
    # Logs for a person at the terminal: text lines, each request's with its id.
    access = r'INFO +uvicorn\.access: .* "GET /v1/zoo HTTP/1\.1" 200 \[request_id=[0-9a-f]{32}\]'
    assert re.search(access, output), output
    assert not any(line.startswith("{") for line in output.splitlines())
