"""Signals in a worker's pool processes: stopping is the main process's decision.

A terminal's Ctrl-C, systemd and a shell's ``kill -- -PGID`` signal every process of a group
at once. A pool process killed that way can die holding the lock of the pool's queue; the
main process, stopping on the same signal, then waits for that lock for ever (its task
handler's last message to the pool never goes). So a pool process ignores SIGINT and SIGQUIT,
and takes SIGTERM from its main process only: the main process ends its pool in order (warm
stop: each process finishes its job and exits; cold stop: it terminates them with SIGTERM),
and a SIGTERM from anyone else is left to the main process, which gets it too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


def leave_signals_to_the_main_process() -> None:
    """For a pool process as it starts, before it starts any thread (threads inherit the
    blocked SIGTERM, so that only the watcher takes it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no sender to tell apart: leave every SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="t2v-sigterm-watch", daemon=True).start()


def _watch(parent: int) -> None:
    """Take every SIGTERM: from the main process, end this one as SIGTERM does (the main
    process reads the exit status); from anyone else, carry on."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            return
        log.info(
            "pool process %d: SIGTERM from process %d left to the main process",
            os.getpid(),
            info.si_pid,
        )
