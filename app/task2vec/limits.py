"""The caps on an uploaded dataset, in a module of its own so that the settings (and every
Alembic run that loads them) can import them without loading numpy, torch or PIL.

Standard library only: keep it that way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that keep a hostile upload from exhausting memory or time, and the least a
    classification task needs."""

    max_members: int = 200_000
    max_total_bytes: int = 4 * 1024**3
    max_member_bytes: int = 64 * 1024**2
    max_compression_ratio: float = 200.0
    #: Pixels of one image (a 4096x4096 photo; the probe sees at most a few hundred squared).
    max_image_pixels: int = 16 * 1024 * 1024
    #: Pixels of all the images of one upload, summed from their headers before decoding.
    max_total_pixels: int = 1024**3
    #: Decoded bytes per compressed byte of one image larger than ``RATIO_FLOOR_BYTES`` once
    #: decoded (photos decode to about 10x, one flat colour to about 1000x): an image that is
    #: cheap to send and expensive to decode is refused.
    max_image_ratio: float = 250.0
    #: Seconds (wall clock) the images of one upload may take to decode, resizing included.
    max_decode_seconds: float = 60.0
    max_classes: int = 1_000
    min_images_per_class: int = 2
    #: Undecodable images are skipped while they are at most this fraction of the images.
    max_skipped_fraction: float = 0.1


#: Images smaller than this once decoded are never refused for their ratio: cheap either way.
RATIO_FLOOR_BYTES = 1024**2

DEFAULT_LIMITS = ArchiveLimits()
