"""The API's Prometheus metrics: request latency by route template, requests waiting for
their job, and, computed when scraped, the job ledger (jobs by kind and status, queue depth,
repeated attempts and re-sends) and the zoo version being served.

Each application gets its own registry (``ApiMetrics``). When ``PROMETHEUS_MULTIPROC_DIR`` is
set (several API processes behind one port), the request histogram and the waiting requests
are written to that directory by every process and the scrape merges them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.db.models import Job, JobStatus
from app.db.session import engine_for
from app.observability import multiprocess

log = logging.getLogger(__name__)

#: The route label of a request that matched no route (a raw path would make a new series
#: for every path a client tries).
UNMATCHED = "unmatched"
#: Methods labelled as they are; any other is labelled ``OTHER``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: From a cached ranking (about a millisecond) to an upload waiting for its ranking.
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)


class RequestMetrics:
    """``t2v_http_request_duration_seconds{route, method, status}``."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.histogram = Histogram(
            "t2v_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template "
            "(unmatched: no route), method and status code",
            ("route", "method", "status"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:  # once per series: labels() validates and locks
            child = self._children[key] = self.histogram.labels(route, method, str(status))
        child.observe(seconds)


class LedgerCollector(Collector):
    """Read from the jobs table at each scrape, in one grouped query:

    - ``t2v_jobs{kind, status}``: jobs in the ledger;
    - ``t2v_queue_depth{queue}``: queued jobs of the kinds each Celery queue carries;
    - ``t2v_job_repeat_attempts{kind}``: attempts after each job's first, summed (a lease
      expired, or a database error was retried);
    - ``t2v_job_resends{kind}``: re-sends of queued jobs whose message may have been lost;
    - ``t2v_database_up``: 0 when the query failed (the other metrics are then left out).

    The totals are gauges: they are sums over the rows there are now."""

    def __init__(self, database_url: str, queues: Mapping[str, str]) -> None:
        self.url, self.queues = database_url, queues

    def _rows(self) -> list[tuple[str, str, int, int, int]]:
        repeats = case((Job.attempt > 1, Job.attempt - 1), else_=0)
        query = select(
            Job.kind,
            Job.status,
            func.count(),
            func.coalesce(func.sum(repeats), 0),
            func.coalesce(func.sum(Job.resends), 0),
        ).group_by(Job.kind, Job.status)
        with engine_for(self.url).connect() as connection:
            return [(k, s, int(n), int(r), int(x)) for k, s, n, r, x in connection.execute(query)]

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("t2v_database_up", "Whether the job ledger could be read")
        try:
            rows = self._rows()
        except SQLAlchemyError as exc:
            log.warning("metrics: the job ledger could not be read: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counts = {(kind, str(status)): 0 for kind in self.queues for status in JobStatus}
        depth = dict.fromkeys(sorted(set(self.queues.values())), 0)
        repeats = dict.fromkeys(self.queues, 0)
        resends = dict.fromkeys(self.queues, 0)
        for kind, status, n, repeated, resent in rows:
            counts[kind, status] = n
            repeats[kind] = repeats.get(kind, 0) + repeated
            resends[kind] = resends.get(kind, 0) + resent
            if status == JobStatus.queued and kind in self.queues:
                depth[self.queues[kind]] += n
        yield _gauge("t2v_jobs", "Jobs in the ledger", ("kind", "status"), counts)
        yield _gauge(
            "t2v_queue_depth",
            "Queued jobs, as the ledger sees them, by the Celery queue their kind goes to",
            ("queue",),
            {(q,): n for q, n in depth.items()},
        )
        yield _gauge(
            "t2v_job_repeat_attempts",
            "Attempts after each job's first, summed over the ledger (its lease expired: a "
            "worker was killed or cut off; or a database error was retried)",
            ("kind",),
            {(k,): n for k, n in repeats.items()},
        )
        yield _gauge(
            "t2v_job_resends",
            "Re-sends of queued jobs whose message may have been lost, summed over the ledger",
            ("kind",),
            {(k,): n for k, n in resends.items()},
        )


def _gauge(
    name: str, documentation: str, labels: tuple[str, ...], values: Mapping[Any, int]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


@dataclass(frozen=True)
class ZooSize:
    """The zoo version a process serves."""

    content: str
    tasks: int
    experts: int


class ZooCollector(Collector):
    """``t2v_zoo_tasks``, ``t2v_zoo_experts`` and ``t2v_zoo_version_info{content}`` of the
    version being served; none of them until a version is loaded."""

    def __init__(self, served: Callable[[], ZooSize | None]) -> None:
        self.served = served

    def collect(self) -> Iterable[Metric]:
        zoo = self.served()
        if zoo is None:
            return
        yield GaugeMetricFamily("t2v_zoo_tasks", "Tasks in the zoo version served", zoo.tasks)
        yield GaugeMetricFamily("t2v_zoo_experts", "Experts in the zoo version served", zoo.experts)
        info = InfoMetricFamily("t2v_zoo_version", "The zoo version served (its content hash)")
        info.add_metric([], {"content": zoo.content})
        yield info


class DiskCollector(Collector):
    """``t2v_data_free_bytes``: the free bytes of the data directory's disk, read at each
    scrape (none when it cannot be read)."""

    def __init__(self, free_bytes: Callable[[], int | None]) -> None:
        self.free_bytes = free_bytes

    def collect(self) -> Iterable[Metric]:
        free = self.free_bytes()
        if free is not None:
            yield GaugeMetricFamily(
                "t2v_data_free_bytes", "Free bytes on the data directory's disk", free
            )


def _waiting(registry: CollectorRegistry | None) -> Gauge:
    """``t2v_http_waiting_requests``: summed over the live API processes in multiprocess
    mode."""
    return Gauge(
        "t2v_http_waiting_requests",
        "Requests waiting inside the API for their job (POST /v1/recommendations?wait=), "
        "each holding one of its key's max_waits_per_key slots",
        registry=registry,
        multiprocess_mode="livesum",
    )


class ApiMetrics:
    """What the API's ``/metrics`` answers."""

    def __init__(
        self,
        database_url: str,
        queues: Mapping[str, str],
        served: Callable[[], ZooSize | None],
        free_bytes: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        if directory := os.environ.get(multiprocess.VARIABLE):
            self.registry.register(multiprocess.merged(Path(directory)))
            self.requests = RequestMetrics(None)  # read back from every process's files
            self.waiting = _waiting(None)
        else:
            self.requests = RequestMetrics(self.registry)
            self.waiting = _waiting(self.registry)
            ProcessCollector(registry=self.registry)
        self.registry.register(LedgerCollector(database_url, queues))
        self.registry.register(ZooCollector(served))
        self.registry.register(DiskCollector(free_bytes))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks for it) and
        its media type."""
        encode, media_type = choose_encoder(accept or "")
        return encode(self.registry), media_type
