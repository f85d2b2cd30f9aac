"""A strip of a served zoo task's images, so a person sees what the task looks like.

Drawing one means materialising the task (its recipe over an offline image set, or an
uploaded dataset decoded whole), which costs far more than the strip; the PNG is a pure
function of the zoo version, the task and the number of images, so it is written once
under the data directory (atomically: every process of the service shares the directory)
and read from there after.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from app.services.layout import DataLayout
from app.services.problems import ProblemError, not_found
from app.services.serving import ZooState
from app.services.zoo_items import NAME
from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.task2vec.errors import DatasetError

#: Each image's side in the strip, in pixels.
SIDE = 48
MAX_IMAGES = 12


def cached_at(settings: Settings, version: str, task: str, n: int) -> Path:
    """Where the strip is kept: by zoo version content, task name and count (a name that is
    not a safe file name is hashed)."""
    stem = task if NAME.fullmatch(task) else hashlib.sha256(task.encode()).hexdigest()[:32]
    return DataLayout.of(settings).root / "zoo" / "thumbnails" / version / f"{stem}.{n}.png"


def chosen(labels: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` image indices: the first image of each class in turn, then the second of
    each, and so on, so that every class shows before any shows twice."""
    per_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    for rank in range(max((len(m) for m in per_class), default=0)):
        picked += [members[rank] for members in per_class if rank < len(members)]
        if len(picked) >= n:
            break
    return picked[:n]


def _tile(image: np.ndarray) -> Image.Image:
    """One image as an RGB square of ``SIDE`` px: nearest when enlarged (small digits stay
    crisp), bilinear when shrunk."""
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    tile = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    enlarged = max(tile.size) <= SIDE
    resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.BILINEAR
    return tile.resize((SIDE, SIDE), resample)


def render(data: LabelledImages, n: int) -> bytes:
    """A PNG of ``n`` of the task's images (fewer when it has fewer), side by side."""
    picked = chosen(data.labels, n)
    strip = Image.new("RGB", (SIDE * max(len(picked), 1), SIDE))
    for slot, index in enumerate(picked):
        strip.paste(_tile(data.images[index]), (slot * SIDE, 0))
    out = io.BytesIO()
    strip.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _write(path: Path, content: bytes) -> None:
    """Whole or not at all: a reader never sees a strip half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strip(settings: Settings, state: ZooState, task: str, n: int) -> bytes:
    """The PNG strip of served zoo task ``task``: from the data directory when drawn before,
    else drawn and kept. 404 for a task the served zoo does not hold."""
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n is 1 to {MAX_IMAGES}")
    try:
        index = state.zoo.task_index(task)
    except KeyError:
        raise not_found("zoo task", task) from None
    path = cached_at(settings, state.version.content, task, n)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    try:
        data = state.zoo.task_data(index, image_size=state.zoo.embed_config.image_size)
    except DatasetError as exc:
        raise ProblemError(
            500,
            "zoo-task-images-unavailable",
            "The zoo task's images cannot be read",
            f"zoo task {task!r}: {exc}",
        ) from None
    content = render(data, n)
    _write(path, content)
    return content
