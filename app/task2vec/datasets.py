"""Labelled image datasets: decoding, validation and batching for the probe.

Accepted inputs (the formats users upload):

* a zip or tar(.gz) archive of class folders, ``<label>/<image file>`` (one common top-level
  folder around them is allowed and ignored);
* a zip or tar(.gz) archive with a ``labels.csv`` manifest (header ``path,label``; paths are
  relative to the manifest's folder);
* an ``.npz`` file with ``x`` (N,H,W or N,H,W,C uint8, C = 1 or 3) and ``y`` (N labels).

The format is sniffed from the bytes, never taken from the file name. Files are read through
``app.task2vec.archives`` (in memory, within the caps of ``ArchiveLimits``), and an archive's
layout by ``app.task2vec.layouts``; classes and images per class are capped here. Members that
are not images (or nested archives, never opened) and images that do not decode are skipped and
reported, up to a bound. Every refusal is a ``DatasetError`` whose ``kind`` names it.

Images are kept at their stored resolution (grey stays one channel) and are resized and
normalised batch by batch, so a 10,000-image task costs its decoded size, not 10,000 x 3 x 224 x
224 floats; archive images larger than the probe's input are shrunk as they are decoded.
"""

from __future__ import annotations

import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.task2vec.archives import Archive, load_npz, zip_at_start
from app.task2vec.checkpoints import checkpoint
from app.task2vec.confusables import lookalike_warnings
from app.task2vec.errors import DatasetError
from app.task2vec.images import PixelBudget, decode_image
from app.task2vec.layouts import Pairs, Skipped, labelled_members, looks_like_formula
from app.task2vec.limits import DEFAULT_LIMITS, ArchiveLimits


@dataclass(frozen=True)
class LabelledImages:
    """A decoded classification task.

    ``images`` is (N, H, W, C) uint8 with C = 1 (grey) or 3 (RGB); ``labels`` holds class
    indices into ``classes``, which are sorted so that the same data always maps to the same
    indices.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    #: Members left out, each with why ("not an image", "cannot be decoded: ...").
    skipped: tuple[tuple[str, str], ...] = ()
    #: What the uploader should know about a dataset that was accepted (class names that
    #: look alike: ``app.task2vec.confusables``).
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[indices], self.labels[indices], self.classes)


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    skipped: tuple[tuple[str, str], ...] = (),
) -> LabelledImages:
    """Validate in-memory arrays (N,H,W[,C] uint8, N labels) and map labels to class indices."""
    images, labels = _checked_arrays(images, np.asarray(labels), limits)
    classes, index = _classes(labels, limits)
    return LabelledImages(
        np.ascontiguousarray(images),
        index.astype(np.int64),
        classes,
        tuple(skipped),
        lookalike_warnings(classes),
    )


def _checked_arrays(
    images: np.ndarray, labels: np.ndarray, limits: ArchiveLimits
) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N,H,W,C) uint8 within the pixel limit, one label each (integers or text,
    text in one Unicode form): the shapes every later step relies on."""
    if images.dtype != np.uint8:
        raise DatasetError(f"images must be uint8, got {images.dtype}", "invalid-npz")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(
            f"images must have shape (N,H,W), (N,H,W,1) or (N,H,W,3); got {images.shape}",
            "invalid-npz",
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"expected one label per image: {images.shape[0]} images, labels of shape "
            f"{labels.shape}",
            "invalid-npz",
        )
    if images.shape[0] == 0:
        raise DatasetError("the dataset holds no images", "no-images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DatasetError(f"images of shape {images.shape[1:3]} hold no pixels", "invalid-npz")
    if images.shape[1] * images.shape[2] > limits.max_image_pixels:
        raise DatasetError(
            f"images of {images.shape[1]}x{images.shape[2]} pixels, over the limit of "
            f"{limits.max_image_pixels}",
            "image-too-large",
        )
    if labels.dtype.kind not in "iuU":
        raise DatasetError(f"labels must be integers or strings, got {labels.dtype}", "invalid-npz")
    if labels.dtype.kind == "U":  # one class however its name was composed (NFC and NFD café)
        labels = np.array([unicodedata.normalize("NFC", str(label)) for label in labels])
    return images, labels


def _classes(labels: np.ndarray, limits: ArchiveLimits) -> tuple[tuple[str, ...], np.ndarray]:
    """The sorted class names and each label's index among them: a task has 2 to
    ``max_classes`` classes, each with enough images to learn from."""
    values, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(values) < 2:
        raise DatasetError(
            f"a classification task needs at least 2 classes; found only {values[0]!r}",
            "too-few-classes",
        )
    if len(values) > limits.max_classes:
        raise DatasetError(
            f"{len(values)} classes, over the limit of {limits.max_classes}", "too-many-classes"
        )
    classes = tuple(str(v) for v in values)
    for name in classes:
        _check_label(name)
    if counts.min() < limits.min_images_per_class:
        few = [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True)]
        few = [f for f, n in zip(few, counts, strict=True) if n < limits.min_images_per_class]
        raise DatasetError(
            f"every class needs at least {limits.min_images_per_class} images; "
            f"{', '.join(few[:5])}{' ...' if len(few) > 5 else ''} have fewer",
            "too-few-images-per-class",
        )
    return classes, index


def _check_label(label: str) -> None:
    """A class name must be printable text (it is shown in every answer about the task) and
    must not read as a spreadsheet formula when exported."""
    if not label.strip() or len(label) > 200 or not label.isprintable():
        raise DatasetError(
            f"class name {label[:80]!r} is empty, too long or not printable text",
            "bad-label",
        )
    if looks_like_formula(label):
        raise DatasetError(
            f"class name {label[:80]!r} looks like a spreadsheet formula", "bad-label"
        )


# --------------------------------------------------------------------------------------------
# Archives: decoding the images of each class (which member is which: layouts.py)


def load_archive(
    path: Path, image_size: int, limits: ArchiveLimits = DEFAULT_LIMITS
) -> LabelledImages:
    """A zip or tar of class folders or with a ``labels.csv`` manifest, decoded and checked."""
    with Archive(path, limits) as archive:
        pairs, skipped = labelled_members(path, archive)
        decoded, labels, broken = _decode(archive, pairs, image_size, limits)
    if not decoded or len(broken) > limits.max_skipped_fraction * len(pairs):
        names = ", ".join(repr(n) for n, _ in broken[:3])
        raise DatasetError(
            f"{len(broken)} of {len(pairs)} images cannot be decoded ({names}"
            f"{', ...' if len(broken) > 3 else ''}): more than the "
            f"{limits.max_skipped_fraction:.0%} that are skipped",
            "undecodable-images",
        )
    skipped += [(name, why.removeprefix(f"image {name!r} ")) for name, why in broken]
    return from_arrays(_stack(decoded, image_size), np.array(labels), limits, tuple(skipped))


def _decode(
    archive: Archive, pairs: Pairs, image_size: int, limits: ArchiveLimits
) -> tuple[list[np.ndarray], list[str], Skipped]:
    """The images that decode, with their labels, and those that do not (with why): a few
    broken images are skipped, any other refusal ends the upload."""
    decoded, labels, broken = [], [], []
    budget = PixelBudget(limits)
    for member, label in pairs:
        try:
            image = decode_image(member.name, archive.read(member), limits, budget)
        except DatasetError as exc:
            if exc.kind != "undecodable-images":
                raise
            broken.append((member.name, str(exc)))
            budget.check_time(member.name)
            continue
        decoded.append(_bound(image, image_size))
        labels.append(label)
        budget.check_time(member.name)
    return decoded, labels, broken


def _stack(images: list[np.ndarray], image_size: int) -> np.ndarray:
    """Stack decoded images: mixed modes go to RGB, mixed sizes to ``image_size`` squared."""
    channels = max(i.shape[2] for i in images)
    if channels == 3:
        images = [np.repeat(i, 3, axis=2) if i.shape[2] == 1 else i for i in images]
    if len({i.shape for i in images}) > 1:
        images = [_resize_uint8(i, image_size) for i in images]
    return np.stack(images)


def _bound(image: np.ndarray, image_size: int) -> np.ndarray:
    """Shrink an image larger than the probe's input right away, so memory stays bounded."""
    if image.shape[0] * image.shape[1] > image_size * image_size:
        return _resize_uint8(image, image_size)
    return image


def _resize_uint8(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize with the same antialiased bilinear filter the batches use, back to uint8."""
    if image.shape[:2] == (image_size, image_size):
        return image
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(torch.float32)
    x = torch.nn.functional.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def load_dataset(
    path: str | Path, image_size: int = 224, limits: ArchiveLimits = DEFAULT_LIMITS
) -> LabelledImages:
    """Read and validate a dataset file in any of the accepted formats.

    ``image_size`` is the probe's input size: archive images larger than it, or of mixed
    sizes, are resized to it while decoding; the rest keep their size until batching.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist", "not-a-dataset")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path.name}: the file is empty", "empty-file")
    if _is_npz(path):
        x, y = load_npz(path, limits)
        return from_arrays(x, y, limits)
    return load_archive(path, image_size, limits)


def _is_npz(path: Path) -> bool:
    """An .npz is a zip of .npy arrays: told apart by its members, not by its file name."""
    if not zip_at_start(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile, EOFError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


# --------------------------------------------------------------------------------------------
# Batching for the probe


def to_probe_input(batch: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B,H,W,C) → float (B,3,S,S) in [0, 1]: grey expanded to 3 channels, resized.

    Resizing is bilinear with antialiasing, done on whole batches in torch so it costs nothing
    next to the probe.
    """
    x = torch.as_tensor(batch)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.contiguous()


def iter_batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """``indices`` a batch at a time; before each batch, a ``checkpoint`` (a job whose lease
    was lost stops here)."""
    for start in range(0, len(indices), batch_size):
        checkpoint()
        yield indices[start : start + batch_size]
