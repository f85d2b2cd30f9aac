"""Uploaded files from a multipart form into the content-addressed store, held for their
request, and their validation on a bounded pool.

A route takes its upload as a dependency (``upload: DatasetUpload``): the file is stored
before the route runs, under a name of the request's own, and removed when the route has
answered or raised, before the answer is sent (``scope="function"``), unless the row naming
it took it (``StoredFile.keep``): a refused request leaves no file by the time its answer
arrives. A route lists its upload after the dependencies that may refuse the request (its
caller, its form), since dependencies are solved in the order listed: a request they refuse
stores nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, File, Request, UploadFile

from app.api.deps import SettingsDep
from app.api.shares import FairPool
from app.services import uploads
from app.services.layout import DataLayout
from app.services.storage import (
    UPLOAD_SUFFIX,
    WEIGHTS_SUFFIX,
    StoredFile,
    UploadTooLargeError,
    store_stream,
)
from app.services.uploads import too_large
from app.settings import Settings
from app.task2vec.datasets import LabelledImages
from app.zoo.bundle import SUFFIX as BUNDLE_SUFFIX

CHUNK = 1024 * 1024


async def chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@asynccontextmanager
async def held(
    upload: UploadFile, root: Path, limit: int, suffix: str = UPLOAD_SUFFIX
) -> AsyncIterator[StoredFile]:
    """The upload stored under ``root`` by content (413 past ``limit`` bytes) for the
    block; its own file is removed when the block ends, whatever the answer (a kept file
    has left that name)."""
    try:
        stored = await store_stream(chunks(upload), root, limit, suffix)
    except UploadTooLargeError as exc:
        raise too_large(exc) from None
    try:
        yield stored
    finally:
        stored.discard()


@dataclass(frozen=True)
class Dataset:
    """An uploaded dataset: its stored bytes and the name it was sent under, made safe."""

    stored: StoredFile
    filename: str


async def dataset_upload(
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="zip/tar of class folders, or .npz")],
) -> AsyncIterator[Dataset]:
    async with held(file, DataLayout.of(settings).uploads, settings.max_upload_bytes) as stored:
        yield Dataset(stored, uploads.safe_filename(file.filename))


async def bundle_upload(
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a zoo bundle (task2vec zoo export)")],
) -> AsyncIterator[StoredFile]:
    root, limit = DataLayout.of(settings).bundles, settings.max_upload_bytes
    async with held(file, root, limit, BUNDLE_SUFFIX) as stored:
        yield stored


async def weights_upload(
    settings: SettingsDep,
    weights: Annotated[
        UploadFile | None,
        File(
            description="a state_dict (safetensors, or a PyTorch file read weights_only), "
            "a TorchScript archive or an ONNX model"
        ),
    ] = None,
) -> AsyncIterator[StoredFile | None]:
    """An expert's weights when uploaded (they may be named by ``weights_uri`` instead)."""
    if weights is None:
        yield None
        return
    root, limit = DataLayout.of(settings).weights, settings.max_upload_bytes
    async with held(weights, root, limit, WEIGHTS_SUFFIX) as stored:
        yield stored


DatasetUpload = Annotated[Dataset, Depends(dataset_upload, scope="function")]
BundleUpload = Annotated[StoredFile, Depends(bundle_upload, scope="function")]
WeightsUpload = Annotated[StoredFile | None, Depends(weights_upload, scope="function")]


async def validate(
    request: Request, settings: Settings, upload: Dataset, image_size: int, tenant: str
) -> LabelledImages:
    """``uploads.validate`` (decoding every image) on the app's validation pool: at most
    ``validation_threads`` uploads decode at once in an API process, so expensive uploads
    queue while the request threads go on answering everything else; the pool is shared in
    fair shares per tenant (``app.api.shares``), so one tenant's uploads queue behind its
    own, not another's."""
    pool: FairPool | None = getattr(request.app.state, "validation", None)

    def run() -> LabelledImages:
        return uploads.validate(
            settings=settings,
            stored=upload.stored,
            filename=upload.filename,
            image_size=image_size,
        )

    if pool is None:  # the app's lifespan has not run (a bare ASGI call)
        return await anyio.to_thread.run_sync(run)
    return await pool.run(tenant, run)
