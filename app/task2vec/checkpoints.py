"""A way to stop a long computation between two of its steps, for whoever runs it.

The computations call ``checkpoint()`` at every step (each batch of images: ``iter_batches``),
which calls the hook their caller installed with ``checking``, if any; the hook raises to stop
the computation there, and the computation knows nothing of why. A worker's job installs one
that raises once the job's lease is lost, so that an attempt another worker took over stops
within a batch instead of computing on, holding its slot, to a result it may not write.

The hook is a context variable: it holds in the thread (or task) that installed it, and a
step that runs on another thread (a pool's lane) is checked where its results are gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Hook = Callable[[], None]

_HOOK: ContextVar[Hook | None] = ContextVar("t2v_checkpoint_hook", default=None)


@contextmanager
def checking(hook: Hook) -> Iterator[None]:
    """Call ``hook`` at every ``checkpoint()`` of the block (the innermost hook wins)."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def checkpoint() -> None:
    """A step of a computation is done: the hook installed, if any, may stop it here."""
    hook = _HOOK.get()
    if hook is not None:
        hook()
