"""The data directory's layout, in one place.

Every worker on every machine sees the same data directory (a shared volume in production), so
its sub-paths are part of the service's contract: uploads and expert weights are stored by
content, task embeddings by task id, published zoo versions by content hash, built zoos by
preset name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> DataLayout:
        return cls(settings.data_dir)

    @property
    def uploads(self) -> Path:
        """Uploaded datasets (and zoo tasks), ``<sha[:2]>/<sha256>.upload``."""
        return self.root / "uploads"

    @property
    def weights(self) -> Path:
        """Expert weight files, ``<sha[:2]>/<sha256>.pt``."""
        return self.root / "experts"

    def task_embedding(self, task_id: str) -> Path:
        """A user task's embedding."""
        return self.root / "embeddings" / f"{task_id}.npz"

    def zoo_embedding(self, key: str) -> Path:
        """A zoo task's embedding, by the task's content key."""
        return self.root / "zoo" / "embeddings" / f"{key}.npz"

    @property
    def bundles(self) -> Path:
        """Zoo bundles uploaded for import, ``<sha[:2]>/<sha256>.t2vzoo``, until imported."""
        return self.root / "bundles"

    @property
    def versions(self) -> Path:
        """Published zoo versions, one folder per content hash."""
        return self.root / "zoo" / "versions"

    def zoo(self, name: str) -> Path:
        """The configured zoo: a preset name is built under the data directory; anything
        else names a zoo folder."""
        from app.zoo.build import zoo_folder  # the zoo machinery (torch) only when asked
        from app.zoo.presets import PRESETS

        return zoo_folder(self.root, name) if name in PRESETS else Path(name)
