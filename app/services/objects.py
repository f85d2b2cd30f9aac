"""The object store: what processes that share no folder share instead.

With ``T2V_STORAGE_URL`` unset, every process sees one data directory (a shared volume) and
nothing here does anything: ``share`` is a no-op and ``local`` answers the path a row
recorded. With ``T2V_STORAGE_URL=s3://bucket/prefix`` the store is the shared truth and each
process's data directory only its private cache. A writer puts a file (or a zoo version's
folder) under its layout key (``DataLayout.key``) after writing it locally and before the row
naming it commits, so whoever reads the row finds the object; a reader maps the path a row
recorded (under the writer's own data directory) to the same key under its own, and fetches
it there on a miss: into a temporary name, checked against the sha256 its key names when
stored by content, then renamed, so a reader never sees a partial file.

Errors are ``OSError``: an unreachable store is ``EIO`` (the API answers 503 and a worker
retries, as for a failing disk: ``app.services.environment``), a missing object
``ENOENT``; each names the key and the store.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from app.services.layout import DataLayout, content_sha, is_folder
from app.services.versions import Version
from app.settings import Settings
from app.task2vec.files import file_digest
from app.zoo.experts import ExpertSpec
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import Zoo

#: Answers of S3 that mean the object (or bucket) is not there.
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
#: A folder's file written last, so a folder with it is whole (``Zoo.save``'s manifest).
FOLDER_MARKER = "zoo.json"


class ObjectStoreError(OSError):
    """The store failed on ``key``: unreachable, refusing, or answering other bytes."""

    def __init__(self, code: int, key: str, where: str, why: str) -> None:
        super().__init__(code, f"object {key!r} in {where}: {why}")
        self.key, self.where = key, where

    def __str__(self) -> str:
        return str(self.strerror)


class ObjectMissingError(ObjectStoreError, FileNotFoundError):
    """No object under the key."""


def parse_url(url: str) -> tuple[str, str]:
    """The bucket and key prefix (ending in ``/`` unless empty) of ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"storage URL {url!r} is not of the form s3://bucket/prefix")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class ObjectStore:
    """One bucket and prefix of an S3-compatible store, by key (relative to the prefix).
    Credentials and region come from boto3's chain (``AWS_ACCESS_KEY_ID`` and the rest)."""

    def __init__(self, url: str, endpoint_url: str = "") -> None:
        self.bucket, self.prefix = parse_url(url)
        self.where = f"s3://{self.bucket}/{self.prefix} at {endpoint_url or 'AWS S3'}"
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
        )
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config
        )

    def _failed(self, key: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return ObjectMissingError(errno.ENOENT, key, self.where, "no such object")
            return ObjectStoreError(errno.EIO, key, self.where, f"the store answered {code}")
        return ObjectStoreError(errno.EIO, key, self.where, f"the store is unreachable ({exc})")

    def put(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            failed = self._failed(key, exc)
            if isinstance(failed, ObjectMissingError):
                return False
            raise failed from exc
        return True

    def get(self, key: str, dest: Path, sha256: str | None = None) -> Path:
        """The object at ``dest``, written under a temporary name and renamed; refused (and
        nothing left) when ``sha256`` is given and the bytes do not have it."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".fetch-", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            try:
                self.client.download_file(self.bucket, self.prefix + key, name)
            except (BotoCoreError, ClientError) as exc:
                raise self._failed(key, exc) from exc
            if sha256 is not None and (got := file_digest(tmp)) != sha256:
                why = f"its bytes have sha256 {got}, not the {sha256} its key names"
                raise ObjectStoreError(errno.EBADMSG, key, self.where, why)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def keys(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """The keys under ``prefix``, each with when it was last written."""
        pages = self.client.get_paginator("list_objects_v2")
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :], item["LastModified"]
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(prefix, exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(key, exc) from exc

    def check(self) -> None:
        """Raise unless the bucket answers (``/readyz``)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("", exc) from exc


@functools.lru_cache(maxsize=8)
def _store(url: str, endpoint_url: str, pid: int) -> ObjectStore:
    return ObjectStore(url, endpoint_url)


def store_of(settings: Settings) -> ObjectStore | None:
    """The configured store (one client per process: a forked worker makes its own)."""
    if not settings.storage_url:
        return None
    return _store(settings.storage_url, settings.s3_endpoint_url, os.getpid())


def share(settings: Settings, path: Path) -> None:
    """Put the file or folder at ``path`` (under this data directory's layout) in the store;
    a folder's marker goes last. Nothing without a store."""
    store = store_of(settings)
    if store is None:
        return
    key = _key(settings, path)
    if not path.is_dir():
        store.put(key, path)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(path).as_posix() == FOLDER_MARKER)
    for file in files:
        store.put(f"{key}/{file.relative_to(path).as_posix()}", file)


def forget(settings: Settings, path: Path) -> None:
    """Remove the object (or folder) of ``path`` from the store, if there is one."""
    store = store_of(settings)
    if store is None:
        return
    key = _key(settings, path)
    if is_folder(key):
        for name, _ in list(store.keys(f"{key}/")):
            store.delete(name)
    else:
        store.delete(key)


def _key(settings: Settings, path: Path) -> str:
    key = DataLayout.of(settings).key(path)
    if key is None:
        raise ValueError(f"{path} is not a file the data directory's layout shares")
    return key


def local(settings: Settings, recorded: str | Path) -> Path:
    """This process's copy of what a row recorded at ``recorded``: the path itself without a
    store, or for anything the layout does not share (a URL, a keyword, an operator's file);
    else the same key under this data directory, fetched on a miss."""
    store = store_of(settings)
    layout = DataLayout.of(settings)
    key = None if store is None else layout.key(recorded)
    if store is None or key is None:
        return Path(recorded)
    here = layout.at(key)
    if is_folder(key):
        return here if (here / FOLDER_MARKER).is_file() else _fetch_folder(store, key, here)
    return here if here.is_file() else store.get(key, here, content_sha(key))


def _fetch_folder(store: ObjectStore, key: str, here: Path) -> Path:
    """A folder's objects into a private folder beside ``here``, renamed into place once
    whole (a concurrent fetch's rename may win: the same bytes)."""
    names = [name for name, _ in store.keys(f"{key}/")]
    if f"{key}/{FOLDER_MARKER}" not in names:
        raise ObjectMissingError(errno.ENOENT, f"{key}/{FOLDER_MARKER}", store.where, "missing")
    here.parent.mkdir(parents=True, exist_ok=True)
    tmp = here.with_name(f".{here.name}.{uuid.uuid4().hex}")
    try:
        for name in names:
            store.get(name, tmp.joinpath(*name[len(key) + 1 :].split("/")))
        try:
            os.rename(tmp, here)
        except OSError:
            if not (here / FOLDER_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return here


def local_expert(settings: Settings, spec: ExpertSpec) -> ExpertSpec:
    """The expert with its stored weights (if any) at this process's copy."""
    if store_of(settings) is None:
        return spec
    return replace(spec, weights=str(local(settings, spec.weights)))


def local_task(settings: Settings, spec: TaskSpec) -> TaskSpec:
    """The zoo task with its uploaded dataset (if any) at this process's copy."""
    if store_of(settings) is None or spec.dataset is None:
        return spec
    return replace(spec, dataset=str(local(settings, spec.dataset)))


def local_version(settings: Settings, version: Version) -> Version:
    """The published version with its folder at this process's copy."""
    if store_of(settings) is None:
        return version
    return replace(version, folder=local(settings, version.folder))


def load_zoo(settings: Settings, version: Version) -> Zoo:
    """The published zoo version from this process's copy, its experts' stored weights and
    uploaded tasks' datasets too (its manifest names them under its publisher's directory)."""
    zoo = Zoo.load(local_version(settings, version).folder)
    if store_of(settings) is None:
        return zoo
    experts = [local_expert(settings, e) for e in zoo.experts]
    return replace(zoo, experts=experts, tasks=[local_task(settings, t) for t in zoo.tasks])


def prune_versions(
    settings: Settings, keep: set[str], named: set[str], orphan_seconds: float
) -> int:
    """Remove from the store the zoo versions (by content hash) not in ``keep``: those a row
    names, and those none does once their newest object is ``orphan_seconds`` old (a publisher
    died before committing its row). How many went."""
    store = store_of(settings)
    if store is None:
        return 0
    folders: dict[str, list[tuple[str, datetime]]] = {}
    for key, modified in store.keys("zoo/versions/"):
        folders.setdefault(key.split("/")[2], []).append((key, modified))
    cutoff = time.time() - orphan_seconds
    gone = 0
    for content, found in folders.items():
        young = max(m for _, m in found).timestamp() > cutoff
        if content in keep or (content not in named and young):
            continue
        for key, _ in found:
            store.delete(key)
        gone += 1
    return gone
