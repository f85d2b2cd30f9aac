"""Zoo bundles in the service (SQLite): the tiny zoo, with an uploaded task, exported and
imported into a fresh data directory and database ranks alike; refused bundles leave no row
and no file; the API route is for admins, verifies before 202 and a worker publishes; the
first start imports the shipped bundle; and the shipped starter bundle verifies."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.api.main import create_app
from app.cli import app as cli
from app.db.migrate import upgrade
from app.db.models import Expert, IndexVersionRow, MatrixEntry, ZooItemStatus, ZooTask
from app.db.session import session_scope
from app.services import bundles, publishing, zoo_items
from app.services.layout import DataLayout
from app.services.serving import ZooState
from app.settings import Settings
from app.zoo.bundle import BundleError, verify, write_bundle
from app.zoo.presets import tiny
from app.zoo.tasks import materialize, uploaded_task
from app.zoo.zoo import Zoo
from tests.helpers import create_key, run_job, service_settings
from tests.zoo.test_bundle import rewrite, synthetic_zoo
from workers import tasks


def _empty(tmp_path: Path, **extra: object) -> Settings:
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


def _with_uploaded_task(settings: Settings) -> None:
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


@pytest.fixture(scope="module")
def exported(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Zoo]:
    """The tiny zoo plus an uploaded task, published by a service and exported with the CLI."""
    tmp = tmp_path_factory.mktemp("source")
    settings = service_settings(tiny_zoo, f"sqlite:///{tmp / 'state.db'}", tmp)
    _with_uploaded_task(settings)
    out = tmp / "zoo.t2vzoo"
    env = {"T2V_DATA_DIR": str(settings.data_dir), "T2V_DATABASE_URL": settings.database_url}
    result = CliRunner().invoke(cli, ["zoo", "export", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    version = publishing.current_version(settings)
    assert version is not None
    return out, Zoo.load(version.folder)


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
    settings = _empty(tmp_path)
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


REFUSALS = {
    "tampered": (lambda ms: [(n, b"x" * len(d) if n == "matrix.npy" else d) for n, d in ms]),
    "missing": (lambda ms: [m for m in ms if not m[0].startswith("experts/")]),
    "outside the manifest": (lambda ms: [*ms, ("datasets/" + "1" * 64 + ".upload", b"x")]),
    "traversal": (lambda ms: [*ms, ("experts/../../../evil.pt", b"x")]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_bundle_leaves_nothing(
    case: str, exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    settings = _empty(tmp_path)
    before = _state(settings)
    with pytest.raises(BundleError):
        bundles.import_bundle(settings, rewrite(exported[0], REFUSALS[case]))
    assert _state(settings) == before


def test_an_incompatible_bundle_is_refused_naming_what_differs(
    exported: tuple[Path, Zoo], tmp_path: Path
) -> None:
    settings = _empty(tmp_path)
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


def test_the_api_imports_for_admins_only(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    settings = _empty(tmp_path, api_keys="required")
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    _, reader = create_key(settings, "acme", ["tasks:write", "tasks:read"])
    _, admin = create_key(settings, "platform", ["zoo:admin", "tasks:read"])
    body = exported[0].read_bytes()
    with TestClient(create_app(settings)) as client:
        url = "/v1/zoo/import"
        files = {"file": ("zoo.t2vzoo", body)}
        denied = client.post(url, files=files, headers={"Authorization": f"Bearer {reader}"})
        assert denied.status_code == 403
        auth = {"Authorization": f"Bearer {admin}"}
        tampered = rewrite(exported[0], REFUSALS["tampered"]).read_bytes()
        refused = client.post(url, files={"file": ("zoo.t2vzoo", tampered)}, headers=auth)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/bundle-hash-mismatch")
        assert "matrix.npy" in refused.json()["detail"]
        internal = {"callback_url": "http://127.0.0.1:9/hook"}  # the webhook guard holds
        hook = client.post(url, params=internal, files=files, headers=auth)
        assert hook.json()["type"].endswith("/invalid-callback-url")
        assert sent == []
        answer = client.post(url, files=files, headers=auth)
        assert answer.status_code == 202, answer.text
        accepted = answer.json()
        assert (accepted["tasks"], accepted["experts"]) == (9, 3)
        assert (
            answer.headers["location"] == f"/v1/jobs/{accepted['job_id']}" == "/v1/jobs/" + sent[-1]
        )
        run_job(settings, sent[-1])
        job = client.get(accepted["links"]["job"], headers=auth).json()
        assert job["status"] == "succeeded", job
        assert (job["result"]["tasks"], job["result"]["experts"]) == (9, 3)
        assert not list(DataLayout.of(settings).bundles.rglob("*.t2vzoo"))  # gone once imported
        zoo = client.get("/v1/zoo", headers=auth).json()
        assert (zoo["tasks"], zoo["experts"]) == (9, 3)
        conflict = client.post(url, files=files, headers=auth)
        assert conflict.status_code == 409
        assert conflict.json()["type"].endswith("/bundle-conflict")


def test_the_first_start_imports_the_shipped_bundle(
    exported: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tmp_path / "starter.t2vzoo"
    shutil.copyfile(exported[0], shipped)
    monkeypatch.setattr(bundles, "STARTER_BUNDLE", shipped)
    settings = _empty(tmp_path / "a", zoo="starter")
    version = bundles.import_shipped(settings)
    assert version is not None
    assert (version.tasks, version.experts) == (9, 3)
    # A bundle refused here leaves the caller to build the zoo.
    shutil.copyfile(rewrite(exported[0], REFUSALS["tampered"]), shipped)
    assert bundles.import_shipped(_empty(tmp_path / "b", zoo="starter")) is None
    assert bundles.import_shipped(_empty(tmp_path / "c", zoo="tiny")) is None


def test_the_shipped_starter_bundle_verifies() -> None:
    assert bundles.STARTER_BUNDLE.is_file(), "make starter-bundle writes it"
    manifest = verify(bundles.STARTER_BUNDLE)
    assert (manifest["tasks"], manifest["experts"]) == (51, 25)
    assert manifest["embed_config"]["probe"] == "efficientnet_lite0"
