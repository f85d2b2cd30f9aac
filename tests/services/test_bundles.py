"""Zoo bundles in the service (SQLite): the tiny zoo, with an uploaded task, exported and
imported into a fresh data directory and database ranks alike; refused bundles leave no row
and no file; the API route is for admins, verifies before 202 and a worker publishes; the
first start imports the shipped bundle; and the shipped starter bundle verifies."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.cli import app as cli
from app.db.models import Expert, IndexVersionRow, MatrixEntry, ZooTask
from app.db.session import session_scope
from app.services import bundles, publishing
from app.services.serving import ZooState
from app.settings import Settings
from app.zoo.bundle import BundleError, verify, write_bundle
from app.zoo.tasks import materialize
from app.zoo.zoo import Zoo
from tests.bundles import REFUSALS, empty_deployment, naming, with_member
from tests.zoo.test_bundle import rewrite, synthetic_zoo


def _state(settings: Settings) -> tuple[int, int, int, int, list[str]]:
    """Rows (experts, tasks, entries, versions) and every file under the data directory."""
    with session_scope(settings.resolved_database_url()) as session:
        counts = [
            session.scalar(select(func.count()).select_from(m)) or 0
            for m in (Expert, ZooTask, MatrixEntry, IndexVersionRow)
        ]
    root = settings.data_dir
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return counts[0], counts[1], counts[2], counts[3], files


def test_an_imported_zoo_ranks_as_the_original(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = exported
    settings = empty_deployment(tmp_path)
    env = {"T2V_DATA_DIR": str(settings.data_dir), "T2V_DATABASE_URL": settings.database_url}
    result = CliRunner().invoke(cli, ["zoo", "import", str(path), "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    assert "9 tasks, 3 experts" in result.output
    version = publishing.current_version(settings)
    assert version is not None
    imported = ZooState.load(version)
    assert [t.name for t in imported.zoo.tasks] == [t.name for t in original.tasks]
    assert np.array_equal(imported.zoo.errors, original.errors)
    assert original.folder is not None
    source = ZooState.load(replace(version, folder=original.folder))
    for query in (2, 5, 8):
        embedding = original.embeddings[query]
        for method in ("learned", "task2vec-knn", "global-best"):
            assert imported.rank(method, embedding) == source.rank(method, embedding)
    # Files live under the new data directory; the uploaded task's dataset still reads.
    uploaded = imported.zoo.tasks[-1]
    assert uploaded.dataset is not None
    assert Path(uploaded.dataset).is_relative_to(settings.data_dir)
    assert len(materialize(uploaded)) == len(materialize(original.tasks[-1]))
    for expert in imported.zoo.experts:
        assert expert.weights == "imagenet" or Path(expert.weights).is_relative_to(
            settings.data_dir
        )
    # The same bundle again: every name is taken.
    before = _state(settings)
    again = CliRunner().invoke(cli, ["zoo", "import", str(path)], env=env)
    assert again.exit_code == 2
    assert "12 of the bundle's experts and tasks are in this zoo already" in again.output
    assert _state(settings) == before


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_bundle_leaves_nothing(
    case: str, exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    settings = empty_deployment(tmp_path)
    before = _state(settings)
    with pytest.raises(BundleError):
        bundles.import_bundle(settings, rewrite(exported[0], REFUSALS[case]))
    assert _state(settings) == before


def test_an_incompatible_bundle_is_refused_naming_what_differs(
    exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    settings = empty_deployment(tmp_path)
    bundles.import_bundle(settings, exported[0])
    before = _state(settings)
    other = synthetic_zoo(tmp_path / "other", replace(exported[1].embed_config, image_size=64))
    path = tmp_path / "other.t2vzoo"
    write_bundle(other, path)
    with pytest.raises(BundleError) as refused:
        bundles.import_bundle(settings, path)
    assert refused.value.kind == "bundle-incompatible"
    assert "image_size: bundle 64, here 32" in str(refused.value)
    assert bundles.problem_of(refused.value).status == 409
    assert _state(settings) == before


def test_the_first_start_imports_the_shipped_bundle(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tmp_path / "starter.t2vzoo"
    shutil.copyfile(exported[0], shipped)
    monkeypatch.setattr(bundles, "STARTER_BUNDLE", shipped)
    settings = empty_deployment(tmp_path / "a", zoo="starter")
    version = bundles.import_shipped(settings)
    assert version is not None
    assert (version.tasks, version.experts) == (9, 3)
    # A bundle refused here leaves the caller to build the zoo.
    shutil.copyfile(rewrite(exported[0], REFUSALS["tampered"]), shipped)
    assert bundles.import_shipped(empty_deployment(tmp_path / "b", zoo="starter")) is None
    assert bundles.import_shipped(empty_deployment(tmp_path / "c", zoo="tiny")) is None


def test_the_shipped_starter_bundle_verifies() -> None:
    assert bundles.STARTER_BUNDLE.is_file(), "make starter-bundle writes it"
    manifest = verify(bundles.STARTER_BUNDLE)
    assert (manifest["tasks"], manifest["experts"]) == (51, 25)
    assert manifest["embed_config"]["probe"] == "efficientnet_lite0"


#: A file that exists on every machine that runs the tests, and one that exists on none.
OUTSIDE = ("/etc/passwd", "/nonexistent/t2v/secret.npz")


def test_a_task_that_names_a_file_here_is_refused_alike_whether_it_exists(
    exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    """A bundle's task cut from an offline source names a path as its dataset: the import
    refuses it before anything is stored (no copy of the file, no row), and the answer is the
    same for a file that exists and one that does not (no oracle), from the CLI too."""
    settings = empty_deployment(tmp_path)
    env = {"T2V_DATA_DIR": str(settings.data_dir), "T2V_DATABASE_URL": settings.database_url}
    before = _state(settings)
    task = exported[1].tasks[0].name
    answers = []
    for i, target in enumerate(OUTSIDE):
        crafted = tmp_path / f"crafted-{i}.t2vzoo"
        shutil.copyfile(rewrite(exported[0], naming(target)), crafted)
        with pytest.raises(BundleError) as refused:
            bundles.import_bundle(settings, crafted)
        assert _state(settings) == before
        result = CliRunner().invoke(cli, ["zoo", "import", str(crafted), "--quiet"], env=env)
        assert result.exit_code == 2, result.output
        assert _state(settings) == before
        answers.append((refused.value.kind, str(refused.value), result.output))
    assert answers[0] == answers[1]
    kind, message, _ = answers[0]
    assert kind == "bundle-external-reference"
    assert bundles.problem_of(refused.value).status == 422
    assert f"zoo task {task!r}" in message
    assert "field 'dataset'" in message
    assert not any(target in message for target in OUTSIDE)


def test_the_import_stores_no_file_from_outside_its_staging_folder(
    exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    """Defence in depth: whatever a verified bundle's zoo names, the step that stores its
    files (run by the worker) copies only files of the bundle's own staging folder."""
    settings = empty_deployment(tmp_path)
    before = _state(settings)
    with bundles.staged(settings, exported[0]) as bundle:
        staging = str(bundle.folder.relative_to(settings.data_dir))

        def state() -> tuple[int, int, int, int, list[str]]:
            """Rows and files, the staging folder's aside."""
            experts, zoo_tasks, entries, versions, files = _state(settings)
            return (
                experts,
                zoo_tasks,
                entries,
                versions,
                [f for f in files if not f.startswith(staging)],
            )

        zoo = bundle.zoo
        uploaded = len(zoo.tasks) - 1
        assert zoo.tasks[uploaded].source == "upload"
        for index in (0, uploaded):
            for target in OUTSIDE:
                tasks = list(zoo.tasks)
                tasks[index] = replace(tasks[index], dataset=target)
                hostile = Zoo(
                    zoo.embed_config, tasks, zoo.embeddings, zoo.experts, zoo.errors, zoo.protocol
                )
                with pytest.raises(BundleError) as refused:
                    bundles.install(settings, replace(bundle, zoo=hostile))
                assert refused.value.kind == "bundle-external-reference"
                assert target not in str(refused.value)
                assert state() == before
    assert _state(settings) == before


#: What extraction reads and writes at a time: the most a limit may be overrun by.
READ_BUFFER = 1 << 20


def expanding(exported: Path, tmp_path: Path) -> tuple[Path, int]:
    """The bundle with a member of 64 MiB of zeros (a few KiB compressed), consistent in
    itself; and a limit that the bundle without it fits in."""
    with tarfile.open(exported) as tar:
        fits = sum(m.size for m in tar) + READ_BUFFER
    zeros = bytes(64 * 1024**2)
    name = f"datasets/{hashlib.sha256(zeros).hexdigest()}.upload"
    crafted = tmp_path / "expanding.t2vzoo"
    shutil.copyfile(rewrite(exported, with_member(name, zeros)), crafted)
    assert crafted.stat().st_size < exported.stat().st_size + len(zeros) // 100
    return crafted, fits


class DiskWatch:
    """The most bytes seen under a folder while it runs (sampled: it can only miss a peak,
    never invent one)."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._done = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._size())

    def _size(self) -> int:
        total = 0
        with contextlib.suppress(OSError):  # a folder removed while it is walked
            for path in self.root.rglob("*"):
                with contextlib.suppress(OSError):  # a file removed meanwhile
                    total += path.stat().st_size if path.is_file() else 0
        return total

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=60)


def test_a_bundle_that_expands_past_the_limit_is_refused_at_the_first_byte_over(
    exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    """A small bundle of highly compressible bytes: the import (CLI, and the check the API
    runs) stops at the configured limit of decompressed bytes, names it, and leaves nothing."""
    crafted, limit = expanding(exported[0], tmp_path)
    settings = empty_deployment(tmp_path, max_bundle_bytes=limit)
    env = {
        "T2V_DATA_DIR": str(settings.data_dir),
        "T2V_DATABASE_URL": settings.database_url,
        "T2V_MAX_BUNDLE_BYTES": str(limit),
    }
    before = _state(settings)
    with DiskWatch(settings.data_dir) as watch:
        result = CliRunner().invoke(cli, ["zoo", "import", str(crafted), "--quiet"], env=env)
    assert result.exit_code == 2, result.output
    assert f"{limit} bytes" in result.output
    assert "T2V_MAX_BUNDLE_BYTES" in result.output
    assert watch.peak <= limit + READ_BUFFER
    assert _state(settings) == before
    with DiskWatch(settings.data_dir) as watch, pytest.raises(BundleError) as refused:
        bundles.check_file(settings, crafted)
    assert refused.value.kind == "bundle-too-large"
    assert watch.peak <= limit + READ_BUFFER
    assert _state(settings) == before
    # The same bundle without the zeros fits the same limit.
    assert bundles.check_file(settings, exported[0])["tasks"] == 9
