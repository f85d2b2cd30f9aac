"""A pool of threads shared fairly among tenants: one tenant holds at most its share of the
threads at once, and a freed thread goes to the waiting tenant that holds the fewest (among
equals, the one whose request came first). A tenant sending many expensive uploads then waits
behind its own, never another tenant behind them.

Slots are granted on the event loop that asks for them (no locks: the loop is one thread), and
the work runs on the pool's own threads, apart from the request threads."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio import CapacityLimiter

T = TypeVar("T")


@dataclass(eq=False)
class _Waiter:
    tenant: str
    granted: anyio.Event = field(default_factory=anyio.Event)


class FairPool:
    def __init__(self, size: int, per_tenant: int) -> None:
        self.size, self.per_tenant = size, max(1, min(per_tenant, size))
        self.held: Counter[str] = Counter()
        self._waiting: list[_Waiter] = []  # in the order they came
        self._threads = CapacityLimiter(size)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(self.held.values())

    async def run(self, tenant: str, work: Callable[[], T]) -> T:
        """``work()`` on one of the pool's threads once ``tenant`` is granted a slot."""
        async with self.slot(tenant):
            return await anyio.to_thread.run_sync(work, limiter=self._threads)

    @asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        waiter = _Waiter(tenant)
        self._waiting.append(waiter)
        self._grant()
        try:
            await waiter.granted.wait()
        except BaseException:  # cancelled while waiting, or just as the slot came
            if waiter.granted.is_set():
                self._release(tenant)
            else:
                self._waiting.remove(waiter)
            raise
        try:
            yield
        finally:
            self._release(tenant)

    def _release(self, tenant: str) -> None:
        self.held[tenant] -= 1
        if self.held[tenant] <= 0:
            del self.held[tenant]
        self._grant()

    def _grant(self) -> None:
        while self.running < self.size:
            eligible = [w for w in self._waiting if self.held[w.tenant] < self.per_tenant]
            if not eligible:
                return
            chosen = min(eligible, key=lambda w: self.held[w.tenant])  # the first among equals
            self._waiting.remove(chosen)
            self.held[chosen.tenant] += 1
            chosen.granted.set()
