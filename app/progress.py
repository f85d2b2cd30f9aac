"""Progress of long steps (zoo build, zoo evaluate, embed, first start) on the console.

Computations report through a ``progress(stage, done, total)`` callback and know nothing of
how it is shown; ``ProgressReporter`` is that callback: bars on a terminal, plain lines in logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Where progress goes when no console is given: standard error, so stdout stays the result.
err = Console(stderr=True)


def _duration(seconds: float) -> str:
    """Elapsed time: ``42s``, ``1m40s``, ``2h05m``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _estimate(seconds: float) -> str:
    """A time estimate, rounded to what is worth knowing: ``40s``, ``18m``, ``2h05m``."""
    if seconds < 59.5:
        return f"{max(0, round(seconds))}s"
    m = round(seconds / 60)
    return f"{m}m" if m < 60 else f"{m // 60}h{m % 60:02d}m"


@dataclass
class _Stage:
    """One stage's run, in the plain (non-terminal) display."""

    total: int
    started: float  # clock when the stage (re)started
    done_at_start: int  # items already done at its first report
    done: int = -1  # last reported count
    printed_at: float = -math.inf  # clock of its last printed line
    printed_tenth: int = -1  # 10%-step of its last printed line
    task: TaskID | None = None  # its bar, in the terminal display


class ProgressReporter:
    """Progress of long steps on the error console, as a context manager and callback::

        with ProgressReporter(quiet) as progress:
            embedding = embed(data, config, progress=progress)

    The reporter is the ``progress(stage, done, total)`` callback the computations take.
    ``stage`` may carry a free-text detail after ``": "`` (``"experts: training cnn-16x3"``):
    the text before the first ``": "`` is the stage key, the whole text its description.
    A stage restarts when its total changes or its count goes back; stages may interleave.

    - on an interactive terminal: one rich bar per stage key with its description, done/total,
      elapsed time and an estimate of the time left;
    - otherwise (CI logs, output piped to a file): plain lines such as
      ``tasks 12/150 (8%), 1m40s elapsed, about 18m left``, printed when a stage starts,
      when it finishes, and in between only when another 10% is done or ``interval``
      seconds (10) have passed since the stage's last line. The estimate is
      elapsed / items done × items left, counting from the stage's first report; there is
      none before an item is done, and a finished stage ends with ``done``.
    - quiet: nothing at all.
    """

    def __init__(
        self,
        quiet: bool = False,
        console: Console | None = None,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet = quiet
        self.console = console if console is not None else err
        self.interval = interval
        self.clock = clock
        self._stages: dict[str, _Stage] = {}
        self._bars: Progress | None = None
        if not quiet and self.console.is_terminal and not self.console.is_dumb_terminal:
            self._bars = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )

    def __enter__(self) -> Self:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        key = stage.split(": ", 1)[0]
        now = self.clock()
        state = self._stages.get(key)
        restart = state is None or total != state.total or done < state.done
        if state is None or restart:
            state = self._stages[key] = _Stage(
                total=total,
                started=now,
                done_at_start=done,
                task=state.task if state is not None else None,
            )
        if self._bars is not None:
            if state.task is None:
                state.task = self._bars.add_task(stage, total=total, completed=done)
            elif restart:
                self._bars.reset(state.task, total=total, completed=done, description=stage)
            else:
                self._bars.update(state.task, completed=done, description=stage)
            state.done = done
            return
        finished = done >= total
        tenth = 10 if total <= 0 else min(10, done * 10 // total)
        repeat = done == state.done
        state.done = done
        if not (
            restart
            or (finished and not repeat)
            or tenth > state.printed_tenth
            or (now - state.printed_at >= self.interval and not finished)
        ):
            return
        state.printed_at, state.printed_tenth = now, tenth
        self.console.print(
            self._line(stage, state, now), markup=False, highlight=False, soft_wrap=True
        )

    @staticmethod
    def _line(stage: str, state: _Stage, now: float) -> str:
        done, total = state.done, state.total
        percent = 100 if total <= 0 else min(100, done * 100 // total)
        elapsed = now - state.started
        line = f"{stage} {done}/{total} ({percent}%), {_duration(elapsed)} elapsed"
        counted = done - state.done_at_start
        if done >= total:
            return f"{line}, done"
        if counted > 0 and elapsed > 0:
            line += f", about {_estimate(elapsed / counted * (total - done))} left"
        return line
