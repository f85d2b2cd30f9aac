"""Independent batches side by side on the CPU: two lanes (threads), each running its batch
on half of torch's intra-op threads (on two cores: one each).

A ResNet-34 forward and backward pass on 64 images at 64 px took 1.34 s with two intra-op
threads and 1.10 s per batch with two batches side by side on one thread each (2 cores): small
convolutions leave an intra-op team waiting on itself. What runs in a lane must not depend on
the other lanes; results come back in submission order, so what is summed from them is summed
in the same order on every run. On a GPU there is one lane. How many lanes a CPU gets, and
whether their passes run under bfloat16 autocast, is the execution plan's (``plans.py``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import torch

from app.task2vec import plans

T = TypeVar("T")
R = TypeVar("R")


class Lanes:
    """``map`` runs ``fn`` on items in up to ``count`` threads, a bounded number in flight,
    each call in the ``autocast`` context (made anew per call: autocast is per thread)."""

    def __init__(
        self,
        pool: ThreadPoolExecutor | None,
        count: int,
        autocast: Callable[[], Any] = nullcontext,
    ) -> None:
        self.pool, self.count, self.autocast = pool, count, autocast

    def _run(self, fn: Callable[[T], R], item: T) -> R:
        with self.autocast():
            return fn(item)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn(item)`` for each item, in order. At most one item more than there are lanes
        is taken from ``items`` ahead of the results (an item may hold a batch of images)."""
        if self.pool is None:
            for item in items:
                yield self._run(fn, item)
            return
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self.pool.submit(self._run, fn, item))
                if len(pending) > self.count:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


#: Lanes at most: each holds one batch's activations (and its graph) at a time, so lanes
#: multiply the embedding's memory; two give the gain on small convolutions at twice it.
MAX_LANES = 2


@contextmanager
def cpu_lanes(device: torch.device) -> Iterator[Lanes]:
    """The current execution plan's lanes, at most ``MAX_LANES``, sharing torch's intra-op
    threads (one lane on a GPU). While they run, torch's thread count is each lane's share;
    it is restored on exit."""
    plan = plans.current()
    threads = torch.get_num_threads()
    count = min(plan.lanes, MAX_LANES, threads) if device.type == "cpu" else 1
    autocast = partial(plan.autocast, device)
    if count <= 1:
        yield Lanes(None, 1, autocast)
        return
    torch.set_num_threads(threads // count)
    try:
        with ThreadPoolExecutor(count, thread_name_prefix="t2v-lane") as pool:
            yield Lanes(pool, count, autocast)
    finally:
        torch.set_num_threads(threads)


class Turnstile:
    """Lets step i pass only after step i − 1 has: for the draws from one seeded generator
    that lanes make in turn (the model labels of batch i after those of batch i − 1).

    A step that fails before its turn must still ``release`` it (in a ``finally``), or the
    steps after it would wait forever."""

    def __init__(self) -> None:
        self._passed = 0
        self._changed = threading.Condition()

    @contextmanager
    def turn(self, step: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._passed >= step)
        try:
            yield
        finally:
            self.release(step)

    def release(self, step: int) -> None:
        """Step ``step`` has passed (or never will take its turn); idempotent."""
        with self._changed:
            self._changed.wait_for(lambda: self._passed >= step)
            self._passed = max(self._passed, step + 1)
            self._changed.notify_all()
