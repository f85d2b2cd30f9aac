"""The zoo as the service holds it in memory: tasks, index, learned scorer, recommenders.

The API answers neighbours and recommendations from here without touching the workers; the
workers use the same object for the methods that need the dataset's images (LogME, brute
force). ``ZooStates`` follows the published versions of the zoo (``versions``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.observability.outages import Outage
from app.services import objects
from app.services.bundles import import_shipped
from app.services.cache import LRUCache
from app.services.layout import DataLayout
from app.services.publishing import current_version, ensure_published
from app.services.versions import Version
from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import Embedding
from app.task2vec.errors import ConfigError
from app.zoo import recommenders
from app.zoo.evidence import readable
from app.zoo.folds import overlapping
from app.zoo.intervals import ErrorIntervals
from app.zoo.novelty import Novelty
from app.zoo.recommenders import Query, Ranked, Recommender
from app.zoo.zoo import Zoo

log = logging.getLogger(__name__)

#: Methods the API answers in-process; the others need the images and run on a worker.
FAST_METHODS = recommenders.registry.names(runs=("api",))
WORKER_METHODS = recommenders.registry.names(runs=("worker",))
METHODS = recommenders.served()
#: The method a ranking uses when none is named: the one that measures best for its cost
#: (docs/quality.md). It reads the images of a shortlist of experts, so the
#: embedding job ranks with it while it has the images (``PRERANKED``).
DEFAULT_METHOD = "hybrid"
#: Methods the embedding job ranks with before it ends, so that their answer is stored when
#: the embedding is: the default, when it needs the images.
PRERANKED = tuple(m for m in (DEFAULT_METHOD,) if m in WORKER_METHODS)


@dataclass
class ZooState:
    """One version of the zoo, ready to answer, with the rankings it computed: a ranking is a
    pure function of the task's embedding, the method and the version, so it is kept (per
    task and method; a task's embedding never changes) for as long as the version is served."""

    zoo: Zoo
    version: Version
    methods: dict[str, Recommender] = field(default_factory=dict)
    #: The zoo's yardsticks, fitted once per version: is a task out of its distribution, and
    #: what error each expert will have on it (with an interval).
    novelty: Novelty | None = None
    intervals: ErrorIntervals | None = None
    rankings: LRUCache[tuple[str, str], list[Ranked]] = field(
        default_factory=lambda: LRUCache(4096)
    )
    _fitting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(
        cls,
        version: Version,
        ranking_cache_size: int = 4096,
        fitted: tuple[str, ...] = METHODS,
        settings: Settings | None = None,
    ) -> ZooState:
        """The version's zoo with its saved index and the ``fitted`` methods fitted on it (the
        ones this process runs; any other served method is fitted on first use). With the
        process's ``settings``, its folder comes from the object store when there is one."""
        zoo = Zoo.load(version.folder) if settings is None else objects.load_zoo(settings, version)
        zoo.index()
        methods = {name: recommenders.build(name, zoo) for name in fitted}
        shared = overlapping(zoo)
        novelty, intervals = Novelty.fit(zoo, shared), ErrorIntervals(zoo, shared)
        return cls(zoo, version, methods, novelty, intervals, LRUCache(ranking_cache_size))

    def recommender(self, method: str) -> Recommender:
        """The served method fitted on this version (on first use when ``load`` did not)."""
        with self._fitting:
            if method not in self.methods:
                self.methods[method] = recommenders.build(method, self.zoo)
            return self.methods[method]

    def assess(self, embedding: Embedding) -> dict[str, Any] | None:
        """Whether the task lies outside what the zoo covers (``Novelty.check``)."""
        return None if self.novelty is None else self.novelty.of(self.zoo, embedding)

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
        """The method's ranking, each item's evidence led by what a person reads
        (``evidence.readable``: predicted error and interval, nearest tasks, the expert),
        whatever the method ranked by."""
        recommenders.method(method, among=METHODS)
        self.zoo.check_compatible(embedding)
        ranking = self.recommender(method)(self.zoo, Query(embedding, data))
        if self.intervals is None:
            return ranking
        shown = readable(self.zoo, self.intervals, embedding)
        return [replace(r, evidence={**shown[r.expert], **r.evidence}) for r in ranking]

    def ranking(self, task_id: str, method: str, embedding: Embedding) -> tuple[list[Ranked], bool]:
        """The task's ranking by a method the API answers in-process, and whether it was
        computed now (False: this process had it from an earlier request)."""
        kept = self.rankings.get((task_id, method))
        if kept is not None:
            return kept, False
        ranked = self.rank(method, embedding)
        self.rankings.put((task_id, method), ranked)
        return ranked, True


class ZooStates:
    """The zoo version a process serves, swapped for a newer one without a restart.

    At most every ``zoo_poll_seconds`` it asks the database for the current version (the
    database orders them: ``versions``). When it changed, the new one is loaded in a
    background thread while requests go on with the old one (``background``, for the API), or
    at once (for workers, which should compute with the newest). Only the version last asked
    for is installed, so loads that finish out of order never go back. On first use, when
    nothing is published yet, the configured zoo is imported and published; concurrent first
    requests wait for one load.
    """

    def __init__(self, background: bool = True, fitted: tuple[str, ...] = METHODS) -> None:
        """``fitted``: the methods each loaded version fits at once, before it is served (the
        ones this process runs)."""
        self.background, self.fitted = background, fitted
        self._lock = threading.Lock()
        self._first_load = threading.Lock()
        self._state: ZooState | None = None
        self._wanted: Version | None = None
        self._checked = -float("inf")
        self._loading: Version | None = None
        #: A database outage is logged when it starts and ends, not at every poll.
        self._database = Outage(log, "the database (asked for the current zoo version)")

    def current(self, settings: Settings) -> ZooState:
        now = time.monotonic()
        with self._lock:
            state = self._state
            if state is not None and now - self._checked < settings.zoo_poll_seconds:
                return state
            self._checked = now
        if state is None:
            with self._first_load:
                return self._state or self._install(self._load_current(settings))
        try:
            version = current_version(settings)
        except SQLAlchemyError as exc:
            self._database.failed(exc)  # the version served goes on answering
            return state
        self._database.ok()
        if version is None or version == state.version:
            return state
        with self._lock:
            self._wanted = version
        if not self.background:
            return self._install(self._load(version, settings))
        with self._lock:
            if self._loading != version:
                self._loading = version
                threading.Thread(target=self._swap, args=(version, settings), daemon=True).start()
        return state

    def _load_current(self, settings: Settings) -> ZooState:
        version = current_version(settings) or self._first_version(settings)
        with self._lock:
            self._wanted = version
        return self._load(version, settings)

    def _load(self, version: Version, settings: Settings) -> ZooState:
        return ZooState.load(version, settings.ranking_cache_size, self.fitted, settings)

    def _install(self, loaded: ZooState) -> ZooState:
        with self._lock:
            if self._state is None or loaded.version == self._wanted:
                self._state = loaded
            return self._state

    def _swap(self, version: Version, settings: Settings) -> None:
        try:
            served = self._install(self._load(version, settings))
        except Exception:
            log.exception("zoo version %s did not load; still serving the previous one", version.id)
            served = None
        with self._lock:
            if self._loading == version:
                self._loading = None
        if served is not None and served.version == version:
            log.info(
                "now serving zoo version %s (%d tasks, %d experts)",
                version.content,
                version.tasks,
                version.experts,
            )

    @staticmethod
    def _first_version(settings: Settings) -> Version:
        folder = DataLayout.of(settings).zoo(settings.zoo)
        if not (folder / "zoo.json").is_file():
            shipped = import_shipped(settings)  # the starter zoo ships as a bundle
            if shipped is not None:
                return shipped
            raise ConfigError(
                f"no zoo at {folder}: build it with `task2vec zoo build --preset "
                f"{settings.zoo}` (make run does so on first use)"
            )
        return ensure_published(settings, folder)

    @property
    def served(self) -> ZooState | None:
        """The version being served now, without looking for a newer one."""
        return self._state

    def follow(self, settings: Settings, stop: threading.Event) -> None:
        """Look for new versions every poll interval until ``stop`` is set, so the API swaps
        even when no request comes (and loads the zoo at start, not on the first request).
        A failure is logged once until it changes; requests report it as they come."""
        last_error = ""
        while not stop.is_set():
            try:
                self.current(settings)
                last_error = ""
            except Exception as exc:
                if repr(exc) != last_error:
                    log.warning("the zoo is not available: %s", exc)
                    last_error = repr(exc)
            stop.wait(max(settings.zoo_poll_seconds, 0.5))


def limit_numeric_threads(threads: int) -> None:
    """Cap the threads of every numeric library the served zoo uses (OpenBLAS or MKL under
    numpy and scipy, OpenMP under FAISS and torch) for this process. The API answers requests
    on a threadpool, in parallel already; a parallel kernel inside each would have its threads
    spin and contend for the same cores (with ``uvicorn --workers`` several times over)."""
    import faiss
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that it is limited too)
    import sklearn.linear_model  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


def ranking_items(ranking: list[Ranked], k: int) -> list[dict[str, Any]]:
    return [
        {"rank": i + 1, "expert": r.expert, "score": r.score, "evidence": r.evidence}
        for i, r in enumerate(ranking[:k])
    ]
