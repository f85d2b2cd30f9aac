"""Uploaded files from a multipart form into the content-addressed store, and their
validation on a bounded pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Request, UploadFile

from app.services import uploads
from app.services.storage import UPLOAD_SUFFIX, StoredFile, UploadTooLargeError, store_stream
from app.services.uploads import too_large
from app.settings import Settings
from app.task2vec.datasets import LabelledImages

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


async def validate(
    request: Request, settings: Settings, stored: StoredFile, filename: str, image_size: int
) -> LabelledImages:
    """``uploads.validate`` (decoding every image) on the app's validation pool: at most
    ``validation_threads`` uploads decode at once in an API process, so expensive uploads
    queue among themselves while the request threads go on answering everything else."""
    limiter: CapacityLimiter | None = getattr(request.app.state, "validation", None)

    def run() -> LabelledImages:
        return uploads.validate(
            settings=settings, stored=stored, filename=filename, image_size=image_size
        )

    return await anyio.to_thread.run_sync(run, limiter=limiter)
