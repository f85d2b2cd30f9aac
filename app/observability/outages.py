"""An outage of something a loop polls (the database, most often) in a few log lines.

A loop that polls every few seconds and logs each failure with its traceback writes hundreds
of identical tracebacks while a database is down, and buries the line that says when it went
down. ``Outage`` logs one warning when the failures start, a short line at most every
``every`` seconds while they last, and one info line when the next try succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


def _short(exc: BaseException) -> str:
    """The error's type and first line: its text can run to a page (SQL, parameters)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


class Outage:
    """The state of one dependency, as seen by the loops that call it, for their log.

    ``failed(exc)`` after each failed try, ``ok()`` after each successful one; both are safe
    from several threads and cheap when nothing changes."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.what, self.every, self.clock = log, what, every, clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when the failures started, or None
        self._said = 0.0  # when the last line about them was written
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = self._said = now
                self.log.warning("%s unavailable: %s", self.what, _short(exc))
            elif now - self._said >= self.every:
                self._said = now
                self.log.warning(
                    "%s still unavailable after %.0f s (%d failed tries): %s",
                    self.what,
                    now - self._since,
                    self._failures,
                    _short(exc),
                )

    def ok(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        now = self.clock()
        with self._lock:
            if self._since is None:
                return
            self.log.info(
                "%s available again after %.0f s (%d failed tries)",
                self.what,
                now - self._since,
                self._failures,
            )
            self._since, self._failures = None, 0
