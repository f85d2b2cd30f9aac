"""What a ranking item tells a person, whichever method ranked it.

A score says only "higher is better". What a person can act on: the error to expect from the
expert on this dataset and how sure that is (``intervals``), the zoo tasks most like the
dataset with the error this expert measured on each, and what the expert is (its architecture
and the task it was trained on). Every field is documented in docs/api.md, Reading the answer.
"""

from __future__ import annotations

from typing import Any

from app.task2vec.embedding import Embedding
from app.zoo.intervals import ErrorIntervals
from app.zoo.zoo import Zoo

#: How many of the nearest zoo tasks an item names.
NEAREST_SHOWN = 3


def readable(
    zoo: Zoo, intervals: ErrorIntervals, embedding: Embedding, nearest: int = NEAREST_SHOWN
) -> dict[str, dict[str, Any]]:
    """Per expert name: its predicted error and interval, the ``nearest`` zoo tasks (at most
    the intervals' k: the tasks the prediction rests on, from one search) with their distance
    and the expert's measured error on each, its architecture and source task."""
    neighbours = intervals.nearest(embedding)
    predicted = intervals.evidence(embedding, neighbours)
    found = neighbours[:nearest]
    out = {}
    for e, expert in enumerate(zoo.experts):
        out[expert.name] = {
            **predicted[expert.name],
            "nearest_tasks": [
                {
                    "task": zoo.tasks[n.id].name,
                    "distance": round(n.distance, 4),
                    "error": round(float(zoo.errors[n.id, e]), 4),
                }
                for n in found
            ],
            "architecture": expert.architecture,
            "source_task": expert.source_task,
        }
    return out
