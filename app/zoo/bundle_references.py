"""What the records of a zoo bundle may name: its own members, and what this service knows
by name.

A bundle comes from another deployment. A name in it that meant a file on the importing
machine would let whoever wrote the bundle choose a file that machine reads and copies into
its data directory, and the answer would tell whether the file exists. So a task is either cut
from an offline source that this service names and loads itself (``app.zoo.tasks.SOURCES``)
and names no file, or is an uploaded one whose dataset is a member of the bundle; an expert's
weights are a member of the bundle or a keyword of the loader. Each check looks at the record
alone, never at the file system, and its message names the item and the field but not the
value: the answer is the same whatever the value names.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

from app.zoo.tasks import SOURCES, UPLOAD

#: The problem type of a record that names something outside the bundle.
EXTERNAL = "bundle-external-reference"
DATASETS = "datasets/"
EXPERTS = "experts/"
#: Weights the loaders make themselves: ImageNet's (shipped with the probe) or seeded random.
_KEYWORD = re.compile(r"^(imagenet|random(:[0-9]{1,18})?)$")
KEYWORDS = "imagenet, random, random:N"


def is_keyword(weights: str) -> bool:
    return bool(_KEYWORD.match(weights))


def task_problem(raw: dict[str, Any], members: Container[str]) -> str | None:
    """Why the task record ``raw`` names something outside the bundle, or None."""
    name, source, dataset = raw.get("name"), raw.get("source"), raw.get("dataset")
    if source == UPLOAD:
        if isinstance(dataset, str) and dataset.startswith(DATASETS) and dataset in members:
            return None
        return (
            f"zoo task {name!r}: field 'dataset' must name a member of the bundle under "
            f"{DATASETS} (the task's source is {UPLOAD!r})"
        )
    if not isinstance(source, str) or source not in SOURCES:
        return (
            f"zoo task {name!r}: field 'source' names no offline source of this service; "
            f"choose one of: {', '.join(SOURCES)}, or {UPLOAD!r} with its dataset in the bundle"
        )
    if dataset is not None:
        return (
            f"zoo task {name!r}: field 'dataset' must be empty: the task is cut from the "
            f"offline source {source!r}, which this service loads itself"
        )
    return None


def expert_problem(raw: dict[str, Any], members: Container[str]) -> str | None:
    """Why the expert record ``raw`` names weights outside the bundle, or None."""
    weights = raw.get("weights")
    if isinstance(weights, str) and (
        is_keyword(weights) or (weights.startswith(EXPERTS) and weights in members)
    ):
        return None
    return (
        f"expert {raw.get('name')!r}: field 'weights' must name a member of the bundle under "
        f"{EXPERTS} or a keyword of the loader ({KEYWORDS})"
    )
