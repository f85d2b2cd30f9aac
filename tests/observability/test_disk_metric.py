"""``/metrics`` carries the data directory's free bytes (``t2v_data_free_bytes``), read at each
scrape, for an alert before the disk fills (``/readyz`` goes not ready below
``min_free_bytes``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings
from tests.disks import MiB, fill, small_disk


def _free_bytes(client: TestClient) -> float:
    found = re.search(r"^t2v_data_free_bytes (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert found is not None
    return float(found.group(1))


def _client(tmp_path: Path, data_dir: Path) -> TestClient:
    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        api_keys="off",
    )
    return TestClient(create_app(settings))


def test_the_free_bytes_of_the_data_directory_are_a_metric(tmp_path: Path) -> None:
    free = _free_bytes(_client(tmp_path, tmp_path / "data"))
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 * MiB  # others write meanwhile


def test_the_metric_follows_the_disk_as_it_fills(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size=8 * MiB) as disk:
        client = _client(tmp_path, disk)
        assert _free_bytes(client) > 7 * MiB
        fill(disk)
        assert _free_bytes(client) == 0
