"""Content-addressed files (``app.services.storage``), on a real directory: an upload is
hashed and counted as it streams; past its limit it is refused and leaves nothing behind; it
stays under its request's own hidden name until ``keep`` moves it to ``<sha[:2]>/<sha256>``;
``discard`` removes only the request's own file, never a content-addressed one (another
request, another tenant, may hold the same bytes there); ``store_file`` copies by content
once. The upload routes and the orphan sweep rely on exactly these rules."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from app.services.storage import (
    UPLOAD_SUFFIX,
    WEIGHTS_SUFFIX,
    StoredFile,
    UploadTooLargeError,
    content_path,
    store_file,
    store_stream,
)

CHUNKS = [b"labelled ", b"", b"images\x00\xff" * 1000, b"!"]
DATA = b"".join(CHUNKS)


async def _stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _store(root: Path, chunks: Iterable[bytes], limit: int = 1 << 20, **kw: str) -> StoredFile:
    return asyncio.run(store_stream(_stream(chunks), root, limit, **kw))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_a_stream_is_hashed_and_counted_under_a_name_of_its_own(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    stored = _store(root, CHUNKS)
    sha = hashlib.sha256(DATA).hexdigest()
    assert (stored.sha256, stored.bytes) == (sha, len(DATA))
    assert stored.final == root / sha[:2] / f"{sha}{UPLOAD_SUFFIX}"
    assert stored.path.parent == root
    assert stored.path.name.startswith(".")  # hidden: pruned as temporary if left
    assert stored.path.read_bytes() == DATA
    assert not stored.final.exists()  # not under its content name until kept
    assert _files(root) == [stored.path]


def test_the_suffix_names_the_kind_of_file(tmp_path: Path) -> None:
    stored = _store(tmp_path, [b"weights"], suffix=WEIGHTS_SUFFIX)
    assert stored.final.name == hashlib.sha256(b"weights").hexdigest() + ".pt"


def test_an_empty_stream_is_stored_too(tmp_path: Path) -> None:
    stored = _store(tmp_path, [])
    assert (stored.sha256, stored.bytes) == (hashlib.sha256(b"").hexdigest(), 0)
    assert stored.path.read_bytes() == b""


def test_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    stored = _store(tmp_path, CHUNKS, limit=len(DATA))
    assert stored.bytes == len(DATA)


@pytest.mark.parametrize("limit", [0, 5, len(DATA) - 1])
def test_past_the_limit_the_upload_is_refused_and_leaves_no_file(
    tmp_path: Path, limit: int
) -> None:
    root = tmp_path / "uploads"
    with pytest.raises(UploadTooLargeError) as refused:
        _store(root, CHUNKS, limit=limit)
    assert refused.value.limit == limit
    assert str(limit) in str(refused.value)
    assert _files(root) == []


def test_a_stream_cut_off_midway_leaves_no_file(tmp_path: Path) -> None:
    """A client that disconnects mid-upload: the request's error goes up, its file goes."""

    async def cut_off() -> AsyncIterator[bytes]:
        yield b"half an upload"
        raise ConnectionResetError("client gone")

    root = tmp_path / "uploads"
    with pytest.raises(ConnectionResetError):
        asyncio.run(store_stream(cut_off(), root, 1 << 20))
    assert _files(root) == []


def test_keep_moves_the_file_to_its_content_name(tmp_path: Path) -> None:
    stored = _store(tmp_path, CHUNKS)
    kept = stored.keep()
    assert kept.path == kept.final == stored.final
    assert (kept.sha256, kept.bytes) == (stored.sha256, stored.bytes)
    assert not stored.path.exists()
    assert kept.final.read_bytes() == DATA
    assert kept.keep() == kept  # kept already: nothing moves
    assert _files(tmp_path) == [kept.final]


def test_discard_removes_the_requests_own_file_only(tmp_path: Path) -> None:
    refused = _store(tmp_path, CHUNKS)
    refused.discard()
    assert _files(tmp_path) == []
    refused.discard()  # gone already: no error

    first = _store(tmp_path, CHUNKS).keep()  # one request keeps the bytes
    second = _store(tmp_path, CHUNKS)  # another sends the same bytes and is refused
    assert second.final == first.final
    assert second.path != first.final
    second.discard()
    first.discard()  # kept: its file has left the request's name
    assert _files(tmp_path) == [first.final]
    assert first.final.read_bytes() == DATA


def test_discard_after_keep_leaves_the_kept_file(tmp_path: Path) -> None:
    """The upload routes call ``discard`` on the object they stored, whether or not the row
    naming it went on to ``keep`` it."""
    stored = _store(tmp_path, CHUNKS)
    stored.keep()
    stored.discard()
    assert _files(tmp_path) == [stored.final]


def test_two_requests_with_the_same_bytes_keep_one_file(tmp_path: Path) -> None:
    first, second = _store(tmp_path, CHUNKS), _store(tmp_path, [DATA])
    assert first.path != second.path  # each streams under its own name
    assert first.final == second.final
    first.keep()
    second.keep()
    assert _files(tmp_path) == [first.final]
    assert first.final.read_bytes() == DATA


def test_content_path_layout(tmp_path: Path) -> None:
    sha = "c0ffee" + "1" * 58
    assert content_path(tmp_path, sha, ".x") == tmp_path / "c0" / f"{sha}.x"


def test_store_file_copies_by_content_once(tmp_path: Path) -> None:
    source = tmp_path / "incoming" / "model.pt"
    source.parent.mkdir()
    source.write_bytes(DATA)
    root = tmp_path / "experts"
    target = store_file(source, root, WEIGHTS_SUFFIX)
    sha = hashlib.sha256(DATA).hexdigest()
    assert target == root / sha[:2] / f"{sha}.pt"
    assert target.read_bytes() == DATA
    assert source.read_bytes() == DATA  # copied, not moved
    written = target.stat()

    again = tmp_path / "elsewhere.bin"
    again.write_bytes(DATA)
    assert store_file(again, root, WEIGHTS_SUFFIX) == target  # same bytes: same file
    assert target.stat().st_ino == written.st_ino  # not written again
    other = tmp_path / "other.bin"
    other.write_bytes(b"other bytes")
    assert store_file(other, root, WEIGHTS_SUFFIX) != target
    assert len(_files(root)) == 2  # no temporary file left behind
