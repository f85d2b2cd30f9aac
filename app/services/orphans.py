"""What no one will use again: stored files that no row holds (what a request cut off
between storing a file and committing its row leaves behind: the API killed mid-request, the
database gone at that moment; half-written temporary files), and Idempotency-Key records past
their time.

A file is stored before its row commits, so a young file without a row may belong to a request
still under way: only files older than a grace period are removed, far longer than a request
may take. Every worker prunes now and then (``leases.Sweeper``); the shared data directory
makes any one of them enough. With an object store (``app.services.objects``), each process's
data directory is its own cache, pruned by its own workers the same way, and the store's
uploads and weights by the same rule: one no row holds, once older than the grace period.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select

from app.db.models import Dataset, Expert, IdempotencyRecord, ZooTask, utcnow
from app.db.session import session_scope
from app.services import objects
from app.services.layout import DataLayout, content_sha
from app.services.storage import UPLOAD_SUFFIX, WEIGHTS_SUFFIX
from app.settings import Settings

log = logging.getLogger(__name__)

#: A file streams to a temporary name before it is renamed into place: hidden (``storage``,
#: ``files.atomic_write``) or a download (``weights.fetch``).
TEMPORARY_SUFFIXES = (".download", ".tmp")


def _files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from (p for p in root.rglob("*") if p.is_file())


def _temporary(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(TEMPORARY_SUFFIXES)


def prune(settings: Settings, older_than: float) -> list[Path]:
    """Remove stored uploads and expert weights that no dataset, zoo task or expert row holds,
    and temporary files, last modified more than ``older_than`` seconds ago; what went."""
    layout = DataLayout.of(settings)
    cutoff = time.time() - older_than
    candidates = [
        p
        for root in (layout.uploads, layout.weights)
        for p in _files(root)
        if p.stat().st_mtime < cutoff
    ]
    shared = _shared_candidates(settings, cutoff)
    if not candidates and not shared:
        return []
    held = _held(settings)
    _prune_shared(settings, shared, held)
    removed = []
    for path in candidates:
        stored = path.suffix in (UPLOAD_SUFFIX, WEIGHTS_SUFFIX) and not _temporary(path)
        if stored and path.name in held:
            continue
        if not stored and not _temporary(path):
            continue  # not a file the service writes: left alone
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d stored files that no row holds", len(removed))
    return removed


def _held(settings: Settings) -> set[str]:
    """The names of the stored files rows hold. Stored files are named by their content, so
    a name is the file wherever the data directory is mounted (and its object's key)."""
    with session_scope(settings.resolved_database_url()) as session:
        held = {Path(p).name for p in session.scalars(select(Dataset.path))}
        held |= {Path(w).name for w in session.scalars(select(Expert.weights))}
        held |= {Path(str(s.get("dataset"))).name for s in session.scalars(select(ZooTask.spec))}
    return held


def _shared_candidates(settings: Settings, cutoff: float) -> list[str]:
    """Keys of stored uploads and weights in the object store written before ``cutoff``."""
    store = objects.store_of(settings)
    if store is None:
        return []
    return [
        key
        for prefix in ("uploads/", "experts/")
        for key, modified in store.keys(prefix)
        if modified.timestamp() < cutoff and content_sha(key) is not None
    ]


def _prune_shared(settings: Settings, keys: list[str], held: set[str]) -> None:
    store = objects.store_of(settings)
    gone = [key for key in keys if key.rsplit("/", 1)[-1] not in held]
    for key in gone:
        assert store is not None
        store.delete(key)
    if gone:
        log.info("removed %d stored objects that no row holds", len(gone))


def prune_idempotency_records(settings: Settings) -> int:
    """Delete Idempotency-Key records older than ``idempotency_ttl_seconds``; how many went.
    (An expired record no longer holds its key even before it is deleted.)"""
    cutoff = utcnow() - timedelta(seconds=settings.idempotency_ttl_seconds)
    with session_scope(settings.resolved_database_url()) as session:
        result = session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff)
        )
        return int(getattr(result, "rowcount", 0) or 0)
