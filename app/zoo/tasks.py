"""Zoo tasks: labelled datasets cut from image sets that ship offline, or uploaded ones.

A task is a reproducible recipe (``TaskSpec``): a source set, which of its classes to use and
how to group them into labels, how many images, and a seed. Groupings make tasks whose labels
are semantic ("footwear vs. the rest", "even vs. odd digits"), not only class subsets, so tasks
differ in domain, difficulty and size. A task added to a running service's zoo has the source
``upload``: its recipe is a stored dataset file, used whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import torch

from app.data.offline import Arrays, fashion_mnist, mnist_5k, sklearn_digits
from app.task2vec.datasets import LabelledImages, from_arrays, load_dataset
from app.task2vec.errors import DatasetError
from app.task2vec.sampling import stratified_subset

#: Source sets and their domains. The domain is what a 2-D map of the zoo is coloured by.
SOURCES: dict[str, tuple[str, Callable[[], Arrays]]] = {
    "fashion_mnist": ("clothing", lambda: fashion_mnist("train")),
    "mnist": ("handwritten digits", mnist_5k),
    "digits": ("8x8 digits", sklearn_digits),
}
UPLOAD = "upload"


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

    @property
    def domain(self) -> str:
        if self.source == UPLOAD:
            return self.domain_name or "uploaded"
        return SOURCES[self.source][0]

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


@cache
def _source(name: str) -> Arrays:
    if name not in SOURCES:
        raise DatasetError(f"unknown task source {name!r}; choose one of: {', '.join(SOURCES)}")
    return SOURCES[name][1]()


def materialize(spec: TaskSpec, image_size: int = 224) -> LabelledImages:
    """The task's images and labels: a seeded, class-stratified draw of ``spec.size`` images,
    or an uploaded dataset whole (decoded for a probe of ``image_size``)."""
    if spec.source == UPLOAD:
        if spec.dataset is None:
            raise DatasetError(f"task {spec.name!r}: an uploaded task needs its dataset file")
        return load_dataset(spec.dataset, image_size=image_size)
    images, labels, _ = _source(spec.source)
    if len(spec.groups) != len(spec.group_names) or len(spec.groups) < 2:
        raise DatasetError(f"task {spec.name!r}: needs at least two named label groups")
    label_of = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    for label, members in enumerate(spec.groups):
        if np.any(label_of[list(members)] >= 0):
            raise DatasetError(f"task {spec.name!r}: a source class is in two groups")
        label_of[list(members)] = label
    keep = np.flatnonzero(label_of[labels] >= 0)
    task_labels = label_of[labels[keep]]
    chosen = stratified_subset(task_labels, spec.size, torch.Generator().manual_seed(spec.seed))
    names = np.array(spec.group_names)[task_labels[chosen]]
    return from_arrays(images[keep[chosen]], names)
