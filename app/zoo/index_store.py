"""The row store of a large task index: one ``.npy`` file of embeddings, read memory-mapped.

At a million tasks the embeddings do not fit in RAM (17k float16 values per task are 34 GB),
so the exact re-rank reads its few hundred candidate rows from the page cache or the disk.
The file is written chunk by chunk and hashed as it is written; the digest is kept beside it
(``<name>.sha256``: size, mtime and digest), so that a later load can name the rows it serves
without reading 34 GB again, and a file changed since (other size or mtime) is hashed anew.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from app.task2vec.errors import EmbeddingFileError

#: float16 tops out at 65504: stores are written with a power-of-two factor that keeps every
#: value below this (an exact rescaling, which the symmetric distance ignores when both sides
#: carry it).
FLOAT16_CEILING = 60_000.0
_READ = 1 << 24


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remember(path: Path, digest: str) -> None:
    _sidecar(path).write_text(json.dumps({**_stamp(path), "sha256": digest}))


def file_digest(path: Path) -> str:
    """sha256 of the file, from its sidecar when the file is unchanged since it was hashed."""
    try:
        saved = json.loads(_sidecar(path).read_text())
        if {k: saved[k] for k in ("size", "mtime_ns")} == _stamp(path):
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_READ):
            digest.update(block)
    _remember(path, digest.hexdigest())
    return digest.hexdigest()


def write_rows(path: Path, chunks: Iterable[np.ndarray], count: int, dim: int, dtype: str) -> str:
    """Write ``count`` rows of ``dim`` values, arriving in chunks, to the ``.npy`` at
    ``path`` (atomically: a temporary name renamed into place); returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(count, dim))
    try:
        offset = int(rows.offset)
        with tmp.open("rb") as fh:
            digest = hashlib.sha256(fh.read(offset))
        done = 0
        for chunk in chunks:
            block = np.ascontiguousarray(chunk, dtype=rows.dtype)
            if block.ndim != 2 or block.shape[1] != dim or done + len(block) > count:
                raise EmbeddingFileError(f"row store chunk of shape {block.shape} after {done}")
            rows[done : done + len(block)] = block
            digest.update(block.tobytes())
            done += len(block)
        if done != count:
            raise EmbeddingFileError(f"row store got {done} rows, {count} were announced")
        rows.flush()
        del rows
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember(path, digest.hexdigest())
    return digest.hexdigest()


def open_rows(path: Path, count: int | None = None, dim: int | None = None) -> np.memmap | None:
    """The store memory-mapped read-only, or None when it is missing, truncated, or not of
    ``count`` rows of ``dim`` values."""
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(rows, np.memmap) or rows.ndim != 2:
        return None
    if (count is not None and rows.shape[0] != count) or (dim is not None and rows.shape[1] != dim):
        return None
    return rows


def power_of_two_factor(peak: float) -> float:
    """The power of two that brings ``peak`` to just under ``FLOAT16_CEILING``."""
    if not np.isfinite(peak) or peak <= 0:
        return 1.0
    return float(2.0 ** np.floor(np.log2(FLOAT16_CEILING / peak)))


def read_at_random(rows: np.ndarray) -> None:
    """Tell the kernel that ``rows`` (a memmap) is read a few rows at a time, in no order:
    without it every fault reads ahead, and a re-rank of 200 rows of a store that is not in
    the page cache reads hundreds of megabytes."""
    mapped = getattr(rows, "_mmap", None)
    if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
