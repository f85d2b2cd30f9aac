"""Dataset decoding: every accepted layout, and every way an upload can be wrong."""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.task2vec.datasets import load_dataset, to_probe_input
from app.task2vec.errors import DatasetError
from app.task2vec.images import decode_image
from app.task2vec.limits import ArchiveLimits
from tests.helpers import png_bytes, random_images, write_tar, write_zip


def _folder_members(prefix: str = "") -> list[tuple[str, bytes]]:
    images = random_images(6, size=10, seed=1)
    return [
        (f"{prefix}{label}/{i}.png", png_bytes(images[i]))
        for i, label in enumerate(["cat", "cat", "dog", "dog", "emu", "emu"])
    ]


@pytest.mark.parametrize("writer", [write_zip, write_tar])
@pytest.mark.parametrize("prefix", ["", "mydata/"])
def test_class_folders(tmp_path: Path, writer, prefix: str) -> None:  # type: ignore[no-untyped-def]
    path = writer(
        tmp_path / ("d.zip" if writer is write_zip else "d.tar.gz"), _folder_members(prefix)
    )
    data = load_dataset(path)
    assert data.classes == ("cat", "dog", "emu")
    assert data.images.shape == (6, 10, 10, 1)
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_manifest_with_paths_relative_to_it(tmp_path: Path) -> None:
    images = random_images(5, size=8, seed=2, channels=3)
    members = [(f"set/img/{i}.png", png_bytes(images[i])) for i in range(5)]
    rows = b"path,label\nimg/0.png,a\nimg/1.png,b\nimg/2.png,a\nimg/3.png,b\n"
    members.append(("set/labels.csv", rows))
    data = load_dataset(write_zip(tmp_path / "m.zip", members))
    assert len(data) == 4  # img/4.png is not listed: not part of the task, and reported
    assert data.images.shape == (4, 8, 8, 3)
    assert data.classes == ("a", "b")
    assert data.skipped == (("set/img/4.png", "not listed in labels.csv"),)
    np.testing.assert_array_equal(data.images[0], images[0])


def test_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=random_images(6, size=9), y=np.array([1, 1, 2, 2, 7, 7]))
    data = load_dataset(tmp_path / "d.npz")
    assert data.images.shape == (6, 9, 9, 1)
    assert data.classes == ("1", "2", "7")


def test_mixed_sizes_and_modes_are_unified(tmp_path: Path) -> None:
    grey = png_bytes(random_images(1, size=20)[0])
    rgb = png_bytes(random_images(1, size=30, channels=3)[0])
    big = png_bytes(random_images(1, size=300, channels=3)[0])
    members = [("a/1.png", grey), ("a/4.png", grey), ("b/2.png", rgb), ("b/3.png", big)]
    data = load_dataset(write_zip(tmp_path / "d.zip", members), image_size=32)
    assert data.images.shape == (4, 32, 32, 3)


def test_probe_input_is_three_channels_at_the_probe_size() -> None:
    batch = to_probe_input(random_images(2, size=28)[..., None], 64)
    assert batch.shape == (2, 3, 64, 64)
    assert torch.equal(batch[:, 0], batch[:, 1])
    assert float(batch.min()) >= 0.0
    assert float(batch.max()) <= 1.0


def _zip(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    return write_zip(tmp_path / "bad.zip", members)


def _tar_with_symlink(tmp_path: Path) -> Path:
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("a/evil.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    return path


def _bomb(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/1.png", b"\0" * 5_000_000)
        zf.writestr("b/1.png", b"\0" * 10)
    return path


PNG = png_bytes(random_images(1, size=8)[0])


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _zip(p, []), "empty"),
        (lambda p: _zip(p, [("a/1.png", PNG), ("a/2.png", PNG)]), "at least 2 classes"),
        (lambda p: _zip(p, [("a/1.png", PNG), ("b/2.png", b"not an image")]), "b/2.png"),
        (
            lambda p: _zip(p, [("x.png", PNG), ("labels.csv", b"path,label\nx.png,a\ny.png,b\n")]),
            "'y.png'",
        ),
        (lambda p: _zip(p, [("../evil/1.png", PNG), ("b/2.png", PNG)]), "unsafe path"),
        (lambda p: _zip(p, [("/abs/1.png", PNG), ("b/2.png", PNG)]), "unsafe path"),
        (lambda p: _zip(p, [("1.png", PNG), ("b/2.png", PNG)]), "not inside a class folder"),
        (lambda p: _zip(p, [("labels.csv", b"file,class\n")]), "header"),
        (lambda p: _zip(p, [("readme.txt", b"hello")]), "no image files"),
        (_tar_with_symlink, "link"),
        (_bomb, "compression-ratio"),
        (lambda p: _file(p, "junk.zip", b"PK\x03\x04garbage"), "damaged or truncated"),
        (lambda p: _file(p, "junk.zip", b"plain text"), "not a zip or tar"),
        (lambda p: _file(p, "empty.npz", b""), "empty"),
        (lambda p: _file(p, "bad.npz", b"garbage"), "not a zip or tar archive, nor an .npz"),
        (lambda p: p / "missing.zip", "does not exist"),
    ],
)
def test_bad_archives_are_refused_by_name(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError, match=message):
        load_dataset(make(tmp_path))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": random_images(3)}, "missing y"),
        ({"x": random_images(3).astype(np.float32), "y": np.arange(3)}, "uint8"),
        ({"x": random_images(3), "y": np.arange(4)}, "one label per image"),
        ({"x": random_images(3), "y": np.zeros(3, int)}, "at least 2 classes"),
        ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, int)}, "no images"),
        ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.arange(2)}, "shape"),
    ],
)
def test_bad_npz_is_refused_by_name(tmp_path: Path, arrays: dict, message: str) -> None:  # type: ignore[type-arg]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path / "d.npz")


def test_limits_cap_members_and_sizes(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "d.zip", _folder_members())
    with pytest.raises(DatasetError, match="more than the limit"):
        load_dataset(path, limits=ArchiveLimits(max_members=3))
    with pytest.raises(DatasetError, match="over the limit"):
        load_dataset(path, limits=ArchiveLimits(max_total_bytes=200))


def test_decompression_bomb_images_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")  # 9 MP, compresses to a few KB
    path = write_zip(tmp_path / "d.zip", [("a/1.png", buffer.getvalue()), ("b/2.png", PNG)])
    with pytest.raises(DatasetError, match="over the limit of"):
        load_dataset(
            path, limits=ArchiveLimits(max_image_pixels=1_000_000, max_compression_ratio=1e6)
        )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_cheap_to_send_and_dear_to_decode_is_refused_before_decoding() -> None:
    """24 KB of PNG that decodes to 25 Mpx (the per-image cap, 16 Mpx by default, says no
    from the header); 4 Mpx of one grey in a few KB (over 250 times its size decoded)."""
    huge = _png(Image.new("L", (5000, 5000)))
    with pytest.raises(DatasetError, match="over the limit of") as refused:
        decode_image("huge.png", huge, ArchiveLimits())
    assert refused.value.kind == "image-too-large"
    flat = _png(Image.new("L", (2000, 2000), 128))
    with pytest.raises(DatasetError, match="times its size") as refused:
        decode_image("flat.png", flat, ArchiveLimits())
    assert refused.value.kind == "compression-bomb"
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1000), dtype=np.uint8)
    assert decode_image("photo.png", _png(Image.fromarray(noise)), ArchiveLimits()).shape == (
        1100,
        1000,
        1,
    )


def test_the_pixels_of_an_upload_are_capped_in_all(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    image = _png(Image.fromarray(noise))
    members = [(f"{c}/{i}.png", image) for c in "ab" for i in range(3)]
    path = write_zip(tmp_path / "d.zip", members)
    limits = ArchiveLimits(max_total_pixels=5 * 300 * 300, max_compression_ratio=1e6)
    with pytest.raises(DatasetError, match="add up to more than") as refused:
        load_dataset(path, limits=limits)
    assert refused.value.kind == "too-many-pixels"
    assert len(load_dataset(path, limits=replace(limits, max_total_pixels=6 * 300 * 300))) == 6
