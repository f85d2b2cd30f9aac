"""Zoo bundles in a running service: export the served zoo, import one, and the starter zoo
that ships as a bundle.

An import reads the bundle into a private staging folder under the data directory and
verifies all of it (``app.zoo.bundle``: every hash, the manifest, the zoo, each expert loading
here, the configuration against the deployed zoo's) before anything of the service changes.
Only then are its files stored under their content-addressed names, and its experts, tasks
and matrix entries inserted in one transaction; a new version is then published as after any
addition (matrix entries between the bundle's items and those already here are computed
first). Names: a bundle whose expert or task shares a name with one here that is pending or
ready is refused (409, ``bundle-conflict``) before anything is stored; a failed one of that
name is replaced, as registration does. So a bundle goes into an empty zoo, or into one made
with the same probe, embedding configuration and protocol, where it adds what is new.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import app.data
from app.db.models import Expert, Job, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import jobs, objects, queue
from app.services.jobs import JobKind
from app.services.layout import DataLayout
from app.services.problems import ProblemError
from app.services.publishing import (
    Progress,
    add_zoo_rows,
    current_version,
    publish,
    save_zoo_embedding,
)
from app.services.storage import UPLOAD_SUFFIX, WEIGHTS_SUFFIX, content_path, store_file
from app.services.versions import Version
from app.settings import Settings
from app.task2vec.embedding import EmbedConfig
from app.task2vec.errors import Task2VecError
from app.task2vec.probes import PROBES, imagenet_weights_present
from app.zoo.bundle import SUFFIX, Bundle, BundleError, BundleLimits, read_bundle, with_files
from app.zoo.bundle_references import EXTERNAL, KEYWORDS, is_keyword
from app.zoo.experts import load_expert
from app.zoo.matrix import EvaluationProtocol
from app.zoo.zoo import Zoo

log = logging.getLogger(__name__)

#: The starter zoo as it ships: ``make starter-bundle`` writes it.
STARTER_BUNDLE = Path(app.data.__file__).parent / "bundles" / "starter.t2vzoo"
#: Problem types of refused bundles answered other than 422: a clash with the zoo here.
CONFLICTS = ("bundle-conflict", "bundle-incompatible")


def problem_of(exc: BundleError) -> ProblemError:
    """The HTTP problem of a refused bundle: 409 when it clashes with the zoo here."""
    status = 409 if exc.kind in CONFLICTS else 422
    return ProblemError(status, exc.kind, "The zoo bundle was refused", str(exc))


def export(settings: Settings, out: Path, zoo: Zoo | None = None) -> tuple[str, Zoo]:
    """Write ``zoo`` (by default the version being served) as a bundle; its sha256."""
    from app.zoo.bundle import write_bundle

    if zoo is None:
        version = current_version(settings)
        if version is None:
            raise BundleError("this service has published no zoo to export", "bundle-no-zoo")
        zoo = objects.load_zoo(settings, version)
    return write_bundle(zoo, out), zoo


def limits(settings: Settings) -> BundleLimits:
    """What a bundle may expand to here: ``T2V_MAX_BUNDLE_BYTES`` in all."""
    total = settings.bundle_bytes()
    return BundleLimits(
        max_member_bytes=min(BundleLimits.max_member_bytes, total),
        max_total_bytes=total,
        setting="T2V_MAX_BUNDLE_BYTES",
    )


@contextmanager
def staged(settings: Settings, path: Path) -> Iterator[Bundle]:
    """The verified bundle at ``path``, read into a staging folder removed afterwards (on the
    data directory's file system, so storing its files is a copy on one disk), within the
    limits of ``settings``."""
    root = DataLayout.of(settings).root / "zoo"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        yield read_bundle(path, staging, limits(settings))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: Embedding settings that only say how the embedding was computed (where, with how much
#: memory), not what it is: two deployments may differ in them.
RUNTIME_KEYS = ("device", "feature_cache_mb")


def _configuration(config: EmbedConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in RUNTIME_KEYS}


def differences(
    bundle: tuple[EmbedConfig, EvaluationProtocol], deployed: tuple[EmbedConfig, EvaluationProtocol]
) -> list[str]:
    """What keeps the bundle's zoo and the deployed one apart: embeddings compare only when
    made alike, and matrix entries only when measured by one protocol."""
    found = []
    for what, ours, theirs in (
        ("", _configuration(bundle[0]), _configuration(deployed[0])),
        ("protocol.", asdict(bundle[1]), asdict(deployed[1])),
    ):
        for key in sorted(ours):
            if ours[key] != theirs.get(key):
                found.append(f"{what}{key}: bundle {ours[key]!r}, here {theirs.get(key)!r}")
    return found


def check_compatible(
    bundle: Bundle, deployed: tuple[EmbedConfig, EvaluationProtocol] | None
) -> None:
    """Refuse a bundle this deployment cannot serve or grow: another embedding configuration
    or protocol than the deployed zoo's, a probe whose weights are not on this machine (new
    tasks could not be embedded), or an expert that does not load here. The probe's weights
    are a keyword of the loader, or the file the deployed zoo's probe uses already: a bundle
    names no other file of this machine."""
    config = bundle.zoo.embed_config
    if deployed is not None:
        found = differences((config, bundle.zoo.protocol), deployed)
        if found:
            raise BundleError(
                "the bundle's zoo was made otherwise than this service's: " + "; ".join(found),
                "bundle-incompatible",
            )
    if config.probe not in PROBES:
        raise BundleError(f"probe {config.probe!r} is unknown here", "bundle-incompatible")
    weights = config.probe_weights
    if weights == "imagenet" and not imagenet_weights_present(config.probe):
        raise BundleError(
            f"the ImageNet weights of probe {config.probe!r} are not on this machine",
            "bundle-incompatible",
        )
    if not is_keyword(weights) and deployed is None:
        raise BundleError(
            "the embedding configuration's field 'probe_weights' must be a keyword of the "
            f"loader ({KEYWORDS}) or the probe weights of the zoo served here",
            EXTERNAL,
        )
    for spec in bundle.zoo.experts:
        try:
            load_expert(spec)
        except Task2VecError as exc:
            raise BundleError(
                f"expert {spec.name!r} does not load here: {exc}", "bundle-incompatible"
            ) from None


def _clashes(session: Session, zoo: Zoo) -> list[str]:
    """Names of the bundle's items that are pending or ready here."""
    found = []
    for model, names in (
        (Expert, [e.name for e in zoo.experts]),
        (ZooTask, [t.name for t in zoo.tasks]),
    ):
        taken = session.scalars(
            select(model.name).where(model.name.in_(names), model.status != ZooItemStatus.failed)
        )
        found += sorted(taken)
    return found


def _refuse_clashes(session: Session, zoo: Zoo) -> None:
    clashes = _clashes(session, zoo)
    if clashes:
        shown = ", ".join(repr(n) for n in clashes[:10])
        more = f" and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        raise BundleError(
            f"{len(clashes)} of the bundle's experts and tasks are in this zoo already: "
            f"{shown}{more}",
            "bundle-conflict",
        )


def check(settings: Settings, bundle: Bundle) -> None:
    """Everything that can refuse the bundle before it is stored: the configuration against
    the deployed zoo's, the experts loading here, names already taken."""
    version = current_version(settings)
    check_compatible(bundle, None if version is None else (version.embed_config, version.protocol))
    with session_scope(settings.resolved_database_url()) as session:
        _refuse_clashes(session, bundle.zoo)


def summary(bundle: Bundle) -> dict[str, Any]:
    manifest = bundle.manifest
    return {
        "tasks": manifest["tasks"],
        "experts": manifest["experts"],
        "probe": manifest["embed_config"]["probe"],
    }


def check_file(settings: Settings, path: Path) -> dict[str, Any]:
    """Verify the bundle at ``path`` against this service without importing it."""
    with staged(settings, path) as bundle:
        check(settings, bundle)
        return summary(bundle)


def _staged_file(bundle: Bundle, path: str, what: str) -> str:
    """``path`` when it is a file of the bundle's staging folder; a bundle is refused for
    anything else before any of its files is stored, whatever the path names."""
    folder = bundle.folder.resolve()
    resolved = Path(path).resolve()
    if resolved.is_relative_to(folder) and resolved != folder:
        return path
    raise BundleError(f"{what} names a file outside the bundle", EXTERNAL)


def _store_files(settings: Settings, bundle: Bundle) -> Zoo:
    """The bundle's files under their content-addressed names; its zoo pointing at them. Only
    files of its staging folder are stored: a dataset or weights named otherwise refuse it (as
    reading it does; checked again where the files are copied). A file whose rows then fail
    to commit is one no row holds: the workers' sweep removes it."""
    layout = DataLayout.of(settings)
    staged_weights = [
        _staged_file(bundle, e.weights, f"expert {e.name!r}: field 'weights'")
        for e in bundle.zoo.experts
        if not is_keyword(e.weights)
    ]
    staged_data = [
        _staged_file(bundle, t.dataset, f"zoo task {t.name!r}: field 'dataset'")
        for t in bundle.zoo.tasks
        if t.dataset is not None
    ]
    weights = {w: store_file(Path(w), layout.weights, WEIGHTS_SUFFIX) for w in staged_weights}
    datasets = {d: store_file(Path(d), layout.uploads, UPLOAD_SUFFIX) for d in staged_data}
    for stored in [*weights.values(), *datasets.values()]:
        objects.share(settings, stored)
    return with_files(
        bundle,
        {k: str(v) for k, v in weights.items()},
        {k: str(v) for k, v in datasets.items()},
    )


def _insert(session: Session, zoo: Zoo, embeddings: list[Path]) -> None:
    """The zoo's items as ready rows with their matrix entries; failed rows of the same names
    are replaced, with their entries."""
    for model, names in (
        (Expert, [e.name for e in zoo.experts]),
        (ZooTask, [t.name for t in zoo.tasks]),
    ):
        old = list(session.scalars(select(model.id).where(model.name.in_(names))))
        if old:
            column = MatrixEntry.expert_id if model is Expert else MatrixEntry.zoo_task_id
            session.execute(delete(MatrixEntry).where(column.in_(old)))
            session.execute(delete(model).where(model.id.in_(old)))
    add_zoo_rows(session, zoo, embeddings)


def install(settings: Settings, bundle: Bundle, progress: Progress | None = None) -> Version:
    """Store a verified bundle's files, insert its rows in one transaction, publish."""
    zoo = _store_files(settings, bundle)
    paths = [
        save_zoo_embedding(settings, t, e) for t, e in zip(zoo.tasks, zoo.embeddings, strict=True)
    ]
    try:
        with session_scope(settings.resolved_database_url()) as session:
            _refuse_clashes(session, zoo)  # again: another import or registration may have won
            _insert(session, zoo, paths)
    except IntegrityError:
        raise BundleError(
            "an expert or task of the bundle was added to this zoo at the same time",
            "bundle-conflict",
        ) from None
    log.info("imported a zoo bundle: %d tasks, %d experts", len(zoo.tasks), len(zoo.experts))
    return publish(settings, base=(zoo.embed_config, zoo.protocol), progress=progress)


def import_bundle(settings: Settings, path: Path, progress: Progress | None = None) -> Version:
    """Verify the bundle at ``path`` against this service and import it; the new version."""
    if progress is not None:
        progress("verifying", 0, 1)
    with staged(settings, path) as bundle:
        check(settings, bundle)
        if progress is not None:
            progress("verifying", 1, 1)
        return install(settings, bundle, progress)


def stored_bundle(settings: Settings, sha256: str) -> Path:
    """Where an uploaded bundle waits for its import job (named by content): in this
    process's data directory, fetched from the object store when there is one (and not
    there when the store has none either)."""
    path = content_path(DataLayout.of(settings).bundles, sha256, SUFFIX)
    try:
        return objects.local(settings, path)
    except objects.ObjectMissingError:
        return path


def discard(settings: Settings, path: Path) -> None:
    """An uploaded bundle imported or refused: its file goes, and its object."""
    path.unlink(missing_ok=True)
    objects.forget(settings, path)


def submit(
    session: Session,
    *,
    settings: Settings,
    sha256: str,
    tenant: str,
    callback_url: str | None = None,
) -> Job:
    """Commit the job that imports the stored bundle ``sha256``, and send it (``callback_url``
    is called when it ends). The job names the bundle by its hash: its parameters are shown to
    its tenant, paths are not. The bundle is put in the object store first (when there is
    one): the worker may see no other copy."""
    objects.share(settings, stored_bundle(settings, sha256))
    job = jobs.create(
        session,
        kind=JobKind.zoo_import,
        task_id=None,
        tenant=tenant,
        callback_url=callback_url,
        bundle=sha256,
    )
    queue.send(session=session, job=job, broker_url=settings.resolved_broker_url())
    return job


def shipped(settings: Settings) -> Path | None:
    """The bundle the configured zoo ships as, unless the data directory holds that zoo
    built already (which is then published as before)."""
    if settings.zoo != "starter" or not STARTER_BUNDLE.is_file():
        return None
    if (DataLayout.of(settings).zoo(settings.zoo) / "zoo.json").is_file():
        return None
    return STARTER_BUNDLE


def import_shipped(settings: Settings, progress: Progress | None = None) -> Version | None:
    """First start: the shipped bundle of the configured zoo imported and published; None
    when there is none or it is refused (the caller builds the zoo instead), or when the
    zoo tables already hold items (another process is importing)."""
    path = shipped(settings)
    if path is None:
        return None
    with session_scope(settings.resolved_database_url()) as session:
        if session.scalar(select(ZooTask.id).limit(1)) is not None:
            return current_version(settings)
    try:
        return import_bundle(settings, path, progress)
    except BundleError as exc:
        log.warning("the shipped zoo bundle %s was refused: %s", path.name, exc)
        return current_version(settings)
