"""Labelled image sets built only from data inside installed packages, no download at run time.

* ``photo_patches``: colour 32x32 tiles cut from the sample photographs that ship inside the
  scikit-image wheel (``skimage/data``) and scikit-learn (``load_sample_images``); the class is
  the photograph.
* ``texture_patches``: grey 32x32 tiles cut the same way from scikit-image's grey images.
* ``shapes``: synthetic 32x32 colour images of one shape each (``skimage.draw.random_shapes``).

Tiles come from a non-overlapping grid (``tile_boxes``), so every pixel of a photograph is in at
most one tile and any split of the tiles into disjoint sets splits the pixels too; overlapping
crops would leak near-copies of training images into a test split. Photographs longer than
``MAX_SIDE`` pixels are first shrunk (anti-aliased) so the scale of detail is comparable across
classes, and almost uniform tiles (pixel std below ``MIN_TILE_STD``) are dropped so no class is
padded with blank background. Photographs that give fewer than about 100 tiles are left out
(scikit-image's ``page``, ``text``, ``clock``, ``colorwheel``, ``microaneurysms``).

Each loader returns ``(images uint8 (N,H,W) or (N,H,W,3), labels int64 (N,), class names)``,
ordered by class, then by tile row and column (or shape index), and is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from app.task2vec.errors import DatasetError

Arrays = tuple[np.ndarray, np.ndarray, tuple[str, ...]]

TILE = 32
MAX_SIDE = 512
MIN_TILE_STD = 2.0

PHOTO_CLASSES = (
    "astronaut",
    "chelsea",
    "china",
    "coffee",
    "flower",
    "hubble",
    "ihc",
    "motorcycle",
    "retina",
    "rocket",
)
TEXTURE_CLASSES = ("brick", "camera", "cell", "coins", "grass", "gravel", "moon")
SHAPE_CLASSES = ("circle", "rectangle", "triangle", "ellipse")

_SHAPES_SEED = 20240611


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image: np.ndarray = getattr(data, name)()
        return image

    return load


def _motorcycle() -> np.ndarray:
    from skimage import data

    left: np.ndarray = data.stereo_motorcycle()[0]  # type: ignore[no-untyped-call]
    return left


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        image: np.ndarray = load_sample_image(filename)
        return image

    return load


# Every loader here reads a file bundled in the wheel; none goes through scikit-image's fetcher.
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "china": _sklearn("china.jpg"),
    "coffee": _skimage("coffee"),
    "flower": _sklearn("flower.jpg"),
    "hubble": _skimage("hubble_deep_field"),
    "ihc": _skimage("immunohistochemistry"),
    "motorcycle": _motorcycle,
    "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
    "brick": _skimage("brick"),
    "camera": _skimage("camera"),
    "cell": _skimage("cell"),
    "coins": _skimage("coins"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "moon": _skimage("moon"),
}


def tile_boxes(height: int, width: int, size: int = TILE) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of the non-overlapping ``size`` x ``size`` grid cells
    that fit inside a ``height`` x ``width`` image, in row-major order (the ragged right and
    bottom margins are left out)."""
    if size <= 0:
        raise DatasetError(f"tile size must be positive, got {size}")
    return [
        (row, col)
        for row in range(0, height - size + 1, size)
        for col in range(0, width - size + 1, size)
    ]


def source_image(name: str) -> np.ndarray:
    """The photograph the tiles of class ``name`` are cut from: uint8 (H,W) or (H,W,3), shrunk
    with Lanczos resampling so its long side is at most ``MAX_SIDE``."""
    from PIL import Image

    loader = _LOADERS.get(name)
    if loader is None:
        raise DatasetError(f"unknown photograph {name!r}; known: {', '.join(_LOADERS)}")
    image = np.ascontiguousarray(loader(), dtype=np.uint8)
    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:
        scale = MAX_SIDE / max(height, width)
        size = (round(width * scale), round(height * scale))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    return image


def cut_tiles(
    image: np.ndarray, size: int = TILE, min_std: float = MIN_TILE_STD
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The grid tiles of ``image`` (``tile_boxes`` order) whose pixel std is at least
    ``min_std``, and their top-left corners."""
    boxes = tile_boxes(image.shape[0], image.shape[1], size)
    if not boxes:
        return np.empty((0, size, size, *image.shape[2:]), dtype=image.dtype), []
    tiles = np.stack([image[r : r + size, c : c + size] for r, c in boxes])
    keep = tiles.reshape(len(tiles), -1).std(axis=1) >= min_std
    return tiles[keep], [box for box, kept in zip(boxes, keep, strict=True) if kept]


def _patches(classes: tuple[str, ...]) -> Arrays:
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for index, name in enumerate(classes):
        tiles, _ = cut_tiles(source_image(name))
        images.append(tiles)
        labels.append(np.full(len(tiles), index, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels), classes


def photo_patches() -> Arrays:
    """Colour 32x32 tiles (N,32,32,3) of ten photographs; class = photograph."""
    return _patches(PHOTO_CLASSES)


def texture_patches() -> Arrays:
    """Grey 32x32 tiles (N,32,32) of seven grey images (textures, objects, micrographs)."""
    return _patches(TEXTURE_CLASSES)


def shape_image(kind: str, index: int) -> np.ndarray:
    """The ``index``-th 32x32 RGB image of shape ``kind``: a deterministic function of
    ``(kind, index)`` alone. One shape of random colour and size 8..28 px on a random
    background colour, with mild Gaussian noise over the whole image. ``random_shapes`` draws
    triangles smaller than the other kinds (median area about 44 px against 69 to 150), so
    size alone partly gives a triangle away."""
    from skimage.draw import random_shapes

    if kind not in SHAPE_CLASSES:
        raise DatasetError(f"unknown shape {kind!r}; use one of {', '.join(SHAPE_CLASSES)}")
    rng = np.random.default_rng([_SHAPES_SEED, SHAPE_CLASSES.index(kind), index])
    while True:
        image: np.ndarray
        image, drawn = random_shapes(  # type: ignore[no-untyped-call]
            (TILE, TILE), max_shapes=1, min_size=8, max_size=28, shape=kind, rng=rng
        )
        # Draw again from rng when no shape fitted, or when the shape pokes out of the image
        # (random_shapes places some triangles partly above the top edge).
        if len(drawn) == 1:
            (top, bottom), (left, right) = drawn[0][1]
            if top >= 0 and left >= 0 and bottom <= TILE and right <= TILE:
                break
    # Shape channels lie in 0..254, so the untouched white background is exactly 255 everywhere.
    background = np.all(image == 255, axis=-1)
    colour = image[~background].mean(axis=0)
    fill = rng.integers(0, 256, size=3)
    if np.abs(fill - colour).max() < 64:  # keep the shape visible against its background
        fill = (fill + 128) % 256
    out = image.astype(np.float64)
    out[background] = fill
    out += rng.normal(0.0, 4.0, size=out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def shapes(count: int = 4000) -> Arrays:
    """``count`` synthetic shape images (N,32,32,3), ``count / 4`` per kind, ordered by kind;
    image ``j`` of each kind is ``shape_image(kind, j)`` whatever ``count`` is."""
    if count <= 0 or count % len(SHAPE_CLASSES):
        raise DatasetError(
            f"count must be a positive multiple of {len(SHAPE_CLASSES)}, got {count}"
        )
    per_class = count // len(SHAPE_CLASSES)
    images = np.stack(
        [shape_image(kind, index) for kind in SHAPE_CLASSES for index in range(per_class)]
    )
    labels = np.repeat(np.arange(len(SHAPE_CLASSES), dtype=np.int64), per_class)
    return images, labels, SHAPE_CLASSES
