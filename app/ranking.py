"""The zoo as the service holds it in memory: tasks, index, learned scorer, recommenders.

The API answers neighbours and recommendations from here without touching the workers; the
workers use the same object for the methods that need the dataset's images (LogME, brute
force). ``ZooState.current`` reloads when the zoo folder's index version changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo.recommenders import LearnedScorer, Query, Ranked, Recommender, recommenders
from app.zoo.zoo import Zoo

#: Methods the API answers in-process; the others need the images and run on a worker.
FAST_METHODS = ("learned", "task2vec-knn", "task2vec-asym", "global-best")
WORKER_METHODS = ("logme", "brute-force")
METHODS = FAST_METHODS + WORKER_METHODS


def zoo_folder(settings: Settings) -> Path:
    """A preset name means ``<data dir>/zoos/<name>``; anything else is a zoo folder."""
    from app.zoo.build import zoo_folder as preset_folder
    from app.zoo.presets import PRESETS

    if settings.zoo in PRESETS:
        return preset_folder(settings.data_dir, settings.zoo)
    return Path(settings.zoo)


@dataclass
class ZooState:
    zoo: Zoo
    version: str
    methods: dict[str, Recommender] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> ZooState:
        zoo = Zoo.load(folder)
        version = zoo.index().version.content
        methods: dict[str, Recommender] = {**recommenders(zoo), "learned": LearnedScorer(zoo)}
        return cls(zoo, version, methods)

    def neighbours(self, embedding: Embedding, k: int) -> list[dict[str, Any]]:
        self.zoo.check_compatible(embedding)
        found = self.zoo.index().search(embedding, k)
        return [
            {
                "task": self.zoo.tasks[n.id].name,
                "domain": self.zoo.tasks[n.id].domain,
                "distance": n.distance,
                "best_expert": self.zoo.experts[self.zoo.best_expert(n.id)].name,
            }
            for n in found
        ]

    def rank(
        self, method: str, embedding: Embedding, data: LabelledImages | None = None
    ) -> list[Ranked]:
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        self.zoo.check_compatible(embedding)
        return self.methods[method](self.zoo, Query(embedding, data))


class ZooStates:
    """One loaded zoo per process, swapped for a new one when the folder's index changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: ZooState | None = None
        self._key: tuple[Path, int, int] | None = None

    def current(self, settings: Settings) -> ZooState:
        """The loaded zoo; reloaded when its folder was rebuilt (a zoo is saved by replacing
        the folder atomically, so a new ``zoo.json`` means a new version)."""
        folder = zoo_folder(settings)
        manifest = folder / "zoo.json"
        with self._lock:
            try:
                stat = manifest.stat()
            except FileNotFoundError:
                raise ConfigError(
                    f"no zoo at {folder}: build it with `task2vec zoo build --preset "
                    f"{settings.zoo}` (make run does so on first use)"
                ) from None
            key = (folder, stat.st_mtime_ns, stat.st_ino)
            if self._state is None or key != self._key:
                self._state, self._key = ZooState.load(folder), key
            return self._state

    def loaded(self) -> bool:
        return self._state is not None


def ranking_items(ranking: list[Ranked], k: int) -> list[dict[str, Any]]:
    return [
        {"rank": i + 1, "expert": r.expert, "score": r.score, "evidence": r.evidence}
        for i, r in enumerate(ranking[:k])
    ]
