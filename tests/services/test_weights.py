"""Expert weight files (``app.services.weights``), on real directories and a real HTTP server
on loopback; no database is involved.

Weights are kept by content under the data directory (the same bytes once, the source left
alone); only http(s) names a remote file. ``place`` turns what a client named into what the
expert row will hold: a URL checked now and left for a worker to download, a probe keyword as
it is, or a file under the operator's import folder copied in (at most ``max_upload_bytes``).
Anything else is a 422 ``invalid-expert``, and a path outside the folder reads the same
whether or not a file is there: the API must not tell a client which files the machine has.
``fetch`` downloads through the outbound guard to a file of its own under the data directory,
and a failed download leaves nothing behind."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from app.services import weights
from app.services.layout import DataLayout
from app.services.outbound import OutboundError
from app.services.problems import ProblemError
from app.settings import Settings
from tests.helpers import cnn_weights

WEIGHTS = cnn_weights()


def _settings(
    tmp_path: Path,
    *,
    weights_import_dir: Path | None = None,
    allow_private_urls: bool = False,
    max_upload_bytes: int = 1 << 20,
) -> Settings:
    """Settings on a data directory of this test's own (the weights need no database)."""
    return Settings(
        data_dir=tmp_path / "data",
        weights_import_dir=weights_import_dir,
        allow_private_urls=allow_private_urls,
        max_upload_bytes=max_upload_bytes,
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _problem(call: Callable[[], object]) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        call()
    assert (raised.value.status, raised.value.kind) == (422, "invalid-expert")
    return raised.value


@pytest.fixture
def imports(tmp_path: Path) -> Path:
    """The operator's import folder, with one weight file in it and one beside it."""
    folder = tmp_path / "imports"
    (folder / "team").mkdir(parents=True)
    (folder / "team" / "w.pt").write_bytes(WEIGHTS)
    (tmp_path / "secret.pt").write_bytes(b"not for clients")
    return folder


def test_store_keeps_weights_by_content_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    source = tmp_path / "model.bin"
    source.write_bytes(WEIGHTS)
    stored = weights.store(settings, source)
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert stored == DataLayout.of(settings).weights / sha[:2] / f"{sha}.pt"
    assert stored.read_bytes() == WEIGHTS
    assert source.read_bytes() == WEIGHTS  # copied, not moved
    again = tmp_path / "same-bytes-other-name.pt"
    again.write_bytes(WEIGHTS)
    assert weights.store(settings, again) == stored
    other = tmp_path / "other.pt"
    other.write_bytes(cnn_weights(seed=1))
    assert weights.store(settings, other) != stored
    assert len(_files(DataLayout.of(settings).weights)) == 2


@pytest.mark.parametrize(
    ("where", "remote"),
    [
        ("http://example.com/w.pt", True),
        ("https://example.com/w.pt", True),
        ("ftp://example.com/w.pt", False),
        ("file:///srv/w.pt", False),
        ("/srv/http://w.pt", False),
        ("httpx://example.com/w.pt", False),
        ("imagenet", False),
        ("random:3", False),
        ("/data/experts/ab/ab.pt", False),
    ],
)
def test_only_http_and_https_are_remote(where: str, remote: bool) -> None:
    assert weights.remote(where) is remote


def test_a_url_is_checked_and_left_for_a_worker(tmp_path: Path) -> None:
    settings = _settings(tmp_path, allow_private_urls=True)
    url = "http://127.0.0.1:9/never-fetched-now.pt"  # the discard port: nothing answers
    assert weights.place(settings, "cnn-4x1", url) == url
    assert _files(settings.data_dir) == []  # nothing downloaded at registration


def test_an_internal_url_is_refused_without_its_credentials(tmp_path: Path) -> None:
    settings = _settings(tmp_path)  # private URLs not allowed
    url = "http://admin:hunter2@127.0.0.1:6379/w.pt"
    refused = _problem(lambda: weights.place(settings, "cnn-4x1", url))
    assert "address is not allowed" in refused.detail
    assert "hunter2" not in refused.detail
    assert "admin" not in refused.detail
    assert "127.0.0.1:6379/w.pt" in refused.detail  # it still says which URL
    schemeless = _problem(lambda: weights.place(settings, "cnn-4x1", "ftp://example.com/w"))
    assert "not an http(s) URL" in schemeless.detail


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "resnet18", "resnet34"])
@pytest.mark.parametrize("keyword", ["imagenet", "random:3"])
def test_a_probe_keyword_is_kept_as_it_is(tmp_path: Path, architecture: str, keyword: str) -> None:
    assert weights.place(_settings(tmp_path), architecture, keyword) == keyword


@pytest.mark.parametrize("keyword", ["imagenet", "random:3"])
def test_a_probe_keyword_names_nothing_for_other_architectures(
    tmp_path: Path, keyword: str
) -> None:
    refused = _problem(lambda: weights.place(_settings(tmp_path), "cnn-4x1", keyword))
    assert repr(keyword) in refused.detail
    assert "T2V_WEIGHTS_IMPORT_DIR" in refused.detail  # how else to name weights


def test_without_an_import_folder_no_path_is_read(tmp_path: Path, imports: Path) -> None:
    settings = _settings(tmp_path)  # weights_import_dir unset
    path = str(imports / "team" / "w.pt")
    refused = _problem(lambda: weights.place(settings, "cnn-4x1", path))
    assert "T2V_WEIGHTS_IMPORT_DIR" in refused.detail
    assert _files(settings.data_dir) == []


@pytest.mark.parametrize("spelling", ["{path}", "file://{path}", "{folder}/team/../team/w.pt"])
def test_a_file_under_the_import_folder_is_copied_in(
    tmp_path: Path, imports: Path, spelling: str
) -> None:
    settings = _settings(tmp_path, weights_import_dir=imports)
    uri = spelling.format(path=imports / "team" / "w.pt", folder=imports)
    placed = Path(weights.place(settings, "cnn-4x1", uri))
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert placed == DataLayout.of(settings).weights / sha[:2] / f"{sha}.pt"
    assert placed.read_bytes() == WEIGHTS
    assert (imports / "team" / "w.pt").read_bytes() == WEIGHTS  # the operator's file stays


def test_a_path_outside_the_folder_reads_the_same_whether_or_not_it_exists(
    tmp_path: Path, imports: Path
) -> None:
    settings = _settings(tmp_path, weights_import_dir=imports)
    (imports / "team" / "link.pt").symlink_to(tmp_path / "secret.pt")
    outside = {
        "existing": str(tmp_path / "secret.pt"),
        "missing": str(tmp_path / "no-such.pt"),
        "escaping": str(imports / ".." / "secret.pt"),
        "escaping-missing": str(imports / ".." / "no-such.pt"),
        "a link out": str(imports / "team" / "link.pt"),
        "file-url": f"file://{tmp_path / 'secret.pt'}",
        "a folder": str(tmp_path),
        "relative": "secret.pt",
    }
    texts = {}
    for case, uri in outside.items():
        refused = _problem(partial(weights.place, settings, "cnn-4x1", uri))
        texts[case] = refused.detail.replace(repr(uri), "URI")
    assert set(texts.values()) == {
        f"weights_uri URI: not a file under the weights import folder {str(imports)!r}"
    }, texts
    assert _files(settings.data_dir) == []  # nothing copied


def test_no_file_at_a_path_inside_the_folder(tmp_path: Path, imports: Path) -> None:
    """Inside the operator's folder, a missing file (or a folder) is said to be missing."""
    settings = _settings(tmp_path, weights_import_dir=imports)
    for uri in (str(imports / "team" / "gone.pt"), str(imports / "team")):
        refused = _problem(partial(weights.place, settings, "cnn-4x1", uri))
        assert refused.detail == f"weights_uri {uri!r}: no such file in the weights import folder"
    assert _files(settings.data_dir) == []


def test_a_file_larger_than_an_upload_may_be_is_refused(tmp_path: Path, imports: Path) -> None:
    exact = _settings(tmp_path, weights_import_dir=imports, max_upload_bytes=len(WEIGHTS))
    assert Path(weights.place(exact, "cnn-4x1", str(imports / "team" / "w.pt"))).is_file()
    small = _settings(
        tmp_path / "small", weights_import_dir=imports, max_upload_bytes=len(WEIGHTS) - 1
    )
    refused = _problem(lambda: weights.place(small, "cnn-4x1", str(imports / "team" / "w.pt")))
    assert f"larger than the limit of {len(WEIGHTS) - 1} bytes" in refused.detail
    assert _files(small.data_dir) == []


class _Files(BaseHTTPRequestHandler):
    """Answers GET with the body stored for its path, or 404."""

    bodies: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.bodies.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A web server on loopback: its base URL, and the bodies it serves by path."""

    class Handler(_Files):
        bodies: ClassVar[dict[str, bytes]] = {}

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", Handler.bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_downloads_to_a_file_of_its_own(
    tmp_path: Path, server: tuple[str, dict[str, bytes]]
) -> None:
    base, bodies = server
    bodies["/w.pt"] = WEIGHTS
    settings = _settings(tmp_path, allow_private_urls=True)
    first = weights.fetch(settings, f"{base}/w.pt")
    second = weights.fetch(settings, f"{base}/w.pt")
    assert first != second  # two downloads of the same URL never share a file
    for fetched in (first, second):
        assert fetched.parent == DataLayout.of(settings).weights
        assert fetched.name.endswith(".download")  # temporary until stored
        assert fetched.read_bytes() == WEIGHTS
    stored = weights.store(settings, first)
    assert stored.read_bytes() == WEIGHTS
    assert stored.name == hashlib.sha256(WEIGHTS).hexdigest() + ".pt"


def test_a_failed_fetch_leaves_nothing(
    tmp_path: Path, server: tuple[str, dict[str, bytes]]
) -> None:
    base, bodies = server
    bodies["/big.pt"] = b"x" * 2048
    allowed = _settings(tmp_path, allow_private_urls=True, max_upload_bytes=1024)
    folder = DataLayout.of(allowed).weights
    with pytest.raises(OutboundError, match="could not be fetched"):
        weights.fetch(allowed, f"{base}/missing.pt")
    with pytest.raises(OutboundError):
        weights.fetch(allowed, f"{base}/big.pt")  # over max_upload_bytes
    assert _files(folder) == []
    guarded = _settings(tmp_path / "guarded", max_upload_bytes=1024)  # loopback not allowed
    bodies["/small.pt"] = b"tiny"
    with pytest.raises(OutboundError, match="address is not allowed"):
        weights.fetch(guarded, f"{base}/small.pt")
    assert _files(DataLayout.of(guarded).weights) == []
    assert weights.fetch(allowed, f"{base}/small.pt").read_bytes() == b"tiny"
