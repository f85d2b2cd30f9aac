"""``task2vec remote`` against real processes (the API and a worker on the embedded default):
a dataset ranked from the command line, a job and the experts shown, a refusal named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from tests.helpers import (
    free_port,
    fresh_database,
    npz_upload,
    service_settings,
    start_api,
    stop,
    worker,
    worker_env,
)

pytestmark = pytest.mark.slow


def _remote(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "remote", *args],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def embedded(tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    with fresh_database("sqlite", tmp_path) as url:
        yield service_settings(tiny_zoo, url, tmp_path)


def test_rank_a_dataset_from_the_command_line(embedded: Settings, tmp_path: Path) -> None:
    settings = embedded
    dataset = tmp_path / "shoes.npz"
    dataset.write_bytes(npz_upload(2))
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    api = start_api(settings, port, log)
    try:
        with worker(settings, log):
            ranked = _remote(
                settings, "recommend", str(dataset), "--server", server, "--k", "2", "--json"
            )
            assert ranked.returncode == 0, ranked.stderr + log.read_text()[-2000:]
            body = json.loads(ranked.stdout)
            assert [r["rank"] for r in body["ranking"]] == [1, 2]
            table = _remote(settings, "recommend", str(dataset), "--server", server)
            assert table.returncode == 0, table.stderr
            assert "expert" in table.stdout
            assert body["ranking"][0]["expert"] in table.stdout
            assert "predicted" in table.stdout
            top = body["ranking"][0]["evidence"]
            low, high = top["error_interval"]
            accuracy = f"{100 * (1 - top['predicted_error']):.1f}%"
            assert f"{accuracy} ({100 * (1 - high):.0f}–{100 * (1 - low):.0f})" in table.stdout
            assert f"({top['interval_level']:.0%}" in table.stdout
            assert top["architecture"] in table.stdout
            if body["novelty"]["out_of_distribution"]:
                assert "outside what the zoo covers" in table.stdout
            else:
                assert "within the zoo's distribution" in table.stdout
        shown = _remote(settings, "tasks", body["task_id"], "--server", server, "--json")
        assert json.loads(shown.stdout)["dataset"]["filename"] == "shoes.npz"
        experts = _remote(settings, "experts", "--server", server, "--json")
        assert json.loads(experts.stdout)["total"] == 3
        missing = _remote(settings, "jobs", "nope", "--server", server)
        assert missing.returncode == 2
        assert "error:" in missing.stderr
        assert "not-found" in missing.stderr
    finally:
        stop(api)
