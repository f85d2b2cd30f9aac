"""The index a zoo gets: flat and exact below ``COMPRESSED_FROM`` tasks, compressed above.

Below the threshold nothing changes from the flat index (same rows, version and results).
From it on, the rows are read from a store file: the zoo's own, when its embeddings are the
consecutive rows of one memory-mapped ``.npy`` (a synthetic or imported large zoo), whose
digest was taken when it was written; otherwise the embeddings are written, chunk by chunk, to
``index_rows.npy`` beside the index (``STORE_DTYPE``) and named by a hash streamed over them,
which for rows already in RAM costs one pass.
A zoo that grows past the threshold is a new version, so its index is built anew, compressed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from app.task2vec.embedding import Embedding
from app.zoo.index import IndexVersion, TaskIndex
from app.zoo.index_store import file_digest, open_rows, power_of_two_factor, write_rows

#: From this many tasks a zoo's index is the compressed kind. The flat kind holds 4·dim bytes
#: per task twice (raw and transformed: 336 KB at 42k dims), 16 GB at 50k tasks.
COMPRESSED_FROM = 50_000
INDEX_FILE = "index.npz"
STORE_FILE = "index_rows.npy"
#: The rows a zoo's own embeddings are written as. float32, as the embeddings are: float16
#: halves the disk but moves distances enough to reorder near ties (on the starter zoo, 6 of
#: 51 tasks' 10 nearest came in another order and 1-nn changed its pick for 17% of queries).
STORE_DTYPE = "float32"
_CHUNK = 1024


def backing_store(embeddings: Sequence[Embedding]) -> Path | None:
    """The ``.npy`` whose rows, in order, the embeddings' hessians are (memory-mapped), if any."""
    if not embeddings:
        return None
    parent = embeddings[0].hessian.base
    if not isinstance(parent, np.memmap) or parent.ndim != 2 or not parent.filename:
        return None
    if parent.shape[0] != len(embeddings) or not parent.flags.c_contiguous:
        return None
    start = parent.__array_interface__["data"][0]
    step = parent.strides[0]
    for i, e in enumerate(embeddings):
        h = e.hessian
        if h.base is not parent or h.__array_interface__["data"][0] != start + i * step:
            return None
    path = Path(parent.filename)
    whole = open_rows(path)
    if whole is None or whole.shape != parent.shape or whole.dtype != parent.dtype:
        return None
    return path


def _chunks(embeddings: Sequence[Embedding], factor: float = 1.0) -> Iterator[np.ndarray]:
    for start in range(0, len(embeddings), _CHUNK):
        block = np.stack([e.hessian for e in embeddings[start : start + _CHUNK]])
        yield block.astype(np.float32) * np.float32(factor)


def streamed_version(probe: str, embeddings: Sequence[Embedding]) -> IndexVersion:
    """``IndexVersion.of`` over the stacked rows, without stacking them."""
    digest = hashlib.sha256(np.arange(len(embeddings), dtype=np.int64).tobytes())
    for block in _chunks(embeddings):
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return IndexVersion(probe, embeddings[0].dim, len(embeddings), digest.hexdigest())


def _flat(probe: str, embeddings: Sequence[Embedding], path: Path | None) -> TaskIndex:
    entries = list(enumerate(embeddings))
    hessians = np.stack([e.hessian for e in embeddings])
    expected = IndexVersion.of(probe, np.arange(len(entries)), hessians)
    index = None if path is None else TaskIndex.load(path, expected, embeddings)
    if index is None:
        index = TaskIndex.build(probe, entries)
        if path is not None:
            index.save(path)
    return index


def _written_store(embeddings: Sequence[Embedding], folder: Path) -> tuple[Path, float]:
    factor = 1.0
    if STORE_DTYPE == "float16":
        factor = power_of_two_factor(max(float(np.max(block)) for block in _chunks(embeddings)))
    store = folder / STORE_FILE
    count, dim = len(embeddings), embeddings[0].dim
    write_rows(store, _chunks(embeddings, factor), count, dim, STORE_DTYPE)
    return store, factor


def _compressed(probe: str, embeddings: Sequence[Embedding], folder: Path | None) -> TaskIndex:
    path = None if folder is None else folder / INDEX_FILE
    ids = np.arange(len(embeddings), dtype=np.int64)
    store = backing_store(embeddings)
    if store is not None:
        expected = IndexVersion.of_store(probe, ids, embeddings[0].dim, file_digest(store), 1.0)
    else:
        expected = streamed_version(probe, embeddings)
    index = None if path is None else TaskIndex.load(path, expected)
    if index is not None:
        return index
    if store is not None:
        index = TaskIndex.build_compressed(probe, ids, store)
    else:
        where = folder if folder is not None else Path(tempfile.mkdtemp(prefix="t2v-index-"))
        written, factor = _written_store(embeddings, where)
        index = TaskIndex.build_compressed(probe, ids, written, factor, version=expected)
        if folder is None:
            weakref.finalize(index, shutil.rmtree, where, True)
    if path is not None:
        index.save(path)
    return index


def zoo_index(
    probe: str,
    embeddings: Sequence[Embedding],
    folder: Path | None,
    compressed_from: int | None = None,
) -> TaskIndex:
    """The zoo's index: loaded from ``folder`` when current, else built (and saved there)."""
    threshold = COMPRESSED_FROM if compressed_from is None else compressed_from
    if len(embeddings) < threshold:
        return _flat(probe, embeddings, None if folder is None else folder / INDEX_FILE)
    return _compressed(probe, embeddings, folder)
