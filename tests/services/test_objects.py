"""The object store (``app.services.objects``) against a real one, SeaweedFS: objects by key,
fetched atomically (nothing partial, nothing of a refused fetch left), content-addressed keys
checked against their bytes, errors that name the key and the store; and what the service
builds on it: a path one process's row records is another's copy, files and zoo versions
alike, and nothing changes without a store."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import Dataset
from app.db.session import session_scope
from app.services import environment, objects
from app.services.layout import DataLayout
from app.services.storage import UPLOAD_SUFFIX, content_path
from app.settings import Settings
from tests.helpers import free_port, npz_upload, service_settings
from tests.seaweedfs import S3

pytestmark = pytest.mark.slow  # the store is a server process


def _settings(s3: S3, data_dir: Path, url: str | None = None) -> Settings:
    return Settings(data_dir=data_dir, storage_url=url or s3.url(), s3_endpoint_url=s3.endpoint)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_put_get_exists_list_delete(s3: S3, tmp_path: Path) -> None:
    store = objects.ObjectStore(s3.url(), s3.endpoint)
    source = tmp_path / "source.bin"
    source.write_bytes(b"some bytes")
    assert not store.exists("a/b.bin")
    store.put("a/b.bin", source)
    assert store.exists("a/b.bin")
    got = store.get("a/b.bin", tmp_path / "out" / "b.bin")
    assert got.read_bytes() == b"some bytes"
    assert _leftovers(tmp_path / "out") == ["b.bin"]  # the temporary name is gone
    assert [key for key, _ in store.keys("a/")] == ["a/b.bin"]
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    assert list(store.keys("a/")) == []


def test_a_missing_key_names_the_key_and_the_store_and_leaves_nothing(
    s3: S3, tmp_path: Path
) -> None:
    store = objects.ObjectStore(s3.url(), s3.endpoint)
    with pytest.raises(objects.ObjectMissingError) as raised:
        store.get("uploads/no/such.upload", tmp_path / "out" / "such.upload")
    assert "uploads/no/such.upload" in str(raised.value)
    assert s3.endpoint in str(raised.value)
    assert raised.value.errno == errno.ENOENT
    assert _leftovers(tmp_path / "out") == []


def test_bytes_that_do_not_match_their_content_key_are_refused(s3: S3, tmp_path: Path) -> None:
    store = objects.ObjectStore(s3.url(), s3.endpoint)
    source = tmp_path / "x"
    source.write_bytes(b"the real bytes")
    sha = hashlib.sha256(b"other bytes").hexdigest()
    key = f"uploads/{sha[:2]}/{sha}.upload"
    store.put(key, source)
    with pytest.raises(objects.ObjectStoreError) as raised:
        store.get(key, tmp_path / "out" / "x.upload", sha256=sha)
    assert raised.value.errno == errno.EBADMSG
    assert key in str(raised.value)
    assert _leftovers(tmp_path / "out") == []
    right = hashlib.sha256(b"the real bytes").hexdigest()
    assert store.get(key, tmp_path / "ok", sha256=right).read_bytes() == b"the real bytes"


def test_an_unreachable_store_is_a_storage_outage_naming_key_and_endpoint(
    tmp_path: Path,
) -> None:
    """Nothing listens there: an EIO, as a failing disk (the API answers 503, a worker
    retries), that says which key and which store."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = objects.ObjectStore("s3://bucket/p", endpoint)
    with pytest.raises(objects.ObjectStoreError) as raised:
        store.get("embeddings/t.npz", tmp_path / "t.npz")
    assert raised.value.errno == errno.EIO
    assert "embeddings/t.npz" in str(raised.value)
    assert endpoint in str(raised.value)
    assert environment.storage_error(raised.value) is raised.value
    with pytest.raises(objects.ObjectStoreError):
        store.check()


def test_a_path_one_process_recorded_is_fetched_into_anothers_directory(
    s3: S3, tmp_path: Path
) -> None:
    url = s3.url()
    writer = _settings(s3, tmp_path / "writer", url)
    reader = _settings(s3, tmp_path / "reader", url)
    data = b"an uploaded dataset"
    sha = hashlib.sha256(data).hexdigest()
    written = content_path(DataLayout.of(writer).uploads, sha, UPLOAD_SUFFIX)
    written.parent.mkdir(parents=True)
    written.write_bytes(data)
    objects.share(writer, written)
    copy = objects.local(reader, str(written))
    assert copy == content_path(DataLayout.of(reader).uploads, sha, UPLOAD_SUFFIX)
    assert copy.read_bytes() == data
    assert objects.local(writer, str(written)) == written  # its own copy: no fetch
    embedding = DataLayout.of(writer).task_embedding("t1")
    embedding.parent.mkdir(parents=True)
    embedding.write_bytes(b"npz")
    objects.share(writer, embedding)
    assert objects.local(reader, embedding).read_bytes() == b"npz"
    assert objects.local(reader, "imagenet") == Path("imagenet")  # no file of the layout's
    with pytest.raises(objects.ObjectMissingError):
        objects.local(reader, DataLayout.of(writer).task_embedding("never-written"))


def test_a_folder_is_fetched_whole(s3: S3, tmp_path: Path) -> None:
    """A published zoo version: its files, the manifest put last, into a private folder
    renamed into place."""
    url = s3.url()
    writer = _settings(s3, tmp_path / "writer", url)
    reader = _settings(s3, tmp_path / "reader", url)
    folder = DataLayout.of(writer).versions / ("c0" * 16)
    (folder / "experts").mkdir(parents=True)
    (folder / "zoo.json").write_text("{}")
    (folder / "index.faiss").write_bytes(b"index")
    (folder / "experts" / "e.pt").write_bytes(b"weights")
    objects.share(writer, folder)
    copy = objects.local(reader, str(folder))
    assert copy == DataLayout.of(reader).versions / folder.name
    assert (copy / "experts" / "e.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in copy.iterdir()) == ["experts", "index.faiss", "zoo.json"]
    assert _leftovers(copy.parent) == [folder.name]
    objects.forget(writer, folder)
    late = _settings(s3, tmp_path / "late", url)
    with pytest.raises(objects.ObjectMissingError):
        objects.local(late, folder)
    assert _leftovers(DataLayout.of(late).versions) == []


def test_versions_no_row_keeps_leave_the_store(s3: S3, tmp_path: Path) -> None:
    settings = _settings(s3, tmp_path / "data")
    store = objects.store_of(settings)
    assert store is not None
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for content in ("aa" * 16, "bb" * 16, "cc" * 16):
        store.put(f"zoo/versions/{content}/zoo.json", source)
    gone = objects.prune_versions(
        settings, keep={"aa" * 16}, named={"aa" * 16, "bb" * 16}, orphan_seconds=3600
    )
    assert gone == 1  # bb: named but not kept; cc: an orphan still young
    left = {key.split("/")[2] for key, _ in store.keys("zoo/versions/")}
    assert left == {"aa" * 16, "cc" * 16}
    assert objects.prune_versions(settings, {"aa" * 16}, {"aa" * 16}, orphan_seconds=0) == 1


def test_without_a_store_nothing_moves(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert objects.store_of(settings) is None
    path = tmp_path / "elsewhere" / "embeddings" / "t.npz"
    assert objects.local(settings, str(path)) == path  # read where the row says
    objects.share(settings, path)  # nothing to put it in: no error, though it is not there
    objects.forget(settings, path)


def test_the_storage_url_is_checked() -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings(storage_url="https://bucket/prefix")
    assert Settings(storage_url=" s3://b/p ").storage_url == "s3://b/p"
    assert objects.parse_url("s3://b/p/q/") == ("b", "p/q/")
    assert objects.parse_url("s3://b") == ("b", "")


def test_a_copy_is_fetched_once(s3: S3, tmp_path: Path) -> None:
    """A file fetched before is read from the data directory, not fetched again."""
    url = s3.url()
    writer = _settings(s3, tmp_path / "writer", url)
    reader = _settings(s3, tmp_path / "reader", url)
    data = os.urandom(3 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    written = content_path(DataLayout.of(writer).weights, sha, ".pt")
    written.parent.mkdir(parents=True)
    written.write_bytes(data)
    objects.share(writer, written)
    copy = objects.local(reader, written)
    assert copy.read_bytes() == data
    objects.forget(writer, written)
    assert objects.local(reader, written).read_bytes() == data  # a hit: the store is not asked


def test_the_api_is_not_ready_while_its_store_is_unreachable(
    s3: S3, tiny_zoo: Path, tmp_path: Path
) -> None:
    def ready(endpoint: str, where: Path) -> tuple[int, str]:
        settings = service_settings(tiny_zoo, f"sqlite:///{where / 'state.db'}", where)
        shared = settings.model_copy(update={"storage_url": s3.url(), "s3_endpoint_url": endpoint})
        with TestClient(create_app(shared)) as client:
            answer = client.get("/readyz")
        return answer.status_code, answer.json()["checks"]["objects"]

    assert ready(f"http://127.0.0.1:{free_port()}", tmp_path / "gone") == (503, "unavailable")
    assert ready(s3.endpoint, tmp_path / "there") == (200, "ok")


def test_an_upload_while_the_store_is_unreachable_answers_503_and_records_nothing(
    s3: S3, tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is stored locally, then put in the store before its row commits: a store
    gone meanwhile is an outage (503, Retry-After), and no row names a missing object."""
    settings = service_settings(tiny_zoo, f"sqlite:///{tmp_path / 'state.db'}", tmp_path)
    settings = settings.model_copy(update={"storage_url": s3.url(), "s3_endpoint_url": s3.endpoint})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200  # the zoo is published in the store
        dead = objects.ObjectStore(settings.storage_url, f"http://127.0.0.1:{free_port()}")
        monkeypatch.setattr(objects, "store_of", lambda _: dead)
        answer = client.post("/v1/recommendations", files={"file": ("x.npz", npz_upload(1))})
    assert answer.status_code == 503, answer.text
    assert answer.json()["type"].endswith("storage-unavailable")
    assert "Retry-After" in answer.headers
    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
