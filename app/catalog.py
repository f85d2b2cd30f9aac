"""The zoo as the service keeps it: experts, zoo tasks and matrix entries in the database,
published as versioned zoo folders.

Once the service has started, the database is the zoo's source of truth. The zoo it was
configured with (a preset or a folder) is imported on first use; the admin endpoints add
experts and tasks. Workers compute what a new item needs — a task's embedding and its row of
the performance matrix, an expert's column — mark it ready, and publish: every ready task ×
every ready expert (entries still missing after a race are computed first) is written as a zoo
folder with its FAISS index, and a row of ``index_versions`` points at it.

Zoos only grow, so of two versions the one with more tasks and experts is the newer: a
publisher that finishes late can add an older version but never make it current. No lock and
no home-made queue is needed; Celery delivers the work and the database orders the versions.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.db.models import Expert, IndexVersionRow, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.settings import Settings
from app.storage import content_path
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import ConfigError, EmbeddingFileError
from app.task2vec.files import atomic_write
from app.zoo.experts import ExpertSpec, extract_features, load_expert
from app.zoo.matrix import EvaluationProtocol, holdout_error
from app.zoo.recommenders import LearnedScorer
from app.zoo.tasks import TaskSpec, materialize
from app.zoo.zoo import INDEX_FILE, Zoo, expert_from_json, task_from_json

log = logging.getLogger(__name__)

#: (stage, done, total), as everywhere else.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Version:
    """A published zoo version, detached from its database row."""

    id: int
    folder: Path
    content: str
    tasks: int
    experts: int
    embed_config: EmbedConfig
    protocol: EvaluationProtocol

    @classmethod
    def of(cls, row: IndexVersionRow) -> Version:
        return cls(
            id=row.id,
            folder=Path(row.zoo),
            content=row.content,
            tasks=row.count,
            experts=row.experts,
            embed_config=EmbedConfig(**row.config["embed_config"]),
            protocol=EvaluationProtocol(**row.config["protocol"]),
        )


def _largest_first() -> Select[IndexVersionRow]:
    """Versions newest first: zoos only grow, so the largest is the newest."""
    return select(IndexVersionRow).order_by(
        (IndexVersionRow.count + IndexVersionRow.experts).desc(), IndexVersionRow.id.desc()
    )


def _newest(session: Session) -> IndexVersionRow | None:
    return session.scalar(_largest_first().limit(1))


def current_version(settings: Settings) -> Version | None:
    """The version to serve: the largest published zoo."""
    with session_scope(settings.resolved_database_url()) as session:
        row = _newest(session)
        return None if row is None else Version.of(row)


# --------------------------------------------------------------------------------------------
# Rows ↔ the zoo's own types


def expert_spec(row: Expert) -> ExpertSpec:
    return expert_from_json(
        {
            "name": row.name,
            "architecture": row.architecture,
            "weights": row.weights,
            "input_size": row.input_size,
            "mean": row.mean,
            "std": row.std,
            "source_task": row.source_task,
            "tags": row.tags,
        }
    )


def task_spec(row: ZooTask) -> TaskSpec:
    return task_from_json(row.spec)


def expert_row(spec: ExpertSpec, status: str = ZooItemStatus.pending) -> Expert:
    return Expert(
        name=spec.name,
        architecture=spec.architecture,
        weights=spec.weights,
        input_size=spec.input_size,
        mean=list(spec.mean),
        std=list(spec.std),
        source_task=spec.source_task,
        tags=list(spec.tags),
        status=status,
    )


def zoo_task_row(spec: TaskSpec, status: str = ZooItemStatus.pending) -> ZooTask:
    return ZooTask(
        name=spec.name,
        domain=spec.domain,
        size=spec.size,
        classes=list(spec.group_names),
        spec=asdict(spec),
        status=status,
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_weights(settings: Settings, source: Path) -> Path:
    """Copy a weight file into the data directory under its content hash (idempotent)."""
    target = content_path(settings.data_dir / "experts", _file_digest(source), ".pt")
    if not target.exists():
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def save_zoo_embedding(settings: Settings, spec: TaskSpec, embedding: Embedding) -> Path:
    path = settings.data_dir / "zoo" / "embeddings" / f"{spec.key()}.npz"
    embedding.save(path)
    return path


# --------------------------------------------------------------------------------------------
# Import and publish


def import_zoo(settings: Settings, zoo: Zoo) -> None:
    """Put a built zoo into empty zoo tables; a no-op when another process already did."""
    weights = {
        e.name: store_weights(settings, Path(e.weights))
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
            experts = []
            for spec in zoo.experts:
                if spec.name in weights:
                    spec = replace(spec, weights=str(weights[spec.name]))
                experts.append(expert_row(spec, ZooItemStatus.ready))
            tasks = []
            for task, path in zip(zoo.tasks, paths, strict=True):
                row = zoo_task_row(task, ZooItemStatus.ready)
                row.embedding_path = str(path)
                tasks.append(row)
            session.add_all([*experts, *tasks])
            session.flush()
            session.add_all(
                MatrixEntry(zoo_task_id=t.id, expert_id=e.id, error=float(zoo.errors[i, j]))
                for i, t in enumerate(tasks)
                for j, e in enumerate(experts)
            )
    except (IntegrityError, OperationalError):
        # Another process imported first (unique names) or held the SQLite write lock.
        with session_scope(settings.resolved_database_url()) as session:
            if session.scalar(select(ZooTask.id).limit(1)) is None:
                raise


def _content_hash(zoo: Zoo) -> str:
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

    An entry another worker stored meanwhile is kept (the unique pair wins); the
    configuration is the current version's.
    """
    version = current_version(settings)
    if version is None:
        raise ConfigError("the zoo has no published version to add to")
    url = settings.resolved_database_url()
    models: dict[int, Any] = {}
    datasets: dict[int, LabelledImages] = {}
    for done, (task_id, expert_id) in enumerate(sorted(pairs)):  # one task's pairs together
        with session_scope(url) as session:
            task, expert = session.get(ZooTask, task_id), session.get(Expert, expert_id)
            assert task is not None
            assert expert is not None
            tspec, espec = task_spec(task), expert_spec(expert)
        if expert_id not in models:
            models[expert_id] = load_expert(espec)
        if task_id not in datasets:
            datasets.clear()  # one decoded task in memory at a time
            datasets[task_id] = materialize(
                tspec, image_size=version.embed_config.image_size, split=version.protocol.split
            )
        data = datasets[task_id]
        features = extract_features(espec, models[expert_id], data)
        error = holdout_error(features, data.labels, version.protocol)
        try:
            with session_scope(url) as session:
                session.add(MatrixEntry(zoo_task_id=task_id, expert_id=expert_id, error=error))
        except IntegrityError:
            pass
        if progress is not None:
            progress("matrix", done + 1, len(pairs))


def _ready(session: Session) -> tuple[list[ZooTask], list[Expert], dict[tuple[int, int], float]]:
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
    entries = {(m.zoo_task_id, m.expert_id): m.error for m in session.scalars(select(MatrixEntry))}
    return tasks, experts, entries


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
    embed_config, protocol = base
    while True:
        with session_scope(url) as session:
            tasks, experts, entries = _ready(session)
            missing = [(t.id, e.id) for t in tasks for e in experts if (t.id, e.id) not in entries]
            if not missing:
                task_specs = [task_spec(t) for t in tasks]
                expert_specs = [expert_spec(e) for e in experts]
                paths = [t.embedding_path for t in tasks]
                errors = np.array(
                    [[entries[(t.id, e.id)] for e in experts] for t in tasks], dtype=np.float64
                )
                break
        add_entries(settings, missing, progress)
    if not task_specs or not expert_specs:
        raise ConfigError("a zoo needs at least one ready task and one ready expert")
    embeddings = []
    for spec, path in zip(task_specs, paths, strict=True):
        if path is None:
            raise EmbeddingFileError(f"zoo task {spec.name!r} is ready but has no embedding")
        embeddings.append(Embedding.load(path))
    zoo = Zoo(embed_config, task_specs, embeddings, expert_specs, errors, protocol)
    content = _content_hash(zoo)
    with session_scope(url) as session:
        row = session.scalar(select(IndexVersionRow).where(IndexVersionRow.content == content))
        if row is not None:
            return Version.of(row)
    if progress is not None:
        progress("publishing", 0, 1)
    LearnedScorer(zoo)  # a version the scorer cannot fit is never published
    index = zoo.index()
    folder = _write_version(settings, zoo, content)
    config = {"embed_config": asdict(embed_config), "protocol": asdict(protocol)}
    try:
        with session_scope(url) as session:
            row = IndexVersionRow(
                zoo=str(folder),
                probe=zoo.probe,
                dim=index.version.dim,
                count=len(task_specs),
                experts=len(expert_specs),
                config=config,
                content=content,
            )
            session.add(row)
            session.flush()
            version = Version.of(row)
    except IntegrityError:  # published by a concurrent worker in the meantime
        with session_scope(url) as session:
            existing = session.scalar(
                select(IndexVersionRow).where(IndexVersionRow.content == content)
            )
            assert existing is not None
            version = Version.of(existing)
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
    are kept."""
    versions = settings.data_dir / "zoo" / "versions"
    with session_scope(settings.resolved_database_url()) as session:
        rows = session.scalars(_largest_first()).all()
        keep = {Path(r.zoo) for r in rows[: settings.zoo_versions_kept]}
        named = {Path(r.zoo) for r in rows}
    now = time.time()
    removed = []
    for folder in sorted(versions.iterdir()) if versions.is_dir() else []:
        orphan = folder not in named and now - folder.stat().st_mtime > ORPHAN_SECONDS
        if folder.is_dir() and folder not in keep and (folder in named or orphan):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _write_version(settings: Settings, zoo: Zoo, content: str) -> Path:
    """The version's folder (zoo and FAISS index), named by its content. It is written under a
    private name and renamed into place, so a reader never sees half a folder, and two workers
    publishing the same content at once both succeed (the second rename finds the first)."""
    versions = settings.data_dir / "zoo" / "versions"
    folder = versions / content
    if (folder / "zoo.json").is_file():
        return folder
    tmp = versions / f".{content}.{uuid.uuid4().hex}"
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


# --------------------------------------------------------------------------------------------
# The two admin jobs (run by workers)


def _ready_ids(session: Session, model: type[ZooTask] | type[Expert]) -> list[int]:
    return list(session.scalars(select(model.id).where(model.status == ZooItemStatus.ready)))


def _mark(
    settings: Settings, model: type[ZooTask] | type[Expert], name: str, **values: Any
) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        row = session.scalar(select(model).where(model.name == name))
        if row is None:
            raise LookupError(f"{model.__tablename__}: no row named {name!r}")
        for key, value in values.items():
            setattr(row, key, value)


def _fetch(url: str, limit: int, settings: Settings) -> Path:
    """Download an expert's weights (at most ``limit`` bytes) into the content store."""
    import tempfile
    import urllib.request

    tmp_dir = settings.data_dir / "experts"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".download", delete=False) as out:
        tmp = Path(out.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                total = 0
                while chunk := response.read(1 << 20):
                    total += len(chunk)
                    if total > limit:
                        raise ConfigError(f"weights at {url} exceed {limit} bytes")
                    out.write(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"weights at {url} cannot be downloaded ({exc})") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        return store_weights(settings, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def remote_weights(weights: str) -> bool:
    return weights.startswith(("http://", "https://"))


def evaluate_expert(settings: Settings, name: str, progress: Progress | None = None) -> Version:
    """A registered expert's column of the matrix on every ready zoo task, then a new version.

    Remote weights are downloaded first; weights that do not load fail the expert.
    """
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        row = session.scalar(select(Expert).where(Expert.name == name))
        if row is None:
            raise LookupError(f"no expert named {name!r}")
        spec, expert_id = expert_spec(row), row.id
        tasks = _ready_ids(session, ZooTask)
        have = set(
            session.scalars(
                select(MatrixEntry.zoo_task_id).where(MatrixEntry.expert_id == expert_id)
            )
        )
    if remote_weights(spec.weights):
        if progress is not None:
            progress("downloading weights", 0, 1)
        stored = _fetch(spec.weights, settings.max_upload_bytes, settings)
        _mark(settings, Expert, name, weights=str(stored))
        spec = replace(spec, weights=str(stored))
    load_expert(spec)  # weights that do not load fail here, before any evaluation
    add_entries(settings, [(t, expert_id) for t in tasks if t not in have], progress)
    _mark(settings, Expert, name, status=ZooItemStatus.ready, error=None)
    return publish(settings, progress=progress)


def add_zoo_task(
    settings: Settings,
    name: str,
    embed_task: Callable[[Any, EmbedConfig], Embedding],
    progress: Progress | None = None,
) -> Version:
    """A new zoo task's embedding and its row of the matrix (every ready expert), then a new
    version. ``embed_task(data, config)`` is the worker's embedding with its loaded probe."""
    version = current_version(settings)
    if version is None:
        raise ConfigError("the zoo has no published version to add to")
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        row = session.scalar(select(ZooTask).where(ZooTask.name == name))
        if row is None:
            raise LookupError(f"no zoo task named {name!r}")
        spec, task_id = task_spec(row), row.id
    data = materialize(
        spec, image_size=version.embed_config.image_size, split=version.protocol.split
    )
    embedding = embed_task(data, version.embed_config)
    embedding.meta["task"] = spec.name
    path = save_zoo_embedding(settings, spec, embedding)
    _mark(settings, ZooTask, name, embedding_path=str(path))
    with session_scope(url) as session:
        experts = _ready_ids(session, Expert)
        have = set(
            session.scalars(select(MatrixEntry.expert_id).where(MatrixEntry.zoo_task_id == task_id))
        )
    add_entries(settings, [(task_id, e) for e in experts if e not in have], progress)
    _mark(settings, ZooTask, name, status=ZooItemStatus.ready, error=None)
    return publish(settings, progress=progress)


def fail_item(
    settings: Settings, model: type[ZooTask] | type[Expert], name: str, error: dict[str, Any]
) -> None:
    """A job for an expert or zoo task failed: the item stays out of the zoo, with why.

    An item already in the current version stays ready (a redelivered job that failed must
    not take it out); one marked ready whose publish then failed is failed, so later versions
    leave it out and its name can be registered again."""
    version = current_version(settings)
    served = set() if version is None else _names(version.folder, model)
    with session_scope(settings.resolved_database_url()) as session:
        row = cast(
            "ZooTask | Expert | None", session.scalar(select(model).where(model.name == name))
        )
        if row is not None and not (row.status == ZooItemStatus.ready and name in served):
            row.status, row.error = ZooItemStatus.failed, error


def _names(folder: Path, model: type[ZooTask] | type[Expert]) -> set[str]:
    """Names of the experts or tasks in a version folder."""
    try:
        manifest = json.loads((folder / "zoo.json").read_text())
    except (OSError, ValueError):
        return set()
    return {item["name"] for item in manifest["experts" if model is Expert else "tasks"]}
