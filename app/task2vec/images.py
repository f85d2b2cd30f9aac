"""Decoding one untrusted image: the size in its header is checked before any pixel is
decoded, against the per-image cap, the upload's pixel budget and the decoded-to-compressed
ratio (``ArchiveLimits``); a broken file is a ``DatasetError`` whose ``kind`` names it. The
upload's decoding also has a budget of time, checked after each image."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from app.task2vec.errors import DatasetError
from app.task2vec.limits import RATIO_FLOOR_BYTES, ArchiveLimits


class PixelBudget:
    """What an upload may still decode: pixels (``max_total_pixels``), spent image by image
    from their headers before decoding, and seconds (``max_decode_seconds``), checked after
    each image, so that one upload holds a validation thread for a bounded time."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limit = self.left = limits.max_total_pixels
        self.seconds = limits.max_decode_seconds
        self.started = time.monotonic()

    def check_time(self, name: str) -> None:
        if time.monotonic() - self.started > self.seconds:
            raise DatasetError(
                f"decoding the images took longer than the budget of {self.seconds:g} s an "
                f"upload has (at {name!r}); send fewer or smaller images",
                "decode-budget-exceeded",
            )

    def spend(self, name: str, pixels: int) -> None:
        self.left -= pixels
        if self.left < 0:
            raise DatasetError(
                f"the images add up to more than {self.limit} pixels (at {name!r}); resize "
                "them first: the probe sees at most a few hundred pixels squared",
                "too-many-pixels",
            )


def decode_image(
    name: str, data: bytes, limits: ArchiveLimits, budget: PixelBudget | None = None
) -> np.ndarray:
    """Decode one image to (H, W, 1) or (H, W, 3) uint8, refusing bombs and broken files.

    The size in the image's header is checked before any pixel is decoded: against the
    per-image cap, the upload's budget, and the decoded-to-compressed ratio (no global PIL
    setting and no warning filter: decoding runs in several threads at once)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            pixels = width * height * max(frames, 1)
            if pixels > limits.max_image_pixels:
                raise DatasetError(
                    f"image {name!r} is {width}x{height} pixels"
                    f"{f' x {frames} frames' if frames > 1 else ''}, over the limit of "
                    f"{limits.max_image_pixels}",
                    "image-too-large",
                )
            decoded = pixels * len(image.getbands())
            if decoded > RATIO_FLOOR_BYTES and decoded > limits.max_image_ratio * len(data):
                raise DatasetError(
                    f"image {name!r} decodes to {decoded} bytes from {len(data)}: over "
                    f"{limits.max_image_ratio:g} times its size",
                    "compression-bomb",
                )
            if budget is not None:
                budget.spend(name, pixels)
            image.load()
            if image.mode in ("1", "L", "I;16", "I", "F"):
                array = np.asarray(image.convert("L"))[..., None]
            else:
                array = np.asarray(image.convert("RGB"))
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(
            f"image {name!r} is too large to decode safely ({exc})", "image-too-large"
        ) from exc
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(
            f"image {name!r} cannot be decoded ({exc})", "undecodable-images"
        ) from exc
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DatasetError(f"image {name!r} is empty", "undecodable-images")
    return array
