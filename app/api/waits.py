"""Waiting for a job inside a request (``POST /v1/recommendations?wait=``).

A wait polls the job in short transactions of its own, backing off from 0.1 s to 0.5 s between
polls (an embedding takes seconds, and a longer pause would be added, up to its length, to the
answer's time; a poll is one indexed read); it ends when the job does, at the deadline, or as
soon as the client has gone. Each key may have
``max_waits_per_key`` requests waiting at once; past that a request answers at once with its
job (202 and a Location to follow), as with ``wait=0``, so abandoned or piled-up waits cannot
hold the API's workers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from fastapi.concurrency import run_in_threadpool

from app.db.session import session_scope
from app.services import jobs
from app.services.jobs import JobState
from app.settings import Settings

FIRST_POLL = 0.1
LONGEST_POLL = 0.5
GROWTH = 1.5


class Clock(Protocol):
    """Where a wait reads the time and pauses: the monotonic clock in the service; a test
    passes one that advances only when the wait pauses, and so sees every pause exactly."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


MONOTONIC = MonotonicClock()


def _job_state(settings: Settings, job_id: str, tenant: str) -> JobState:
    """A short transaction of its own: a wait holds no connection between polls."""
    with session_scope(settings.resolved_database_url()) as session:
        return jobs.state(session, job_id=job_id, tenant=tenant)


async def wait_for(
    settings: Settings,
    job_id: str,
    tenant: str,
    deadline: float,
    disconnected: Callable[[], Awaitable[bool]],
    clock: Clock = MONOTONIC,
) -> JobState:
    """The job once it has finished, at ``deadline`` (on ``clock``), or when the client has
    gone, whichever comes first."""
    pause = FIRST_POLL
    while True:
        job = await run_in_threadpool(_job_state, settings, job_id, tenant)
        left = deadline - clock.now()
        if job.finished or left <= 0 or await disconnected():
            return job
        await clock.sleep(min(pause, left))
        pause = min(pause * GROWTH, LONGEST_POLL)


class Gauge(Protocol):
    def inc(self) -> None: ...

    def dec(self) -> None: ...


class Waits:
    """How many requests of each key (or tenant, without keys) are waiting now; their total
    is also kept on ``gauge`` (the operators' ``t2v_http_waiting_requests``)."""

    def __init__(self, gauge: Gauge | None = None) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._gauge = gauge

    @contextmanager
    def slot(self, who: str, cap: int) -> Iterator[bool]:
        """Whether ``who`` may wait now (it holds a slot for the block when it may)."""
        with self._lock:
            allowed = self._waiting.get(who, 0) < cap
            if allowed:
                self._waiting[who] = self._waiting.get(who, 0) + 1
                if self._gauge is not None:
                    self._gauge.inc()
        try:
            yield allowed
        finally:
            if allowed:
                with self._lock:
                    self._waiting[who] -= 1
                    if not self._waiting[who]:
                        del self._waiting[who]
                    if self._gauge is not None:
                        self._gauge.dec()

    def waiting(self, who: str) -> int:
        with self._lock:
            return self._waiting.get(who, 0)
