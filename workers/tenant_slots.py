"""Delivery slots by tenant: how many of a worker process's webhook deliveries one tenant's
may hold at once, so that one tenant's stalled receivers leave the other slots to the other
tenants (a delivery past its tenant's share waits a moment and is sent again)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class TenantSlots:
    """Slots held per tenant, in one process (its threads share them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    @contextmanager
    def hold(self, tenant: str, limit: int) -> Iterator[bool]:
        """A slot of ``tenant``'s for the block, if it holds fewer than ``limit``: whether
        it got one."""
        with self._lock:
            got = self._held[tenant] < limit
            if got:
                self._held[tenant] += 1
        try:
            yield got
        finally:
            if got:
                with self._lock:
                    self._held[tenant] -= 1
