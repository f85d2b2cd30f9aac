"""`task2vec worker` as an operator starts it: a metrics port that another process holds is
refused in one line that names the port and its setting, with a failing exit status."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PATIENCE

pytestmark = pytest.mark.slow


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "PATH": "/usr/bin:/bin",
            "T2V_DATA_DIR": str(tmp_path),
            "T2V_WORKER_METRICS_PORT": str(port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker"],
            env=env,
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, done.stderr
    assert str(port) in lines[0]
    assert "T2V_WORKER_METRICS_PORT" in lines[0]
