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
    max_image_pixels: int = 32 * 1024 * 1024
    max_classes: int = 1_000
    min_images_per_class: int = 2
    #: Undecodable images are skipped while they are at most this fraction of the images.
    max_skipped_fraction: float = 0.1


DEFAULT_LIMITS = ArchiveLimits()
