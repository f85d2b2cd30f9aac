"""Content-addressed files: ``<root>/<sha[:2]>/<sha256><suffix>``.

A file streams to a temporary name in the same folder while it is hashed and counted; only a
complete one is renamed into place, so a reader never sees a partial file and the same bytes
are stored once, whoever sends them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from app.task2vec.files import atomic_write


class UploadTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    path: Path
    bytes: int


#: Stored uploads share one suffix: the format is sniffed from the bytes, so the same bytes
#: are one file whatever name they were sent under.
UPLOAD_SUFFIX = ".upload"
#: Expert weights (a state_dict).
WEIGHTS_SUFFIX = ".pt"


def content_path(root: Path, sha256: str, suffix: str) -> Path:
    return root / sha256[:2] / f"{sha256}{suffix}"


async def store_stream(
    chunks: AsyncIterator[bytes],
    root: Path,
    limit: int,
    suffix: str = UPLOAD_SUFFIX,
) -> StoredFile:
    """Write ``chunks`` under ``root`` by content; refuse more than ``limit`` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadTooLargeError(limit)
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        final = content_path(root, sha, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return StoredFile(sha, final, size)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_file(source: Path, root: Path, suffix: str) -> Path:
    """Copy a file under ``root`` by content (idempotent); return where it is."""
    target = content_path(root, file_digest(source), suffix)
    if not target.exists():
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target
