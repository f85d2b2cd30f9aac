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

from fastapi.concurrency import run_in_threadpool

from app.db.session import session_scope
from app.services import jobs
from app.services.jobs import JobState
from app.settings import Settings

FIRST_POLL = 0.1
LONGEST_POLL = 0.5
GROWTH = 1.5


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
) -> JobState:
    """The job once it has finished, at ``deadline`` (``time.monotonic``), or when the
    client has gone, whichever comes first."""
    pause = FIRST_POLL
    while True:
        job = await run_in_threadpool(_job_state, settings, job_id, tenant)
        left = deadline - time.monotonic()
        if job.finished or left <= 0 or await disconnected():
            return job
        await asyncio.sleep(min(pause, left))
        pause = min(pause * GROWTH, LONGEST_POLL)


class Waits:
    """How many requests of each key (or tenant, without keys) are waiting now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}

    @contextmanager
    def slot(self, who: str, cap: int) -> Iterator[bool]:
        """Whether ``who`` may wait now (it holds a slot for the block when it may)."""
        with self._lock:
            allowed = self._waiting.get(who, 0) < cap
            if allowed:
                self._waiting[who] = self._waiting.get(who, 0) + 1
        try:
            yield allowed
        finally:
            if allowed:
                with self._lock:
                    self._waiting[who] -= 1
                    if not self._waiting[who]:
                        del self._waiting[who]

    def waiting(self, who: str) -> int:
        with self._lock:
            return self._waiting.get(who, 0)
