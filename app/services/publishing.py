"""Publishing zoo versions: every ready task × every ready expert, written as a folder.

Workers compute what a new item needs — a task's embedding and its row of the performance
matrix, an expert's column — mark it ready, and publish: the ready tasks and experts (entries
still missing after a race are computed first) are written as a zoo folder with its FAISS
index, and a row of ``index_versions`` points at it. Each step opens its own short session:
the computations between them take minutes and must not hold a transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.db.models import Expert, IndexVersionRow, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import objects, versions, weights
from app.services.layout import DataLayout
from app.services.versions import Version
from app.services.zoo_items import expert_row, expert_spec, task_spec, zoo_task_row
from app.settings import Settings
from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import ConfigError, EmbeddingFileError
from app.zoo.experts import load_expert
from app.zoo.features import extract_many
from app.zoo.matrix import EvaluationProtocol, holdout_error
from app.zoo.recommenders import LearnedScorer
from app.zoo.tasks import TaskSpec, materialize
from app.zoo.zoo import INDEX_FILE, Zoo

log = logging.getLogger(__name__)
Row = TypeVar("Row", ZooTask, Expert)

#: (stage, done, total), as everywhere else.
Progress = Callable[[str, int, int], None]


def current_version(settings: Settings) -> Version | None:
    """The version to serve, in a session of its own."""
    with session_scope(settings.resolved_database_url()) as session:
        return versions.current(session)


def save_zoo_embedding(settings: Settings, spec: TaskSpec, embedding: Embedding) -> Path:
    path = DataLayout.of(settings).zoo_embedding(spec.key())
    embedding.save(path)
    objects.share(settings, path)
    return path


def add_zoo_rows(session: Session, zoo: Zoo, embeddings: list[Path]) -> None:
    """The zoo's experts and tasks as ready rows (each task with its stored embedding), and
    its matrix entries."""
    experts = [expert_row(spec, ZooItemStatus.ready) for spec in zoo.experts]
    tasks = []
    for spec, path in zip(zoo.tasks, embeddings, strict=True):
        row = zoo_task_row(spec, ZooItemStatus.ready)
        row.embedding_path = str(path)
        tasks.append(row)
    session.add_all([*experts, *tasks])
    session.flush()
    session.add_all(
        MatrixEntry(zoo_task_id=t.id, expert_id=e.id, error=float(zoo.errors[i, j]))
        for i, t in enumerate(tasks)
        for j, e in enumerate(experts)
    )


def import_zoo(settings: Settings, zoo: Zoo) -> None:
    """Put a built zoo into empty zoo tables; a no-op when another process already did."""
    stored = {
        e.name: weights.store(settings, Path(e.weights))
        for e in zoo.experts
        if Path(e.weights).is_file()
    }
    paths = [
        save_zoo_embedding(settings, t, e) for t, e in zip(zoo.tasks, zoo.embeddings, strict=True)
    ]
    try:
        with session_scope(settings.resolved_database_url()) as session:
            if session.scalar(select(ZooTask.id).limit(1)) is not None:
                return
            experts = [replace(s, weights=str(stored.get(s.name, s.weights))) for s in zoo.experts]
            add_zoo_rows(session, replace(zoo, experts=experts), paths)
    except (IntegrityError, OperationalError):
        # Another process imported first (unique names) or held the SQLite write lock.
        with session_scope(settings.resolved_database_url()) as session:
            if session.scalar(select(ZooTask.id).limit(1)) is None:
                raise


def content_hash(zoo: Zoo) -> str:
    digest = hashlib.sha256()
    manifest = {
        "embed_config": asdict(zoo.embed_config),
        "protocol": asdict(zoo.protocol),
        "tasks": [asdict(t) for t in zoo.tasks],
        "experts": [asdict(e) for e in zoo.experts],
        "errors": zoo.errors.tolist(),
    }
    digest.update(json.dumps(manifest, sort_keys=True).encode())
    for embedding in zoo.embeddings:
        digest.update(np.ascontiguousarray(embedding.hessian, dtype=np.float64).tobytes())
    return digest.hexdigest()[:32]


def add_entries(
    settings: Settings, pairs: list[tuple[int, int]], progress: Progress | None = None
) -> None:
    """Compute and store the matrix entries (zoo task id, expert id) in ``pairs``.

    Each entry is committed on its own as it is computed; one another worker stored meanwhile
    is kept (the unique pair wins). The configuration is the current version's.
    """
    if not pairs:
        return
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        version = versions.current(session)
        if version is None:
            raise ConfigError("the zoo has no published version to add to")
        tasks = {t: task_spec(_row(session.get(ZooTask, t), t)) for t, _ in pairs}
        experts = {e: expert_spec(_row(session.get(Expert, e), e)) for _, e in pairs}
    tasks = {t: objects.local_task(settings, spec) for t, spec in tasks.items()}
    experts = {e: objects.local_expert(settings, spec) for e, spec in experts.items()}
    models = {e: load_expert(spec) for e, spec in experts.items()}
    by_task: dict[int, list[int]] = {}
    for task_id, expert_id in sorted(pairs):
        by_task.setdefault(task_id, []).append(expert_id)
    done = 0
    for task_id, expert_ids in by_task.items():  # one decoded task in memory at a time
        images = materialize(
            tasks[task_id], image_size=version.embed_config.image_size, split=version.protocol.split
        )
        features = extract_many([(experts[e], models[e]) for e in expert_ids], images)
        for expert_id, columns in zip(expert_ids, features, strict=True):
            error = holdout_error(columns, images.labels, version.protocol)
            try:
                with session_scope(url) as session:
                    session.add(MatrixEntry(zoo_task_id=task_id, expert_id=expert_id, error=error))
            except IntegrityError:
                pass
            done += 1
            if progress is not None:
                progress("matrix", done, len(pairs))


def _row(row: Row | None, id_: int) -> Row:
    if row is None:
        raise LookupError(f"no zoo item with id {id_}")
    return row


def _snapshot(
    settings: Settings, embed_config: EmbedConfig, protocol: EvaluationProtocol
) -> tuple[Zoo | None, list[tuple[int, int]]]:
    """The ready tasks × ready experts as a zoo, or the matrix entries it still lacks."""
    with session_scope(settings.resolved_database_url()) as session:
        tasks = list(
            session.scalars(
                select(ZooTask).where(ZooTask.status == ZooItemStatus.ready).order_by(ZooTask.id)
            )
        )
        experts = list(
            session.scalars(
                select(Expert).where(Expert.status == ZooItemStatus.ready).order_by(Expert.id)
            )
        )
        entries = {
            (m.zoo_task_id, m.expert_id): m.error for m in session.scalars(select(MatrixEntry))
        }
        missing = [(t.id, e.id) for t in tasks for e in experts if (t.id, e.id) not in entries]
        if missing:
            return None, missing
        errors = np.array(
            [[entries[(t.id, e.id)] for e in experts] for t in tasks], dtype=np.float64
        )
        task_specs = [task_spec(t) for t in tasks]
        expert_specs = [expert_spec(e) for e in experts]
        paths = [t.embedding_path for t in tasks]
    if not task_specs or not expert_specs:
        raise ConfigError("a zoo needs at least one ready task and one ready expert")
    embeddings = []
    for spec, path in zip(task_specs, paths, strict=True):
        if path is None:
            raise EmbeddingFileError(f"zoo task {spec.name!r} is ready but has no embedding")
        embeddings.append(Embedding.load(objects.local(settings, path)))
    return Zoo(embed_config, task_specs, embeddings, expert_specs, errors, protocol), []


def publish(
    settings: Settings,
    base: tuple[EmbedConfig, EvaluationProtocol] | None = None,
    progress: Progress | None = None,
) -> Version:
    """Write every ready task × every ready expert as a new zoo version, with its FAISS index
    and a check that the learned scorer fits it; return the version (an identical one already
    published is returned as it is).

    ``base``: the configuration of the first version; later ones keep the current one's.
    """
    url = settings.resolved_database_url()
    current = current_version(settings)
    if current is not None:
        base = (current.embed_config, current.protocol)
    if base is None:
        raise ConfigError("the first zoo version needs its embedding configuration")
    while True:
        zoo, missing = _snapshot(settings, *base)
        if zoo is not None:
            break
        add_entries(settings, missing, progress)
    content = content_hash(zoo)
    with session_scope(url) as session:
        existing = versions.by_content(session, content)
    if existing is not None:
        return existing
    if progress is not None:
        progress("publishing", 0, 1)
    LearnedScorer(zoo)  # a version the scorer cannot fit is never published
    index = zoo.index()
    folder = _write_version(settings, zoo, content)
    objects.share(settings, folder)  # before the row naming it commits
    config = {"embed_config": asdict(base[0]), "protocol": asdict(base[1])}
    try:
        with session_scope(url) as session:
            row = IndexVersionRow(
                zoo=str(folder),
                probe=zoo.probe,
                dim=index.version.dim,
                count=len(zoo.tasks),
                experts=len(zoo.experts),
                config=config,
                content=content,
            )
            session.add(row)
            session.flush()
            version = Version.of(row)
    except IntegrityError:  # published by a concurrent worker in the meantime
        with session_scope(url) as session:
            found = versions.by_content(session, content)
        assert found is not None
        version = found
    prune(settings)
    if progress is not None:
        progress("publishing", 1, 1)
    log.info(
        "published zoo version %s: %d tasks, %d experts", content, version.tasks, version.experts
    )
    return version


#: A folder under versions/ that no row names (a publisher died between writing it and
#: committing its row, or a temporary one) is removed once it is this old.
ORPHAN_SECONDS = 600


def prune(settings: Settings) -> list[Path]:
    """Delete the folders of all but the newest ``zoo_versions_kept`` versions (their rows
    stay: recommendations name the version they were ranked with), and orphaned folders. A
    process still loading the version before the current one finds its folder: at least two
    are kept. A folder is known by its name (the version's content hash), whichever data
    directory its row was written from; the object store's copies go the same way."""
    root = DataLayout.of(settings).versions
    with session_scope(settings.resolved_database_url()) as session:
        rows = session.scalars(versions.largest_first()).all()
        keep = {Path(r.zoo).name for r in rows[: settings.zoo_versions_kept]}
        named = {Path(r.zoo).name for r in rows}
    now = time.time()
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        orphan = folder.name not in named and now - folder.stat().st_mtime > ORPHAN_SECONDS
        if folder.is_dir() and folder.name not in keep and (folder.name in named or orphan):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    objects.prune_versions(settings, keep, named, ORPHAN_SECONDS)
    return removed


def _write_version(settings: Settings, zoo: Zoo, content: str) -> Path:
    """The version's folder (zoo and FAISS index), named by its content. It is written under a
    private name and renamed into place, so a reader never sees half a folder, and two workers
    publishing the same content at once both succeed (the second rename finds the first)."""
    root = DataLayout.of(settings).versions
    folder = root / content
    if (folder / "zoo.json").is_file():
        return folder
    tmp = root / f".{content}.{uuid.uuid4().hex}"
    try:
        zoo.save(tmp)
        zoo.index().save(tmp / INDEX_FILE)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "zoo.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_published(settings: Settings, base_folder: Path) -> Version:
    """The current version; on first use, the zoo at ``base_folder`` imported and published."""
    version = current_version(settings)
    if version is not None:
        return version
    zoo = Zoo.load(base_folder)
    import_zoo(settings, zoo)
    return publish(settings, base=(zoo.embed_config, zoo.protocol))
