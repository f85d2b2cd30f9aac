"""The thumbnail strip of a zoo task, as drawn (tests/api/test_thumbnails.py serves it):
which images are picked, and how any image becomes a tile."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.services import thumbnails
from app.settings import Settings
from app.task2vec.datasets import LabelledImages


def _decoded(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


def test_every_class_shows_before_any_shows_twice() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2, 1])
    assert thumbnails.chosen(labels, 3) == [0, 3, 4]
    assert thumbnails.chosen(labels, 5) == [0, 3, 4, 1, 6]
    assert thumbnails.chosen(labels, 12) == [0, 3, 4, 1, 6, 5, 2]


def test_large_colour_images_are_shrunk_to_tiles() -> None:
    """As an uploaded zoo task's may be: RGB, larger than a tile, fewer than asked for."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 100, 80, 3), dtype=np.uint8)
    data = LabelledImages(images, np.array([0, 1, 1]), ("a", "b"))
    image = _decoded(thumbnails.render(data, 6))
    assert image.size == (48 * 3, 48)
    assert image.mode == "RGB"


def test_a_name_that_is_not_a_file_name_is_kept_under_its_hash(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    plain = thumbnails.cached_at(settings, "v1", "fm-all-10", 6)
    assert plain.name == "fm-all-10.6.png"
    odd = thumbnails.cached_at(settings, "v1", "../../etc/passwd", 6)
    assert odd.parent == plain.parent
    assert ".." not in odd.name
