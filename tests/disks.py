"""A filesystem of a test's own, small enough to fill for real: the kernel answers its writes
ENOSPC as it would on a full data disk, with no write faked.

It is a tmpfs mounted on a folder of the test's, which needs the right to mount (root, or
CAP_SYS_ADMIN); where that is refused the test is skipped, saying why. ``/dev/full`` answers
every write ENOSPC with no rights at all: the tests that run everywhere use it."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MiB = 1024 * 1024
#: A device whose every write fails with ENOSPC (Linux), for tests that cannot mount.
DEV_FULL = Path("/dev/full")


@contextmanager
def small_disk(folder: Path, size: int = 64 * MiB) -> Iterator[Path]:
    """``folder`` as the root of a tmpfs of ``size`` bytes for the block (unmounted after)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("a small filesystem to fill needs the mount command, which is missing")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit status {done.returncode}"
        pytest.skip(f"a small filesystem to fill needs a tmpfs mount, refused here: {reason}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the filesystem holding ``disk``: the file that holds them
    (remove it to give the space back)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (MiB, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler
