"""What no one will use again goes, and nothing else: stored files no row holds (once old
enough that no request can still be about to commit its row) and temporary files; and
Idempotency-Key records past their time."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.db.models import Dataset, IdempotencyRecord, utcnow
from app.db.session import session_scope
from app.services import objects, orphans
from app.services.layout import DataLayout
from app.settings import Settings
from tests.seaweedfs import S3

HOUR = 3600.0


def _file(root: Path, name: str, hours_old: float = 0.0) -> Path:
    path = root / name[:2] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"stored bytes")
    then = time.time() - hours_old * HOUR
    os.utime(path, (then, then))
    return path


def _hold(settings: Settings, path: str) -> None:
    """A dataset row holding the stored upload ``path`` (named by ``'a' * 64``)."""
    with session_scope(settings.resolved_database_url()) as session:
        session.add(
            Dataset(
                tenant="local",
                sha256="a" * 64,
                path=path,
                filename="a.npz",
                bytes=12,
                num_images=3,
                classes=["x"],
                class_counts=[3],
            )
        )


def test_old_files_no_row_holds_go_and_nothing_else(settings: Settings) -> None:
    layout = DataLayout.of(settings)
    held = _file(layout.uploads, f"{'a' * 64}.upload", hours_old=5)
    orphan = _file(layout.uploads, f"{'b' * 64}.upload", hours_old=5)
    young = _file(layout.uploads, f"{'c' * 64}.upload")  # its row may be about to commit
    weights = _file(layout.weights, f"{'d' * 64}.pt", hours_old=5)
    partial = _file(layout.weights, f"{'e' * 64}.pt.download", hours_old=5)
    foreign = _file(layout.uploads, "notes.txt", hours_old=5)  # not a file the service writes
    _hold(settings, str(held))
    assert set(orphans.prune(settings, older_than=HOUR)) == {orphan, weights, partial}
    assert {p for p in (held, young, foreign) if p.exists()} == {held, young, foreign}
    assert not any(p.exists() for p in (orphan, weights, partial))


def _records(settings: Settings) -> int:
    with session_scope(settings.resolved_database_url()) as session:
        return int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0)


def test_the_sweep_deletes_expired_idempotency_records(settings: Settings) -> None:
    day = timedelta(seconds=settings.idempotency_ttl_seconds)
    with session_scope(settings.resolved_database_url()) as session:
        for key, age in (("fresh", timedelta(0)), ("young", day * 0.9), ("old", day * 1.1)):
            session.add(
                IdempotencyRecord(
                    tenant="local",
                    key=key,
                    fingerprint="f",
                    status=202,
                    body={},
                    created_at=utcnow() - age,
                )
            )
    assert orphans.prune_idempotency_records(settings) == 1
    assert _records(settings) == 2
    assert orphans.prune_idempotency_records(settings) == 0


@pytest.mark.slow  # the store is a server process
def test_objects_no_row_holds_leave_the_store_too(s3: S3, settings: Settings) -> None:
    """With an object store, the sweep prunes it by the same rule: an old upload or weight
    file no row holds goes; one a row holds (written from any data directory) and a young one
    stay."""
    shared = settings.model_copy(update={"storage_url": s3.url(), "s3_endpoint_url": s3.endpoint})
    store = objects.store_of(shared)
    assert store is not None
    layout = DataLayout.of(shared)
    names = {
        "held": f"uploads/aa/{'a' * 64}.upload",
        "orphan": f"uploads/bb/{'b' * 64}.upload",
        "weights": f"experts/dd/{'d' * 64}.pt",
    }
    source = _file(layout.root / "source", "source.bin")
    for key in names.values():
        store.put(key, source)
    _hold(shared, f"/another/data/dir/{names['held']}")  # recorded by another process
    orphans.prune(shared, older_than=HOUR)  # all are young
    assert {key for key, _ in store.keys("")} == set(names.values())
    orphans.prune(shared, older_than=-HOUR)  # all are old enough
    assert {key for key, _ in store.keys("")} == {names["held"]}
