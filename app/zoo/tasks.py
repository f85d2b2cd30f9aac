"""Zoo tasks: labelled datasets cut from image sets that ship offline, or uploaded ones.

A task is a reproducible recipe (``TaskSpec``): a source set, which of its classes to use and
how to group them into labels, how many images, a seed, and optionally a transform of the
images (inverted, rotated, blurred, noisy, low-contrast). Groupings make tasks whose labels
are semantic ("footwear vs. the rest", "even vs. odd digits"), not only class subsets, so tasks
differ in domain, difficulty and size. A task added to a running service's zoo has the source
``upload``: its recipe is a stored dataset file, used whole.

Which images a recipe may draw is decided by the zoo's ``ImageSplit`` (``provenance.py``): a
zoo task is cut from its domain's evaluation slice, and an expert trained on that task sees
the same recipe drawn from the expert pool instead, so no expert is ever measured on an image
it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import torch

from app.data import photos
from app.data.offline import Arrays, fashion_mnist, mnist_5k, sklearn_digits
from app.task2vec.datasets import LabelledImages, from_arrays, load_dataset
from app.task2vec.errors import DatasetError
from app.task2vec.sampling import stratified_subset
from app.zoo.provenance import ImageSplit


@dataclass(frozen=True)
class Source:
    """A set of labelled images that installs offline, and the domains its tasks belong to.

    The domain is what a 2-D map of the zoo is coloured by and what leave-one-domain-out
    holds out together. Transformed tasks of a source form a domain of their own
    (``altered``), with evaluation images of their own.
    """

    domain: str
    load: Callable[[], Arrays]
    altered: str | None = None

    @property
    def domains(self) -> tuple[str, ...]:
        return (self.domain,) if self.altered is None else (self.domain, self.altered)


#: Source sets. Fashion-MNIST's test split (t10k) is deliberately absent: it is reserved for
#: checks from outside the zoo, so no zoo task or expert ever sees one of its images.
SOURCES: dict[str, Source] = {
    "fashion_mnist": Source("clothing", lambda: fashion_mnist("train"), "clothing, altered"),
    "mnist": Source("handwritten digits", mnist_5k, "handwritten digits, altered"),
    "digits": Source("8x8 digits", sklearn_digits),
    "photos": Source("photo patches", photos.photo_patches),
    "textures": Source("grey textures", photos.texture_patches),
    "shapes": Source("synthetic shapes", photos.shapes),
}
UPLOAD = "upload"


def _invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    inverted: np.ndarray = np.subtract(255, images, dtype=np.uint8)
    return inverted


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))


def _blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = (0, 1.2, 1.2) + (0,) * (images.ndim - 3)
    blurred: np.ndarray = gaussian_filter(images.astype(np.float32), sigma)
    out: np.ndarray = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    return out


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float32) + rng.normal(0.0, 48.0, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _low_contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (images.astype(np.float32) * 0.2 + 102.0).round().astype(np.uint8)


#: Image transforms of altered tasks: (N,H,W[,C]) uint8 → the same shape, seeded by the task.
TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "inverted": _invert,
    "rotated": _rotate,
    "blurred": _blur,
    "noisy": _noise,
    "low-contrast": _low_contrast,
}


@dataclass(frozen=True)
class TaskSpec:
    """One labelled task. ``groups[i]`` lists the source classes that form label i."""

    name: str
    source: str
    groups: tuple[tuple[int, ...], ...]
    group_names: tuple[str, ...]
    size: int
    seed: int = 0
    #: For ``source="upload"``: the stored dataset file and the domain its uploader named.
    dataset: str | None = None
    domain_name: str | None = None
    #: A name from ``TRANSFORMS`` applied to every image (an altered task), or None.
    transform: str | None = None

    @property
    def domain(self) -> str:
        if self.source == UPLOAD:
            return self.domain_name or "uploaded"
        source = _registered(self.source)
        if self.transform is None:
            return source.domain
        if source.altered is None:
            raise DatasetError(f"task {self.name!r}: source {self.source!r} has no altered tasks")
        return source.altered

    def key(self) -> str:
        """Content hash of the recipe: the cache key of everything derived from the task.

        Unset optional fields are left out, so recipes written before they existed keep their
        keys (and their cached embeddings and matrix rows)."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def uploaded_task(
    name: str, dataset: str, data: LabelledImages, domain: str | None = None
) -> TaskSpec:
    """The recipe of an uploaded dataset used whole as a zoo task (one group per class)."""
    return TaskSpec(
        name=name,
        source=UPLOAD,
        groups=tuple((c,) for c in range(data.num_classes)),
        group_names=tuple(data.classes),
        size=len(data),
        dataset=dataset,
        domain_name=domain,
    )


def _registered(name: str) -> Source:
    if name not in SOURCES:
        raise DatasetError(f"unknown task source {name!r}; choose one of: {', '.join(SOURCES)}")
    return SOURCES[name]


@cache
def _source(name: str) -> Arrays:
    return _registered(name).load()


def _label_of(spec: TaskSpec, labels: np.ndarray) -> np.ndarray:
    """Per source class: the task label it maps to, or -1 when the task leaves it out."""
    if len(spec.groups) != len(spec.group_names) or len(spec.groups) < 2:
        raise DatasetError(f"task {spec.name!r}: needs at least two named label groups")
    label_of = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    for label, members in enumerate(spec.groups):
        if np.any(label_of[list(members)] >= 0):
            raise DatasetError(f"task {spec.name!r}: a source class is in two groups")
        label_of[list(members)] = label
    return label_of


def source_indices(spec: TaskSpec, split: ImageSplit | None, pool: str | None = None) -> np.ndarray:
    """Which images of its source the task is made of (sorted indices into the source).

    With a ``split``, the draw is confined to one pool: ``pool=None`` is the evaluation slice
    of the task's domain (the zoo task itself), ``provenance.EXPERT_POOL`` the images an
    expert trained on this task may see. Without one (zoos built before provenance), the
    whole source.
    """
    if spec.source == UPLOAD:
        raise DatasetError(f"task {spec.name!r}: an uploaded task has no source images")
    if spec.transform is not None and spec.transform not in TRANSFORMS:
        raise DatasetError(
            f"task {spec.name!r}: unknown transform {spec.transform!r}; "
            f"choose one of: {', '.join(TRANSFORMS)}"
        )
    _, labels, _ = _source(spec.source)
    candidates = np.arange(labels.shape[0])
    if split is not None:
        pools = split.pools(spec.source, labels.shape[0], _registered(spec.source).domains)
        candidates = pools[pool or spec.domain]
    label_of = _label_of(spec, labels)
    keep = candidates[label_of[labels[candidates]] >= 0]
    if keep.shape[0] < spec.size:
        where = "the source" if split is None else f"its pool {pool or spec.domain!r}"
        raise DatasetError(
            f"task {spec.name!r} asks for {spec.size} images; {where} holds {keep.shape[0]}"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    chosen = stratified_subset(label_of[labels[keep]], spec.size, generator)
    indices: np.ndarray = keep[chosen]
    return indices


def materialize(
    spec: TaskSpec,
    image_size: int = 224,
    split: ImageSplit | None = None,
    pool: str | None = None,
) -> LabelledImages:
    """The task's images and labels: a seeded, class-stratified draw of ``spec.size`` images
    from the pool ``source_indices`` names, transformed when the recipe says so; or an
    uploaded dataset whole (decoded for a probe of ``image_size``)."""
    if spec.source == UPLOAD:
        if spec.dataset is None:
            raise DatasetError(f"task {spec.name!r}: an uploaded task needs its dataset file")
        return load_dataset(spec.dataset, image_size=image_size)
    indices = source_indices(spec, split, pool)
    images, labels, _ = _source(spec.source)
    chosen = images[indices]
    if spec.transform is not None:
        chosen = TRANSFORMS[spec.transform](chosen, np.random.default_rng([spec.seed, 1]))
    names = np.array(spec.group_names)[_label_of(spec, labels)[labels[indices]]]
    return from_arrays(chosen, names)
