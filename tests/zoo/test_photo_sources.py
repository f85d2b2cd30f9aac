"""Image sources built from data inside installed packages (app/data/photos.py)."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest

from app.data import photos
from app.data.photos import Arrays
from app.task2vec.errors import DatasetError


@pytest.fixture(scope="module")
def photo_arrays() -> Arrays:
    return photos.photo_patches()


@pytest.fixture(scope="module")
def texture_arrays() -> Arrays:
    return photos.texture_patches()


@pytest.fixture(scope="module")
def shape_arrays() -> Arrays:
    return photos.shapes()


@pytest.mark.parametrize(
    ("height", "width", "size"), [(512, 512, 32), (303, 384, 32), (31, 100, 32), (100, 70, 7)]
)
def test_tile_boxes_are_disjoint_grid_cells_inside_the_image(
    height: int, width: int, size: int
) -> None:
    boxes = photos.tile_boxes(height, width, size)
    assert len(boxes) == (height // size) * (width // size)
    assert boxes == sorted(boxes)
    cover = np.zeros((height, width), dtype=np.int64)
    for row, col in boxes:
        assert 0 <= row <= height - size
        assert 0 <= col <= width - size
        cover[row : row + size, col : col + size] += 1
    assert cover.max(initial=0) <= 1
    assert cover.sum() == len(boxes) * size * size


def test_tile_boxes_rejects_non_positive_size() -> None:
    with pytest.raises(DatasetError):
        photos.tile_boxes(64, 64, 0)


def test_cut_tiles_copies_grid_cells_and_drops_blank_ones() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(70, 100, 3), dtype=np.uint8)
    image[:32, 32:64] = 7  # one uniform grid cell
    tiles, boxes = photos.cut_tiles(image)
    assert boxes == [(0, 0), (0, 64), (32, 0), (32, 32), (32, 64)]
    assert tiles.shape == (5, 32, 32, 3)
    for tile, (row, col) in zip(tiles, boxes, strict=True):
        np.testing.assert_array_equal(tile, image[row : row + 32, col : col + 32])


def _assert_tiles_cut_without_overlap(arrays: Arrays) -> None:
    images, labels, classes = arrays
    for index, name in enumerate(classes):
        source = photos.source_image(name)
        assert max(source.shape[:2]) <= photos.MAX_SIDE
        tiles, boxes = photos.cut_tiles(source)
        np.testing.assert_array_equal(images[labels == index], tiles)
        cover = np.zeros(source.shape[:2], dtype=np.int64)
        for tile, (row, col) in zip(tiles, boxes, strict=True):
            np.testing.assert_array_equal(tile, source[row : row + 32, col : col + 32])
            cover[row : row + 32, col : col + 32] += 1
        assert cover.max() == 1


def _assert_well_formed(arrays: Arrays, pixel_shape: tuple[int, ...]) -> None:
    images, labels, classes = arrays
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert images.shape == (len(labels), *pixel_shape)
    assert len(set(classes)) == len(classes)
    assert np.all(np.diff(labels) >= 0)  # ordered by class
    counts = np.bincount(labels, minlength=len(classes))
    assert counts.min() >= 100, dict(zip(classes, counts.tolist(), strict=True))


def test_photo_patches(photo_arrays: Arrays) -> None:
    _assert_well_formed(photo_arrays, (32, 32, 3))
    assert photo_arrays[2] == photos.PHOTO_CLASSES
    assert len(photo_arrays[2]) >= 10
    stds = photo_arrays[0].reshape(len(photo_arrays[0]), -1).std(axis=1)
    assert stds.min() >= photos.MIN_TILE_STD
    _assert_tiles_cut_without_overlap(photo_arrays)


def test_texture_patches(texture_arrays: Arrays) -> None:
    _assert_well_formed(texture_arrays, (32, 32))
    assert texture_arrays[2] == photos.TEXTURE_CLASSES
    _assert_tiles_cut_without_overlap(texture_arrays)


def test_patch_sources_are_deterministic(photo_arrays: Arrays, texture_arrays: Arrays) -> None:
    for before, after in (
        (photo_arrays, photos.photo_patches()),
        (texture_arrays, photos.texture_patches()),
    ):
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert before[2] == after[2]


def test_sources_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in (*photos.PHOTO_CLASSES, *photos.TEXTURE_CLASSES):
        assert photos.source_image(name).dtype == np.uint8


def test_source_image_rejects_unknown_name() -> None:
    with pytest.raises(DatasetError):
        photos.source_image("lena")


def test_shapes_are_balanced_and_labelled(shape_arrays: Arrays) -> None:
    images, labels, classes = shape_arrays
    assert classes == ("circle", "rectangle", "triangle", "ellipse")
    assert images.shape == (4000, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 1000))
    # Backgrounds are random colours, not scikit-image's plain white.
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(np.int64)
    assert (corners.min(axis=-1) > 240).mean() < 0.05
    # Every image shows something besides its background.
    assert images.reshape(4000, -1).std(axis=1).min() > 5


def test_shapes_are_functions_of_kind_and_index(shape_arrays: Arrays) -> None:
    images, labels, classes = shape_arrays
    for index, kind in enumerate(classes):
        own = images[labels == index]
        for j in (0, 1, 499, 999):
            np.testing.assert_array_equal(photos.shape_image(kind, j), own[j])
    small_images, small_labels, _ = photos.shapes(40)
    expected = np.concatenate([images[labels == k][:10] for k in range(4)])
    np.testing.assert_array_equal(small_images, expected)
    np.testing.assert_array_equal(small_labels, np.repeat(np.arange(4), 10))


@pytest.mark.parametrize("count", [0, -4, 10])
def test_shapes_rejects_unbalanced_counts(count: int) -> None:
    with pytest.raises(DatasetError):
        photos.shapes(count)


def test_shape_image_rejects_unknown_kind() -> None:
    with pytest.raises(DatasetError):
        photos.shape_image("hexagon", 0)
