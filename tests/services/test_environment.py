"""The data directory's disk (``app.services.environment``): which errors are the disk's, found
behind the errors that wrap them, and the free space ``/readyz`` reports. ENOSPC comes from
the kernel: ``/dev/full`` everywhere, a tmpfs written to its last byte where mounting is
allowed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from app.services import environment
from app.services.environment import StorageUnavailableError, raised_as_unavailable
from app.task2vec.errors import DatasetError
from tests.disks import DEV_FULL, MiB, fill, small_disk


def _no_space() -> OSError:
    """The kernel's own ENOSPC."""
    try:
        with DEV_FULL.open("wb", buffering=0) as out:
            out.write(b"x")
    except OSError as exc:
        return exc
    raise AssertionError(f"{DEV_FULL} took a write")


def _read_archive(error: OSError) -> None:
    """As an archive reader fails: with its own error, the disk's hidden behind it."""
    try:
        raise error
    except OSError:
        raise DatasetError("cannot read the archive", "invalid-archive") from None


def test_a_full_device_is_the_disks_error_also_behind_the_errors_that_wrap_it() -> None:
    full = _no_space()
    assert full.errno == errno.ENOSPC
    assert environment.storage_error(full) is full
    with pytest.raises(DatasetError) as wrapped:
        _read_archive(full)
    assert environment.storage_error(wrapped.value) is full
    for mine in (FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "no")):
        assert environment.storage_error(mine) is None
    assert environment.storage_error(ValueError("bad data")) is None


def test_the_disks_error_is_raised_as_unavailable_and_told_without_paths() -> None:
    with pytest.raises(StorageUnavailableError, match="ENOSPC") as raised, raised_as_unavailable():
        raise _no_space()
    assert environment.storage_error(raised.value) is not None
    with pytest.raises(ValueError, match="not the disk's"), raised_as_unavailable():
        raise ValueError("not the disk's")
    told = environment.describe(OSError(errno.ENOSPC, "No space left", "/srv/data/x"))
    assert "space" in told
    assert "/srv" not in told
    assert "/srv" not in environment.describe(OSError(errno.EIO, "I/O error", "/srv/data/x"))


def test_the_free_space_is_that_of_the_disk_holding_the_folder(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size=8 * MiB) as disk:
        space = environment.space(disk / "data" / "not-made-yet")
        assert space.free_bytes is not None
        assert 7 * MiB < space.free_bytes <= 8 * MiB
        assert space.usable(MiB)
        assert not space.usable(9 * MiB)
        assert not space.read_only
        filler = fill(disk)
        assert environment.space(disk).free_bytes == 0
        assert not environment.space(disk).usable(1)
        assert environment.space(disk).usable(0)
        filler.unlink()
        assert environment.space(disk).usable(MiB)
