"""A corpus of hostile and malformed uploads, made here: each gets its status and its stable
problem type, and leaves no row and no file behind."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.api.main import create_app
from app.db.models import Dataset, Job, Task
from app.db.session import session_scope
from app.services import queue
from app.settings import Settings
from tests.helpers import fresh_database, npz_upload, service_settings

LIMITS = {
    "max_upload_bytes": 3_000_000,
    "max_archive_members": 40,
    "max_member_bytes": 1_500_000,
    "max_uncompressed_bytes": 2_000_000,
    "max_compression_ratio": 50.0,
    "max_image_pixels": 250_000,
    "max_total_pixels": 400_000,
    "max_classes": 5,
}


def png(size: int = 8, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def good_members() -> list[tuple[str, bytes]]:
    return [(f"{c}/{i}.png", png(seed=10 * k + i)) for k, c in enumerate("ab") for i in range(3)]


def zipped(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buffer.getvalue()


def zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, member in good_members():
            z.writestr(name, member)
        z.writestr(info, data)
    return buffer.getvalue()


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("a/link.png")
    info.external_attr = (0o120777 << 16) | 0x20
    return zip_with(info, b"/etc/passwd")


def tarred(extra: Callable[[tarfile.TarFile], None] | None = None, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as t:
        for name, data in good_members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(t)
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "", data: bytes = b"") -> bytes:
    def add(t: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, linkname, len(data)
        t.addfile(info, io.BytesIO(data) if data else None)

    return tarred(add)


def npz(**arrays: object) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size), dtype=np.uint8)


def manifest(rows: str, extra: list[tuple[str, bytes]] | None = None) -> bytes:
    members = [(f"img/{i}.png", png(seed=i)) for i in range(4)]
    return zipped([*members, *(extra or []), ("labels.csv", rows.encode())])


def tar_bomb(mode: str, member: tuple[str, bytes]) -> bytes:
    """A compressed GNU tar with one extra member (a huge name, or a long run of zeros)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as t:
        for name, data in [*good_members(), member]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x.npy header declares ``shape`` but holds no data (a memory bomb)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    y = io.BytesIO()
    np.save(y, np.array([0, 1]))
    return zipped([("x.npy", header.getvalue()), ("y.npy", y.getvalue())])


GOOD_ROWS = "path,label\nimg/0.png,a\nimg/1.png,a\nimg/2.png,b\nimg/3.png,b\n"


def big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


#: (id, file name, bytes, status, problem type)
CASES: list[tuple[str, str, Callable[[], bytes], int, str]] = [
    ("empty file", "d.zip", lambda: b"", 422, "empty-file"),
    ("random bytes", "d.zip", lambda: bytes(range(256)) * 4, 422, "not-a-dataset"),
    ("text called zip", "d.zip", lambda: b"hello, world\n" * 10, 422, "not-a-dataset"),
    ("image, not archive", "d.zip", lambda: png(), 422, "not-a-dataset"),
    ("truncated zip", "d.zip", lambda: zipped(good_members())[:-30], 422, "corrupt-archive"),
    ("truncated tar.gz", "d.tgz", lambda: tarred()[:200], 422, "corrupt-archive"),
    (
        "zip ../ traversal",
        "d.zip",
        lambda: zipped([*good_members(), ("../evil/x.png", png())]),
        422,
        "unsafe-member-path",
    ),
    (
        "zip absolute path",
        "d.zip",
        lambda: zipped([*good_members(), ("/etc/x.png", png())]),
        422,
        "unsafe-member-path",
    ),
    (
        "zip drive letter",
        "d.zip",
        lambda: zipped([*good_members(), ("C:/x/y.png", png())]),
        422,
        "unsafe-member-path",
    ),
    (
        "tar ../ traversal",
        "d.tgz",
        lambda: tar_entry("a/../../x.png", tarfile.REGTYPE, data=png()),
        422,
        "unsafe-member-path",
    ),
    ("zip symlink", "d.zip", symlink_zip, 422, "unsupported-member"),
    (
        "tar symlink",
        "d.tgz",
        lambda: tar_entry("a/l.png", tarfile.SYMTYPE, "/etc/passwd"),
        422,
        "unsupported-member",
    ),
    (
        "tar hard link",
        "d.tgz",
        lambda: tar_entry("a/h.png", tarfile.LNKTYPE, "a/0.png"),
        422,
        "unsupported-member",
    ),
    (
        "tar device",
        "d.tgz",
        lambda: tar_entry("a/dev.png", tarfile.CHRTYPE),
        422,
        "unsupported-member",
    ),
    (
        "tar fifo",
        "d.tgz",
        lambda: tar_entry("a/f.png", tarfile.FIFOTYPE),
        422,
        "unsupported-member",
    ),
    (
        "control character name",
        "d.zip",
        lambda: zipped([*good_members(), ("a/\x07bell.png", png())]),
        422,
        "bad-member-name",
    ),
    (
        "non-UTF-8 tar name",
        "d.tgz",
        lambda: tar_entry("a/\udcff\udcfe.png", tarfile.REGTYPE, data=png()),
        422,
        "bad-member-name",
    ),
    (
        "duplicate member",
        "d.zip",
        lambda: zipped([*good_members(), ("a/0.png", png(seed=99))]),
        422,
        "duplicate-member",
    ),
    (
        "too many members",
        "d.zip",
        lambda: zipped([(f"{c}/{i}.png", png()) for c in "ab" for i in range(25)]),
        422,
        "too-many-members",
    ),
    (
        "member over the size limit",
        "d.zip",
        lambda: zipped([*good_members(), ("a/big.png", bytes(1_600_000))]),
        422,
        "member-too-large",
    ),
    (
        "zip bomb",
        "d.zip",
        lambda: zipped([*good_members(), ("a/bomb.png", bytes(1_000_000))], zipfile.ZIP_DEFLATED),
        422,
        "compression-bomb",
    ),
    (
        "too much uncompressed",
        "d.zip",
        lambda: zipped([*good_members(), *((f"b/r{i}.png", png(350, i)) for i in range(18))]),
        422,
        "too-large-uncompressed",
    ),
    (
        "pixel bomb",
        "d.zip",
        lambda: zipped([*good_members(), ("a/huge.png", big_png(1000))]),
        422,
        "image-too-large",
    ),
    (
        "mostly undecodable",
        "d.zip",
        lambda: zipped([*good_members(), *((f"b/x{i}.png", b"not a png") for i in range(3))]),
        422,
        "undecodable-images",
    ),
    (
        "tar.bz2 with a huge member name",
        "d.tbz",
        lambda: tar_bomb("w:bz2", ("a/" + "x" * 3_000_000 + ".png", png())),
        422,
        "member-too-large",
    ),
    (
        "tar.gz bomb",
        "d.tgz",
        lambda: tar_bomb("w:gz", ("a/zeros.png", bytes(5_000_000))),
        422,
        "compression-bomb",
    ),
    (
        "tar.xz bomb",
        "d.txz",
        lambda: tar_bomb("w:xz", ("a/zeros.png", bytes(5_000_000))),
        422,
        "compression-bomb",
    ),
    ("empty zip", "d.zip", lambda: zipped([]), 422, "bad-layout"),
    (
        "no images",
        "d.zip",
        lambda: zipped([("a/readme.txt", b"x"), ("b/notes.md", b"y")]),
        422,
        "bad-layout",
    ),
    (
        "images outside class folders",
        "d.zip",
        lambda: zipped([("0.png", png()), ("1.png", png(seed=1))]),
        422,
        "bad-layout",
    ),
    (
        "manifest names a missing file",
        "d.zip",
        lambda: manifest(GOOD_ROWS + "img/9.png,b\n"),
        422,
        "bad-manifest",
    ),
    (
        "manifest lists one image twice, spelt two ways",
        "d.zip",
        lambda: manifest(GOOD_ROWS + "./img/0.png,b\n"),
        422,
        "bad-manifest",
    ),
    (
        "images adding up past the pixel budget",
        "d.zip",
        lambda: zipped([(f"{c}/{i}.png", png(size=300, seed=i)) for c in "ab" for i in range(3)]),
        422,
        "too-many-pixels",
    ),
    (
        "bytes before the first zip entry",
        "d.zip",
        lambda: b"MZ\x90\x00 a stub in front" + zipped(good_members()),
        422,
        "corrupt-archive",
    ),
    (
        "an npz with bytes in front",
        "d.npz",
        lambda: b"#!/bin/sh\n" * 8 + npz(x=images(4), y=np.array([0, 0, 1, 1])),
        422,
        "corrupt-archive",
    ),
    (
        "manifest with extra columns",
        "d.zip",
        lambda: manifest(GOOD_ROWS.replace("img/3.png,b", "img/3.png,b,extra")),
        422,
        "bad-manifest",
    ),
    (
        "manifest formula cell",
        "d.zip",
        lambda: manifest(GOOD_ROWS.replace("img/3.png,b", 'img/3.png,"=HYPERLINK(""x"")"')),
        422,
        "bad-manifest",
    ),
    (
        "manifest wrong header",
        "d.zip",
        lambda: manifest(GOOD_ROWS.replace("path,label", "file,class")),
        422,
        "bad-manifest",
    ),
    (
        "manifest not UTF-8",
        "d.zip",
        lambda: zipped([("img/0.png", png()), ("labels.csv", b"path,label\nimg/0.png,\xff\xfe\n")]),
        422,
        "bad-manifest",
    ),
    ("npz without y", "d.npz", lambda: npz(x=images(4)), 422, "invalid-npz"),
    (
        "npz float images",
        "d.npz",
        lambda: npz(x=images(4).astype(np.float32), y=np.array([0, 0, 1, 1])),
        422,
        "invalid-npz",
    ),
    (
        "npz object array",
        "d.npz",
        lambda: npz(x=np.array([images(2), None], dtype=object), y=np.array([0, 1])),
        422,
        "invalid-npz",
    ),
    (
        "npz NaN labels",
        "d.npz",
        lambda: npz(x=images(4), y=np.array([0.0, np.nan, 1.0, 1.0])),
        422,
        "invalid-npz",
    ),
    (
        "npz four channels",
        "d.npz",
        lambda: npz(x=np.zeros((4, 8, 8, 4), np.uint8), y=np.array([0, 0, 1, 1])),
        422,
        "invalid-npz",
    ),
    (
        "npz label count",
        "d.npz",
        lambda: npz(x=images(4), y=np.array([0, 1, 1])),
        422,
        "invalid-npz",
    ),
    (
        "npz garbage called npz",
        "d.npz",
        lambda: b"PK\x03\x04" + bytes(100),
        422,
        "corrupt-archive",
    ),
    (
        "npz header declaring a terabyte",
        "d.npz",
        lambda: npz_declaring((2**20, 2**10, 2**10)),
        422,
        "invalid-npz",
    ),
    (
        "npz structured labels",
        "d.npz",
        lambda: npz(x=images(4), y=np.zeros(4, dtype=[("a", "i4"), ("b", "f4")])),
        422,
        "invalid-npz",
    ),
    ("one class", "d.npz", lambda: npz(x=images(4), y=np.zeros(4, int)), 422, "too-few-classes"),
    (
        "too many classes",
        "d.npz",
        lambda: npz(x=images(12), y=np.repeat(np.arange(6), 2)),
        422,
        "too-many-classes",
    ),
    (
        "a class with one image",
        "d.npz",
        lambda: npz(x=images(5), y=np.array([0, 0, 1, 1, 2])),
        422,
        "too-few-images-per-class",
    ),
    (
        "unprintable label",
        "d.npz",
        lambda: npz(x=images(4), y=np.array(["a", "a", "\x1b[31mred", "\x1b[31mred"])),
        422,
        "bad-label",
    ),
    (
        "formula as a class folder",
        "d.zip",
        lambda: zipped([(f"=cmd|x!A{i % 2}/{i}.png", png(seed=i)) for i in range(4)]),
        422,
        "bad-label",
    ),
    (
        "manifest lists a file twice",
        "d.zip",
        lambda: manifest(GOOD_ROWS + "img/0.png,b\n"),
        422,
        "bad-manifest",
    ),
    ("over the upload limit", "d.npz", lambda: bytes(3_000_001), 413, "upload-too-large"),
]


@pytest.fixture(scope="module")
def hardened(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tmp = tmp_path_factory.mktemp("hostile")
    with fresh_database("sqlite", tmp) as url:
        yield service_settings(tiny_zoo, url, tmp).model_copy(update=LIMITS)


@pytest.fixture(scope="module")
def client(hardened: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hardened)) as c:
        yield c


def _stored(settings: Settings) -> tuple[int, int, int, list[Path]]:
    with session_scope(settings.resolved_database_url()) as session:
        counts = [
            session.scalar(select(func.count()).select_from(m)) or 0 for m in (Dataset, Task, Job)
        ]
    files = [p for p in (settings.data_dir / "uploads").rglob("*") if p.is_file()]
    return counts[0], counts[1], counts[2], files


def test_the_corpus_is_large_and_every_type_is_named_in_the_readme() -> None:
    assert len(CASES) >= 30
    readme = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for kind in {c[4] for c in CASES}:
        assert f"`{kind}`" in readme, f"problem type {kind} is not listed in docs/api.md"


@pytest.mark.parametrize(
    ("filename", "make", "status", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_upload_is_refused_by_name_and_nothing_is_stored(
    client: TestClient,
    hardened: Settings,
    monkeypatch: pytest.MonkeyPatch,
    filename: str,
    make: Callable[[], bytes],
    status: int,
    kind: str,
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: sent.append(job_id))
    before = _stored(hardened)
    response = client.post("/v1/tasks", files={"file": (filename, make())})
    assert sent == []
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"https://task2vec.dev/problems/{kind}", body
    assert body["detail"]
    assert _stored(hardened) == before


def test_harmless_extras_are_skipped_and_reported(
    client: TestClient, hardened: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    members = [
        *good_members(),
        *((f"b/more{i}.png", png(seed=40 + i)) for i in range(10)),
        ("a/README.txt", b"notes"),
        ("b/nested.zip", zipped(good_members())),
        ("b/broken.png", b"not a png"),
        ("__MACOSX/a/._0.png", b"resource fork"),
    ]
    response = client.post("/v1/tasks", files={"file": ("mixed.bin", zipped(members))})
    assert response.status_code == 202, response.text
    skipped = {s["member"]: s["reason"] for s in response.json()["skipped"]}
    assert skipped["a/README.txt"] == "not an image file"
    assert skipped["b/nested.zip"] == "an archive inside the archive (not opened)"
    assert skipped["b/broken.png"].startswith("cannot be decoded")
    assert len(skipped) == 3  # the resource fork is ignored silently
    task = client.get(f"/v1/tasks/{response.json()['task_id']}").json()
    assert task["dataset"]["skipped"] == response.json()["skipped"]
    assert task["dataset"]["num_images"] == 16


def test_an_npz_is_recognised_by_its_content_not_its_name(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    response = client.post("/v1/tasks", files={"file": ("upload.zip", npz_upload())})
    assert response.status_code == 202, response.text


def test_a_body_must_say_its_length_and_a_huge_one_is_refused_at_once(
    client: TestClient, hardened: Settings
) -> None:
    before = _stored(hardened)
    request = client.build_request("POST", "/v1/tasks", content=b"x")
    del request.headers["content-length"]
    unsized = client.send(request)
    assert unsized.status_code == 411
    assert unsized.json()["type"].endswith("/length-required")
    request = client.build_request("POST", "/v1/tasks", content=b"x")
    request.headers["content-length"] = str(10**12)
    huge = client.send(request)
    assert huge.status_code == 413
    assert str(hardened.max_upload_bytes) in huge.json()["detail"]
    assert _stored(hardened) == before


def test_a_chunked_body_past_the_limit_is_cut_off(client: TestClient, hardened: Settings) -> None:
    before = _stored(hardened)

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.npz"\r\n\r\n'
        for _ in range(6):
            yield bytes(1024 * 1024)

    response = client.post(
        "/v1/tasks", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413, response.text
    assert response.json()["type"].endswith("/upload-too-large")
    assert _stored(hardened) == before


def test_an_npz_appended_to_a_tar_is_read_as_the_tar(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file, one format: the tar it starts as, never the zip found from its end."""
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    both = tarred(mode="w") + npz(x=images(9), y=np.array([0, 1, 2] * 3))
    assert zipfile.is_zipfile(io.BytesIO(both))
    response = client.post("/v1/tasks", files={"file": ("both.tar", both)})
    assert response.status_code == 202, response.text
    task = client.get(f"/v1/tasks/{response.json()['task_id']}").json()
    assert task["dataset"]["classes"] == ["a", "b"]
    assert task["dataset"]["num_images"] == 6


def test_class_names_are_one_however_they_are_composed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    labels = np.array([nfc, nfd, nfc, "tea", "tea", "tea"])
    response = client.post("/v1/tasks", files={"file": ("drinks.npz", npz(x=images(6), y=labels))})
    assert response.status_code == 202, response.text
    task = client.get(f"/v1/tasks/{response.json()['task_id']}").json()
    assert task["dataset"]["classes"] == [nfc, "tea"]
    assert task["dataset"]["class_counts"] == [3, 3]


def test_file_names_are_stored_safely(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue, "dispatch", lambda job_id, kind, broker: None)
    for sent, kept in (
        ("..\\..\\<i>x y<i>.zip", "ix yi.zip"),
        ("a" * 300 + ".zip", "a" * 251 + ".zip"),
    ):
        members = [*good_members(), (f"a/{len(sent)}.png", png(seed=len(sent)))]
        response = client.post("/v1/tasks", files={"file": (sent, zipped(members))})
        assert response.status_code == 202, response.text
        task = client.get(f"/v1/tasks/{response.json()['task_id']}").json()
        assert task["dataset"]["filename"] == kept
