"""Zoo bundles for the tests: a deployment's first start (an empty data directory and a
migrated database), the tiny zoo with an uploaded task exported as a bundle, and the ways a
bundle is refused (each rewrites its members as an attacker would)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from typer.testing import CliRunner

from app.cli import app as cli
from app.db.migrate import upgrade
from app.db.models import Expert, MatrixEntry, ZooItemStatus
from app.db.session import session_scope
from app.services import publishing, zoo_items
from app.services.layout import DataLayout
from app.settings import Settings
from app.zoo.presets import tiny
from app.zoo.tasks import materialize, uploaded_task
from app.zoo.zoo import Zoo
from tests.helpers import service_settings

Members = list[tuple[str, bytes]]

REFUSALS: dict[str, Callable[[Members], Members]] = {
    "tampered": (lambda ms: [(n, b"x" * len(d) if n == "matrix.npy" else d) for n, d in ms]),
    "missing": (lambda ms: [m for m in ms if not m[0].startswith("experts/")]),
    "outside the manifest": (lambda ms: [*ms, ("datasets/" + "1" * 64 + ".upload", b"x")]),
    "traversal": (lambda ms: [*ms, ("experts/../../../evil.pt", b"x")]),
}


def _listed(ms: Members, name: str, data: bytes) -> Members:
    """The members with ``name`` set to ``data`` and listed in the manifest with its size and
    hash: a bundle consistent in itself, as an attacker who read the format would write it."""
    manifest = json.loads(ms[0][1])
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    rest = [(n, data if n == name else d) for n, d in ms[1:]]
    if name not in dict(rest):
        rest.append((name, data))
    return [(ms[0][0], json.dumps(manifest).encode()), *rest]


def with_record(change: Callable[[dict[str, Any]], None]) -> Callable[[Members], Members]:
    """``zoo.json`` changed by ``change`` (the tasks' recipes, the experts' specs)."""

    def edit(ms: Members) -> Members:
        record = json.loads(dict(ms)["zoo.json"])
        change(record)
        return _listed(ms, "zoo.json", json.dumps(record).encode())

    return edit


def with_member(name: str, data: bytes) -> Callable[[Members], Members]:
    """One more member, listed in the manifest."""
    return lambda ms: _listed(ms, name, data)


def naming(dataset: str) -> Callable[[Members], Members]:
    """The bundle's first task (cut from an offline source) naming ``dataset`` as its file."""

    def change(record: dict[str, Any]) -> None:
        assert record["tasks"][0]["source"] != "upload"
        record["tasks"][0]["dataset"] = dataset

    return with_record(change)


def empty_deployment(tmp_path: Path, **extra: object) -> Settings:
    """A migrated SQLite database and an empty data directory: a deployment's first start."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade(url)
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": url,
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "zoo": "tiny",
        "zoo_poll_seconds": 0,
        "api_keys": "off",
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


def with_uploaded_task(settings: Settings) -> None:
    """Add an uploaded zoo task (its dataset stored like an upload; its embedding and matrix
    row borrowed from a tiny task) and publish: the bundle must carry its dataset."""
    version = publishing.ensure_published(settings, DataLayout.of(settings).zoo("tiny"))
    zoo = Zoo.load(version.folder)
    data = materialize(tiny()[1], split=zoo.protocol.split)
    buffer = io.BytesIO()
    np.savez(buffer, x=data.images, y=np.array(data.classes)[data.labels])
    stored = DataLayout.of(settings).uploads / "ab" / "shoes.upload"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(buffer.getvalue())
    spec = uploaded_task("shoes-uploaded", str(stored), data, "retail")
    path = publishing.save_zoo_embedding(settings, spec, zoo.embeddings[1])
    with session_scope(settings.resolved_database_url()) as session:
        row = zoo_items.zoo_task_row(spec, ZooItemStatus.ready)
        row.embedding_path = str(path)
        session.add(row)
        session.flush()
        for j, name in enumerate(e.name for e in zoo.experts):
            expert = session.scalar(select(Expert.id).where(Expert.name == name))
            session.add(MatrixEntry(zoo_task_id=row.id, expert_id=expert, error=zoo.errors[1, j]))
    publishing.publish(settings)


def export_tiny(tiny_zoo: Path, tmp: Path) -> tuple[Path, Zoo]:
    """The tiny zoo plus an uploaded task, published by a service and exported with the CLI
    (the bundle, and the zoo it holds)."""
    settings = service_settings(tiny_zoo, f"sqlite:///{tmp / 'state.db'}", tmp)
    with_uploaded_task(settings)
    out = tmp / "zoo.t2vzoo"
    env = {"T2V_DATA_DIR": str(settings.data_dir), "T2V_DATABASE_URL": settings.database_url}
    result = CliRunner().invoke(cli, ["zoo", "export", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    version = publishing.current_version(settings)
    assert version is not None
    return out, Zoo.load(version.folder)
