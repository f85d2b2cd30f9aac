"""Zoo bundles: a whole zoo as one archive that another deployment can import.

A bundle is a tar (gzip-compressed) whose first member, ``manifest.json``, names the format
and its version, the embedding configuration and evaluation protocol of the zoo, and the size
and sha256 of every other member:

- ``zoo.json``: the tasks' recipes and their embeddings' metadata, the experts' specs
  (weights: a member name, or a keyword of the loader such as ``imagenet`` or ``random:N``);
- ``embeddings/hessian.npy``, ``embeddings/scale.npy``: one row per task;
- ``matrix.npy``: the performance matrix (tasks × experts, float64);
- ``experts/<sha256>.pt``: the weight files of trained experts;
- ``datasets/<sha256>.upload``: the dataset files of uploaded zoo tasks, so a deployment that
  imports them can still evaluate a new expert on those tasks.

The archive is reproducible: members in a fixed order, no timestamps, owners or modes of the
machine that wrote it, and arrays in ``.npy`` (no zip dates), so the same zoo gives the same
bytes. Reading trusts nothing: a member must be a regular file with a name of the layout
above, listed in the manifest with its size and hash, and every listed member must be there;
sizes are capped from the headers before a member is written and counted again as its bytes
are written (``BundleLimits``). The records may name only members of the bundle and what this
service knows by name (``bundle_references``). What is read goes into a staging folder of the
caller's, which it discards when the bundle is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import DatasetError, Task2VecError
from app.task2vec.files import file_digest
from app.zoo.bundle_references import EXTERNAL, expert_problem, task_problem
from app.zoo.matrix import EvaluationProtocol
from app.zoo.tasks import UPLOAD
from app.zoo.zoo import Zoo, expert_from_json, task_from_json

FORMAT = "task2vec-zoo-bundle"
FORMAT_VERSION = 1
SUFFIX = ".t2vzoo"
MANIFEST = "manifest.json"
ZOO_JSON = "zoo.json"
HESSIAN = "embeddings/hessian.npy"
SCALE = "embeddings/scale.npy"
MATRIX = "matrix.npy"
FIXED_MEMBERS = (ZOO_JSON, HESSIAN, SCALE, MATRIX)
#: Stored files travel under their content's name, as the data directory keeps them.
_STORED = re.compile(r"^(experts/[0-9a-f]{64}\.pt|datasets/[0-9a-f]{64}\.upload)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(DatasetError):
    """A bundle that cannot be imported; ``kind`` is the problem type, the message says why.
    (A dataset error: a worker fails the job with its kind, as for a refused upload.)"""

    def __init__(self, message: str, kind: str = "invalid-bundle") -> None:
        super().__init__(message, kind)


#: Bytes read and written at a time while a member is extracted.
CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleLimits:
    """Caps checked from the tar headers before a member's bytes are written; the bytes in
    all are counted again as they are written, so extraction stops at the first chunk over
    ``max_total_bytes`` whatever the headers say. ``setting`` names what sets that total, for
    the refusal to say."""

    max_members: int = 100_000
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_manifest_bytes: int = 64 * 1024**2
    setting: str = "the bundle limit"

    def too_large(self) -> BundleError:
        return BundleError(
            f"the bundle expands past {self.max_total_bytes} bytes ({self.setting})",
            "bundle-too-large",
        )


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest and its zoo, whose expert weights and uploaded task
    datasets are files in the staging folder it was read into (``folder``)."""

    manifest: dict[str, Any]
    zoo: Zoo
    folder: Path

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = self.manifest["files"]
        return files


#: Embedding metadata that differs between two runs of the same computation (so that the same
#: zoo gives the same bytes): left out of bundles.
VOLATILE = frozenset({"wall_time_s"})


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _stored_file(weights: str) -> Path | None:
    """The file an expert's weights name, or None for a keyword of the loader."""
    path = Path(weights)
    if path.is_file():
        return path
    if path.is_absolute():
        raise BundleError(f"the weights file {weights} is missing", "bundle-missing-file")
    return None


def write_bundle(zoo: Zoo, out: Path) -> str:
    """Write ``zoo`` as a bundle at ``out`` (atomically); return the archive's sha256."""
    files = _members(zoo)
    manifest = json.dumps(_manifest(zoo, files), sort_keys=True, indent=1).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw_out:
            _write_tar(raw_out, [(MANIFEST, manifest), *sorted(files.items())])
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_digest(out)


def _members(zoo: Zoo) -> dict[str, Path | bytes]:
    """Every member but the manifest: the zoo's record and arrays, and the files its experts
    and uploaded tasks name, under their content's name (a deployment keeps them so too)."""
    files: dict[str, Path | bytes] = {}
    experts = []
    for spec in zoo.experts:
        raw = asdict(spec)
        source = _stored_file(spec.weights)
        if source is not None:
            raw["weights"] = f"experts/{file_digest(source)}.pt"
            files[raw["weights"]] = source
        experts.append(raw)
    tasks = []
    for task in zoo.tasks:
        raw = asdict(task)
        if task.source == UPLOAD:
            if task.dataset is None or not Path(task.dataset).is_file():
                raise BundleError(
                    f"zoo task {task.name!r}: its dataset file is missing", "bundle-missing-file"
                )
            raw["dataset"] = f"datasets/{file_digest(Path(task.dataset))}.upload"
            files[raw["dataset"]] = Path(task.dataset)
        tasks.append(raw)
    record = {
        "tasks": tasks,
        "embedding_meta": [
            {k: v for k, v in e.meta.items() if k not in VOLATILE} for e in zoo.embeddings
        ],
        "experts": experts,
    }
    files[ZOO_JSON] = json.dumps(record, sort_keys=True, indent=1).encode()
    files[HESSIAN] = _npy(np.stack([e.hessian for e in zoo.embeddings]).astype(np.float32))
    files[SCALE] = _npy(np.stack([e.scale for e in zoo.embeddings]).astype(np.float32))
    files[MATRIX] = _npy(zoo.errors.astype(np.float64))
    return files


def _manifest(zoo: Zoo, files: dict[str, Path | bytes]) -> dict[str, Any]:
    """The format, the zoo's configuration and the size and sha256 of every member, which a
    reader checks each member against as it reads."""
    listed = {}
    for name, content in sorted(files.items()):
        if isinstance(content, bytes):
            listed[name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
        else:
            listed[name] = {"sha256": file_digest(content), "bytes": content.stat().st_size}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embed_config": asdict(zoo.embed_config),
        "protocol": asdict(zoo.protocol),
        "tasks": len(zoo.tasks),
        "experts": len(zoo.experts),
        "dim": int(zoo.embeddings[0].dim) if zoo.embeddings else 0,
        "files": listed,
    }


def _write_tar(out: IO[bytes], members: list[tuple[str, Path | bytes]]) -> None:
    """A gzip'd ustar stream with no trace of when, where or by whom it was written."""
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
            info.uname = info.gname = ""
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with content.open("rb") as fh:
                    tar.addfile(info, fh)


# ------------------------------------------------------------------------------------------
# Reading


def _check_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise BundleError(f"member {name!r}: an absolute path or '..'", "bundle-unsafe-member")


def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError("not a zoo bundle (its manifest names no bundle format)", "bundle-format")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version!r}; this service reads version {FORMAT_VERSION}",
            "bundle-format",
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.match(entry["sha256"])
        and isinstance(entry.get("bytes"), int)
        and entry["bytes"] >= 0
        for entry in files.values()
    ):
        raise BundleError("the manifest's file list is malformed", "bundle-format")
    for name in files:
        _check_name(name)
        if name not in FIXED_MEMBERS and not _STORED.match(name):
            raise BundleError(f"the manifest lists {name!r}, not a bundle member", "bundle-format")
    missing = [m for m in FIXED_MEMBERS if m not in files]
    if missing:
        raise BundleError(f"the manifest lists no {', '.join(missing)}", "bundle-format")
    return manifest


@contextmanager
def _opened(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(path, mode="r|*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"not a readable bundle archive ({exc})", "bundle-corrupt") from None


def _copy_member(
    source: IO[bytes], target: Path, budget: int, limits: BundleLimits
) -> tuple[str, int]:
    """Copy a member, counting its bytes: at the first chunk past ``budget`` the partial file
    is removed and the bundle refused. Its sha256 and the bytes written."""
    digest, written = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > budget:
                out.close()
                target.unlink(missing_ok=True)
                raise limits.too_large()
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), written


def extract(path: Path, staging: Path, limits: BundleLimits | None = None) -> dict[str, Any]:
    """Every member of the bundle at ``path`` into ``staging``, each checked against the
    manifest (name, size, sha256) as it is read; return the manifest."""
    limits = limits or BundleLimits()
    manifest: dict[str, Any] | None = None
    seen: set[str] = set()
    total = 0
    with _opened(path) as tar:
        for count, member in enumerate(tar, start=1):
            name = member.name
            _check_member(member, count, seen, limits)
            seen.add(name)
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            if manifest is None:
                manifest = _read_manifest(member, source, limits)
                total = member.size
                continue
            listed = manifest["files"].get(name)
            if listed is None:
                raise BundleError(
                    f"member {name!r} is not listed in the manifest", "bundle-unlisted-member"
                )
            if total + member.size > limits.max_total_bytes:
                raise limits.too_large()
            if member.size != listed["bytes"] or member.size > limits.max_member_bytes:
                raise BundleError(
                    f"member {name!r} holds {member.size} bytes; the manifest lists "
                    f"{listed['bytes']} (at most {limits.max_member_bytes})",
                    "bundle-hash-mismatch",
                )
            budget = limits.max_total_bytes - total
            digest, written = _copy_member(source, staging / name, budget, limits)
            total += written
            if digest != listed["sha256"]:
                raise BundleError(
                    f"member {name!r} has sha256 {digest}; the manifest lists {listed['sha256']}",
                    "bundle-hash-mismatch",
                )
    if manifest is None:
        raise BundleError("an empty archive", "bundle-format")
    missing = sorted(set(manifest["files"]) - seen)
    if missing:
        raise BundleError(
            f"member {missing[0]!r} is listed in the manifest but missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            "bundle-missing-member",
        )
    return manifest


def _check_member(
    member: tarfile.TarInfo, count: int, seen: set[str], limits: BundleLimits
) -> None:
    """A member may be read: a safe name, a regular file, within the member count, once."""
    name = member.name
    _check_name(name)
    if not member.isreg():
        raise BundleError(f"member {name!r} is a link or special file", "bundle-unsafe-member")
    if count > limits.max_members:
        raise BundleError(f"more than {limits.max_members} members", "bundle-too-large")
    if name in seen:
        raise BundleError(f"member {name!r} appears twice", "bundle-unlisted-member")


def _read_manifest(
    member: tarfile.TarInfo, source: IO[bytes], limits: BundleLimits
) -> dict[str, Any]:
    """The manifest, which must come first: every later member is checked against it."""
    if member.name != MANIFEST or member.size > limits.max_manifest_bytes:
        raise BundleError(f"the first member must be {MANIFEST}", "bundle-format")
    try:
        return _check_manifest(json.loads(source.read()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not JSON ({exc})", "bundle-format") from None


def _load_array(path: Path) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path.name}: not an array ({exc})", "invalid-bundle") from None
    return array


def read_bundle(path: Path, staging: Path, limits: BundleLimits | None = None) -> Bundle:
    """The verified bundle at ``path``, its files extracted into ``staging`` (which the
    caller removes). Raises ``BundleError`` naming the first problem."""
    manifest = extract(path, staging, limits)
    files = manifest["files"]
    try:
        record = json.loads((staging / ZOO_JSON).read_text())
        config = EmbedConfig(**manifest["embed_config"])
        protocol = EvaluationProtocol(**manifest["protocol"])
        tasks = []
        for raw in record["tasks"]:
            if (problem := task_problem(raw, files)) is not None:
                raise BundleError(problem, EXTERNAL)
            if raw["source"] == UPLOAD:
                raw = {**raw, "dataset": str(staging / raw["dataset"])}
            tasks.append(task_from_json(raw))
        experts = []
        for raw in record["experts"]:
            if (problem := expert_problem(raw, files)) is not None:
                raise BundleError(problem, EXTERNAL)
            if raw["weights"] in files:
                raw = {**raw, "weights": str(staging / raw["weights"])}
            experts.append(expert_from_json(raw))
        metas = record["embedding_meta"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{ZOO_JSON} is malformed ({exc!r})") from None
    hessian, scale = _load_array(staging / HESSIAN), _load_array(staging / SCALE)
    errors = _load_array(staging / MATRIX)
    if hessian.ndim != 2 or hessian.shape != scale.shape or len(metas) != hessian.shape[0]:
        raise BundleError("the embeddings do not have one row per task")
    if not np.all(np.isfinite(errors)) or (
        errors.size and not 0 <= errors.min() <= errors.max() <= 1
    ):
        raise BundleError("the matrix holds errors outside [0, 1]")
    embeddings = [
        Embedding(h.astype(np.float32), s.astype(np.float32), dict(m))
        for h, s, m in zip(hessian, scale, metas, strict=True)
    ]
    names = [t.name for t in tasks], [e.name for e in experts]
    if any(len(set(n)) != len(n) for n in names):
        raise BundleError("two tasks or two experts share a name")
    try:
        zoo = Zoo(config, tasks, embeddings, experts, errors.astype(np.float64), protocol)
    except Task2VecError as exc:
        raise BundleError(str(exc)) from None
    return Bundle(manifest, zoo, staging)


def verify(path: Path, limits: BundleLimits | None = None) -> dict[str, Any]:
    """Check a bundle (every hash, the manifest, the zoo it holds) without keeping anything;
    return its manifest."""
    staging = Path(tempfile.mkdtemp(prefix=".bundle-"))
    try:
        return read_bundle(path, staging, limits).manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def with_files(bundle: Bundle, weights: dict[str, str], datasets: dict[str, str]) -> Zoo:
    """The bundle's zoo with its staged files replaced by where they were stored (by staged
    path); the tasks keep their recipes otherwise."""
    zoo = bundle.zoo
    experts = [replace(e, weights=weights.get(e.weights, e.weights)) for e in zoo.experts]
    tasks = [
        replace(t, dataset=datasets[t.dataset]) if t.dataset in datasets else t for t in zoo.tasks
    ]
    return Zoo(zoo.embed_config, tasks, zoo.embeddings, experts, zoo.errors, zoo.protocol)
