"""Folds of the meta-evaluation: which tasks a query hides from the zoo, and which it is scored on.

A new user's dataset shares no image with the zoo and has no expert trained on it. A fold
reproduces that for every query it scores:

* it holds out the query's tasks **and every zoo task that shares an image with one of them**
  (the same source images in another class subset or grouping: tasks of one domain are cut
  from one evaluation slice, so they overlap; altered tasks have a slice of their own, so a
  transform never hides an overlap). Without this, a query finds its own images among its
  nearest neighbours, and the evaluation measures recall of a near-copy, not a recommendation;
* it holds out every expert trained on a held-out task: such an expert is neither a
  candidate, nor the oracle, nor in a learned model's fit;
* it scores only queries whose truth rests on enough images: a task's matrix row is measured
  on its held-out part (30% of it), and on 6 held-out images one lucky guess moves an error
  by 17 points. Smaller tasks stay in the zoo as neighbours and training rows.

Three protocols:

* ``task`` (leave-one-task-out): each task in turn, with the tasks that share its images;
* ``domain`` (leave-one-domain-out): all tasks of one domain at once (data unlike the zoo's);
* ``source`` (leave-one-source-out): all tasks cut from one image set at once, its plain and
  altered domains together (Fashion-MNIST, MNIST, ...): not even an altered copy of the same
  kind of picture stays behind.

Uploaded zoo tasks carry no provenance: they are taken to share images with nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from app.task2vec.errors import DatasetError
from app.zoo.provenance import ImageSplit
from app.zoo.tasks import UPLOAD, TaskSpec, source_indices
from app.zoo.zoo import Zoo

PROTOCOLS = ("task", "domain", "source")
PROTOCOL_TITLES = {
    "task": "leave-one-task-out",
    "domain": "leave-one-domain-out",
    "source": "leave-one-source-out",
}
#: A query is scored only when its matrix row rests on at least this many held-out images.
MIN_SCORED_IMAGES = 30


@dataclass(frozen=True)
class Fold:
    """One round of an evaluation: the tasks held out, the ones scored among them, and the
    experts that stay candidates."""

    name: str
    held_out: tuple[int, ...]
    experts: tuple[int, ...]
    queries: tuple[int, ...]

    def visible(self, zoo: Zoo) -> list[int]:
        held = set(self.held_out)
        return [t for t in range(len(zoo.tasks)) if t not in held]


@lru_cache(maxsize=8192)
def _drawn(task: TaskSpec, split: ImageSplit | None) -> np.ndarray:
    """``source_indices``, once per recipe: every fold and every rule fit asks again."""
    indices = source_indices(task, split)
    indices.flags.writeable = False
    return indices


def _image_pool(zoo: Zoo, task: TaskSpec) -> tuple[str, str]:
    """The images a task is drawn from: its source, and with an image split its domain's slice."""
    return (task.source, task.domain if zoo.protocol.split is not None else "")


def shared_images(zoo: Zoo) -> list[frozenset[int]]:
    """Per task: the zoo tasks that share at least one source image with it (itself included).

    Two tasks can share an image only when they are cut from one source and, with an image
    split, from one domain's slice; the draw itself (``source_indices``) decides the rest."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for t, task in enumerate(zoo.tasks):
        if task.source != UPLOAD:
            groups[_image_pool(zoo, task)].append(t)
    shared = [{t} for t in range(len(zoo.tasks))]
    for members in groups.values():
        drawn = {t: _drawn(zoo.tasks[t], zoo.protocol.split) for t in members}
        size = 1 + max(int(indices.max()) for indices in drawn.values())
        masks = np.zeros((len(members), size), dtype=bool)
        for row, t in enumerate(members):
            masks[row, drawn[t]] = True
        counts = masks.astype(np.int32) @ masks.T.astype(np.int32)
        for a, b in zip(*np.nonzero(counts), strict=True):
            shared[members[a]].add(members[b])
    return [frozenset(s) for s in shared]


def overlapping(zoo: Zoo) -> list[frozenset[int]]:
    """``shared_images``, or where a source's images cannot be read on this machine (a served
    zoo imported from a bundle, without the datasets it was cut from), every task of the same
    source and slice: a superset of the true overlaps, so what is fitted on it (the
    out-of-distribution yardstick, the intervals' calibration) errs wide, never narrow."""
    try:
        return shared_images(zoo)
    except (DatasetError, OSError):
        groups: dict[tuple[str, str], set[int]] = defaultdict(set)
        for t, task in enumerate(zoo.tasks):
            groups[_image_pool(zoo, task)].add(t)
        return [
            frozenset(groups[_image_pool(zoo, task)] if task.source != UPLOAD else {t})
            for t, task in enumerate(zoo.tasks)
        ]


def scored(task: TaskSpec, zoo: Zoo, min_images: int = MIN_SCORED_IMAGES) -> bool:
    """Whether ``task``'s matrix row rests on at least ``min_images`` held-out images."""
    return math.ceil(zoo.protocol.holdout * task.size) >= min_images


def _groups(zoo: Zoo, protocol: str) -> list[tuple[str, tuple[int, ...]]]:
    """(fold name, queried tasks) of ``protocol``, before overlaps are added."""
    if protocol == "task":
        return [(task.name, (t,)) for t, task in enumerate(zoo.tasks)]
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")

    def label(task: TaskSpec) -> str:
        return task.domain if protocol == "domain" else task.source

    names = sorted({label(task) for task in zoo.tasks})
    if len(names) < 2:
        raise ValueError(f"{PROTOCOL_TITLES[protocol]} needs a zoo of at least two {protocol}s")
    return [
        (name, tuple(t for t, task in enumerate(zoo.tasks) if label(task) == name))
        for name in names
    ]


def folds(zoo: Zoo, protocol: str, min_images: int = MIN_SCORED_IMAGES) -> list[Fold]:
    """The folds of ``protocol`` ("task", "domain" or "source"). A fold without a task worth
    scoring is left out. Experts with no source task in the zoo (ImageNet, random) always
    stay candidates."""
    shared = shared_images(zoo)
    out = []
    for name, group in _groups(zoo, protocol):
        queries = tuple(t for t in group if scored(zoo.tasks[t], zoo, min_images))
        if not queries:
            continue
        held = tuple(sorted(set(group).union(*(shared[t] for t in group))))
        names = {zoo.tasks[t].name for t in held}
        kept = tuple(e for e, x in enumerate(zoo.experts) if x.source_task not in names)
        out.append(Fold(name, held, kept, queries))
    return out
