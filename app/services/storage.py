"""Content-addressed files: ``<root>/<sha[:2]>/<sha256><suffix>``.

An upload streams to a name of its request's own while it is hashed and counted, and stays
there while it is checked; only when the row naming it is about to commit is it moved to its
content-addressed name (``StoredFile.keep``). Every request removes its own file when it ends,
whatever the answer (refused, replayed, failed), and nothing else: a content-addressed file may
be another request's (another tenant's, with the same bytes), so it is never unlinked by a
request; ``orphans.prune`` removes those no row holds. A reader never sees a partial file,
and the same bytes are stored once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from app.task2vec.files import atomic_write, file_digest


class UploadTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredFile:
    """An upload: where its bytes are now (``path``: the request's own name until kept) and
    the content-addressed name it is kept under (``final``)."""

    sha256: str
    path: Path
    bytes: int
    final: Path

    def keep(self) -> StoredFile:
        """Move the request's file to its content-addressed name, before the row naming it
        commits. Another request may have put the same bytes there: replacing them with the
        same bytes is harmless."""
        if self.path != self.final and self.path.exists():
            self.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, self.final)
        return replace(self, path=self.final)

    def discard(self) -> None:
        """Remove the request's own file if it is still there (the API calls this
        when the request ends); once kept, the file has left that name."""
        if self.path != self.final:
            self.path.unlink(missing_ok=True)


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
    """Write ``chunks`` under ``root``, under a name of this request's own (hidden: a file
    left by a process killed meanwhile is pruned as temporary); refuse more than ``limit``
    bytes."""
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha = digest.hexdigest()
    return StoredFile(sha, tmp, size, content_path(root, sha, suffix))


def store_file(source: Path, root: Path, suffix: str) -> Path:
    """Copy a file under ``root`` by content (idempotent); return where it is."""
    target = content_path(root, file_digest(source), suffix)
    if not target.exists():
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target
