"""Multipart uploads that stream from a path or bytes and report their progress."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, cast

Dataset = str | Path | bytes
#: ``progress(sent, total)`` while an upload streams.
UploadProgress = Callable[[int, int], None]


class _Counted(io.RawIOBase):
    """A file that reports how much of it has been read (the multipart body streams it)."""

    def __init__(self, raw: IO[bytes], progress: UploadProgress | None) -> None:
        self.raw, self.progress, self.sent = raw, progress, 0
        self.total = raw.seek(0, os.SEEK_END)
        raw.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.raw.seek(offset, whence)
        self.sent = position
        return position

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sent += len(chunk)
        if self.progress is not None and chunk:
            self.progress(min(self.sent, self.total), self.total)
        return chunk


Files = dict[str, tuple[str, IO[bytes]]]
#: What to upload: the file, its name (else the path's), a progress callback, the form field.
Upload = tuple[Dataset, str | None, UploadProgress | None, str]


@contextmanager
def upload_files(
    dataset: Dataset, filename: str | None, progress: UploadProgress | None, field: str
) -> Iterator[Files]:
    """The multipart ``files`` of one upload, open while the request is made."""
    with ExitStack() as stack:
        if isinstance(dataset, bytes):
            raw: IO[bytes] = io.BytesIO(dataset)
            name = filename or "dataset"
        else:
            raw = stack.enter_context(Path(dataset).open("rb"))
            name = filename or Path(dataset).name
        yield {field: (name, cast(IO[bytes], _Counted(raw, progress)))}
