"""The data directory's layout, in one place.

Every process either sees the same data directory (a shared volume) or keeps its own as a
cache of the object store (``app.services.objects``), so its sub-paths are part of the
service's contract: uploads, expert weights and bundles are stored by content, task
embeddings by task id, zoo task embeddings by the task's content key, published zoo versions
by content hash, built zoos by preset name. The shared ones are also the object store's keys
(``key``, ``at``): a path a row records names its file wherever the directory is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.settings import Settings

#: The shared sub-paths, as patterns of a key: three stored by content (the file name is the
#: sha256 of its bytes), task and zoo task embeddings, and published zoo versions (folders).
_CONTENT = re.compile(r"^(uploads|experts|bundles)/[0-9a-f]{2}/(?P<sha>[0-9a-f]{64})\.[a-z0-9]+$")
_NAMED = re.compile(r"^(zoo/)?embeddings/[^/.][^/]*\.npz$")
_VERSION = re.compile(r"^zoo/versions/[0-9a-f]{8,64}$")
#: How many trailing parts of a path each kind of key has.
_KEY_PARTS = (3, 2)


def content_sha(key: str) -> str | None:
    """The sha256 a content-addressed key names its bytes by; None for any other key."""
    found = _CONTENT.match(key)
    return None if found is None else found.group("sha")


def is_folder(key: str) -> bool:
    """Whether the key names a folder (a published zoo version) rather than a file."""
    return _VERSION.match(key) is not None


def _shared(key: str) -> bool:
    return any(p.match(key) for p in (_CONTENT, _NAMED, _VERSION))


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

    def key(self, path: str | Path) -> str | None:
        """The shared key of a path a row recorded, whichever process's data directory it is
        under (found by its trailing parts); None for anything else (a URL, a keyword, a
        file of the operator's)."""
        parts = PurePosixPath(str(path)).parts
        for count in _KEY_PARTS:
            key = "/".join(parts[-count:])
            if len(parts) >= count and _shared(key):
                return key
        return None

    def at(self, key: str) -> Path:
        """Where the key's file or folder lies in this data directory."""
        return self.root.joinpath(*key.split("/"))

    def zoo(self, name: str) -> Path:
        """The configured zoo: a preset name is built under the data directory; anything
        else names a zoo folder."""
        from app.zoo.build import zoo_folder  # the zoo machinery (torch) only when asked
        from app.zoo.presets import PRESETS

        return zoo_folder(self.root, name) if name in PRESETS else Path(name)
