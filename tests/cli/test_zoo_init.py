"""`task2vec zoo init`, the first start of a deployment (the one-shot service of
docker-compose.yml and the Job of the Kubernetes example): it imports the shipped bundle and
publishes it once, whoever runs it and however many times; replicas started together get one
version; with an object store, a process with a data directory of its own loads what it
published; it refuses a database never migrated. The shipped bundle is the tiny zoo's here."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from typer.testing import CliRunner

from app.cli import app as cli
from app.cli.service import first_version
from app.db.models import Expert, IndexVersionRow, MatrixEntry, ZooTask
from app.db.session import session_scope
from app.services import bundles, objects, publishing
from app.services.versions import Version
from app.settings import Settings
from app.zoo.zoo import Zoo
from tests.bundles import empty_deployment
from tests.helpers import fresh_database
from tests.seaweedfs import CREDENTIALS, S3


@pytest.fixture
def shipped(exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny zoo's bundle in the place of the starter zoo's."""
    path = tmp_path / "starter.t2vzoo"
    shutil.copyfile(exported[0], path)
    monkeypatch.setattr(bundles, "STARTER_BUNDLE", path)
    return path


def _env(settings: Settings) -> dict[str, str]:
    return {
        "T2V_DATA_DIR": str(settings.data_dir),
        "T2V_DATABASE_URL": settings.database_url,
        "T2V_ZOO": settings.zoo,
    }


def _rows(settings: Settings) -> tuple[int, ...]:
    with session_scope(settings.resolved_database_url()) as session:
        return tuple(
            session.scalar(select(func.count()).select_from(m)) or 0
            for m in (Expert, ZooTask, MatrixEntry, IndexVersionRow)
        )


@pytest.mark.usefixtures("shipped")
def test_the_first_run_imports_the_shipped_zoo_and_the_next_changes_nothing(
    tmp_path: Path,
) -> None:
    settings = empty_deployment(tmp_path / "d", zoo="starter")
    first = CliRunner().invoke(cli, ["zoo", "init"], env=_env(settings))
    assert first.exit_code == 0, first.output
    version = publishing.current_version(settings)
    assert version is not None
    assert f"zoo version {version.content[:12]}: 9 tasks, 3 experts" in first.output
    before = _rows(settings)
    assert before == (3, 9, 27, 1)
    again = CliRunner().invoke(cli, ["zoo", "init"], env=_env(settings))
    assert again.exit_code == 0, again.output
    assert f"zoo version {version.content[:12]}" in again.output
    assert _rows(settings) == before


@pytest.mark.usefixtures("shipped")
def test_rows_imported_but_never_published_are_published(tmp_path: Path) -> None:
    """An import killed between committing its rows and publishing them (or one still
    publishing in another process): the next run publishes the same version."""
    settings = empty_deployment(tmp_path / "d", zoo="starter")
    imported = bundles.import_shipped(settings)
    assert imported is not None
    with session_scope(settings.resolved_database_url()) as session:
        session.execute(delete(IndexVersionRow))
    assert publishing.current_version(settings) is None
    assert bundles.import_shipped(settings) is None  # the rows are there: no second import
    version = first_version(settings)
    assert version.content == imported.content
    assert _rows(settings) == (3, 9, 27, 1)


@pytest.mark.usefixtures("shipped")
def test_replicas_starting_together_get_one_version(tmp_path: Path) -> None:
    """Four first starts at once on PostgreSQL, as replicas that each run it would: one
    import's rows, one version, the same for every caller."""
    with fresh_database("postgresql", tmp_path) as url:
        settings = empty_deployment(tmp_path / "d", zoo="starter", database_url=url)
        start = threading.Barrier(4)
        got: list[Version | BaseException] = []

        def first_start() -> None:
            start.wait()
            try:
                got.append(first_version(settings))
            except BaseException as exc:  # reported below, with the others' answers
                got.append(exc)

        threads = [threading.Thread(target=first_start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(v, Version) for v in got), got
        assert len({v.content for v in got if isinstance(v, Version)}) == 1
        assert _rows(settings) == (3, 9, 27, 1)


@pytest.mark.slow  # a SeaweedFS server
@pytest.mark.usefixtures("shipped")
def test_with_an_object_store_another_data_directory_serves_what_it_published(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compose and Kubernetes shape: the one-shot step's data directory is thrown away,
    and every other process starts from an empty one of its own."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = {"storage_url": s3.url(), "s3_endpoint_url": s3.endpoint}
    with fresh_database("postgresql", tmp_path) as url:
        one_shot = empty_deployment(tmp_path / "a", zoo="starter", database_url=url, **store)
        env = {**_env(one_shot), "T2V_STORAGE_URL": store["storage_url"]}
        env["T2V_S3_ENDPOINT_URL"] = store["s3_endpoint_url"]
        result = CliRunner().invoke(cli, ["zoo", "init"], env=env)
        assert result.exit_code == 0, result.output
        replica = empty_deployment(tmp_path / "b", zoo="starter", database_url=url, **store)
        version = publishing.current_version(replica)
        assert version is not None
        zoo = objects.load_zoo(replica, version)
        assert (len(zoo.tasks), len(zoo.experts)) == (9, 3)
        for expert in zoo.experts:
            assert expert.weights == "imagenet" or Path(expert.weights).is_file()
        again = CliRunner().invoke(cli, ["zoo", "init"], env={**env, **_env(replica)})
        assert again.exit_code == 0, again.output
        assert _rows(replica) == (3, 9, 27, 1)


def test_a_database_never_migrated_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never.db'}"
    result = CliRunner().invoke(
        cli, ["zoo", "init"], env={"T2V_DATA_DIR": str(tmp_path), "T2V_DATABASE_URL": url}
    )
    assert result.exit_code == 2
    assert "run `task2vec db upgrade` first" in result.output
