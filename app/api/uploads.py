"""Uploaded files from a multipart form into the content-addressed store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import UploadFile

from app.services.storage import UPLOAD_SUFFIX, StoredFile, UploadTooLargeError, store_stream
from app.services.uploads import too_large

CHUNK = 1024 * 1024


async def chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def store_upload(
    upload: UploadFile, root: Path, limit: int, suffix: str = UPLOAD_SUFFIX
) -> StoredFile:
    """The upload stored under ``root`` by content, or 413 past ``limit`` bytes."""
    try:
        return await store_stream(chunks(upload), root, limit, suffix)
    except UploadTooLargeError as exc:
        raise too_large(exc) from None
