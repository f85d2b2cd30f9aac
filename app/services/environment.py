"""The data directory's disk, as the environment's to mend: full, over its quota, failing or
turned read-only. A write that meets one of these is neither the client's fault nor the
job's, and passes once the disk is mended, like a database outage: the API answers 503 with
Retry-After (``app.api.problems.storage_unavailable``), a worker puts the job back in the
queue and retries it with backoff (``workers.tasks``), and ``/readyz`` reports the free space
and answers not ready below ``min_free_bytes``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: What the disk, not the data, answers a write with.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The stage of a job put back in the queue until the disk takes writes again.
WAITING = "waiting for storage"


class StorageUnavailableError(Exception):
    """A write to the data directory failed for a reason of its disk (``storage_error``):
    what a worker's attempt raises for Celery to retry it."""


def storage_error(exc: BaseException) -> OSError | None:
    """The disk's error behind ``exc``: ``exc`` itself, or what it was raised from or while
    handling (archive readers and array writers wrap it); None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def raised_as_unavailable() -> Iterator[None]:
    """Any error of the block that a disk error is behind (``storage_error``), raised as
    ``StorageUnavailableError`` (from it), named by its errno."""
    try:
        yield
    except StorageUnavailableError:
        raise
    except Exception as exc:
        disk = storage_error(exc)
        if disk is None:
            raise
        raise StorageUnavailableError(errno_name(disk)) from exc


def describe(error: OSError) -> str:
    """What a client is told: the kind of trouble, never a path (they name the host's
    folders)."""
    if error.errno in _NO_SPACE:
        return "the service has no space left to store data; retry later"
    return "the service cannot write its data (a storage error); retry later"


def errno_name(error: OSError) -> str:
    """``ENOSPC`` and the like, for the logs."""
    return errno.errorcode.get(error.errno or 0, str(error.errno))


@dataclass(frozen=True)
class Space:
    """The data directory's disk as ``/readyz`` reports it."""

    free_bytes: int | None  # None: the disk could not be read
    read_only: bool

    def usable(self, min_free_bytes: int) -> bool:
        return (
            self.free_bytes is not None
            and not self.read_only
            and (self.free_bytes >= min_free_bytes)
        )


def space(data_dir: Path) -> Space:
    """The free bytes (those an unprivileged writer may use) of the disk that holds
    ``data_dir``, or of its nearest existing parent before the folder is made."""
    folder = data_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return Space(None, False)
    return Space(stats.f_bavail * stats.f_frsize, bool(stats.f_flag & os.ST_RDONLY))
