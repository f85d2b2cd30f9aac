"""Labelled image datasets: decoding, validation and batching for the probe.

Accepted inputs (the formats users upload):

* a zip or tar(.gz) archive of class folders, ``<label>/<image file>`` (one common top-level
  folder around them is allowed and ignored);
* a zip or tar(.gz) archive with a ``labels.csv`` manifest (header ``path,label``; paths are
  relative to the manifest's folder);
* an ``.npz`` file with ``x`` (N,H,W or N,H,W,C uint8, C = 1 or 3) and ``y`` (N labels).

The format is sniffed from the bytes, never taken from the file name. Archives are read member
by member in memory: nothing is extracted and no member name is ever used as a filesystem path.
Member count, total size, compression ratio, pixels per image, classes and images per class are
capped (``ArchiveLimits``); links, devices, duplicate or unsafe names are refused; members that
are not images (or nested archives, never opened) and images that do not decode are skipped and
reported, up to a bound. Every refusal is a ``DatasetError`` whose ``kind`` names it.

Images are kept at their stored resolution (grey stays one channel) and are resized and
normalised batch by batch, so a 10,000-image task costs its decoded size, not 10,000 x 3 x 224 x
224 floats; archive images larger than the probe's input are shrunk as they are decoded.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import math
import posixpath
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.task2vec.errors import DatasetError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_NAME = "labels.csv"


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


@dataclass(frozen=True)
class LabelledImages:
    """A decoded classification task.

    ``images`` is (N, H, W, C) uint8 with C = 1 (grey) or 3 (RGB); ``labels`` holds class
    indices into ``classes``, which are sorted so that the same data always maps to the same
    indices.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    #: Members left out, each with why ("not an image", "cannot be decoded: ...").
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[indices], self.labels[indices], self.classes)


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    skipped: tuple[tuple[str, str], ...] = (),
) -> LabelledImages:
    """Validate in-memory arrays (N,H,W[,C] uint8, N labels) and map labels to class indices."""
    if images.dtype != np.uint8:
        raise DatasetError(f"images must be uint8, got {images.dtype}", "invalid-npz")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(
            f"images must have shape (N,H,W), (N,H,W,1) or (N,H,W,3); got {images.shape}",
            "invalid-npz",
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"expected one label per image: {images.shape[0]} images, labels of shape "
            f"{labels.shape}",
            "invalid-npz",
        )
    if images.shape[0] == 0:
        raise DatasetError("the dataset holds no images", "no-images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DatasetError(f"images of shape {images.shape[1:3]} hold no pixels", "invalid-npz")
    if images.shape[1] * images.shape[2] > limits.max_image_pixels:
        raise DatasetError(
            f"images of {images.shape[1]}x{images.shape[2]} pixels, over the limit of "
            f"{limits.max_image_pixels}",
            "image-too-large",
        )
    if labels.dtype.kind not in "iuU":
        raise DatasetError(f"labels must be integers or strings, got {labels.dtype}", "invalid-npz")
    values, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(values) < 2:
        raise DatasetError(
            f"a classification task needs at least 2 classes; found only {values[0]!r}",
            "too-few-classes",
        )
    if len(values) > limits.max_classes:
        raise DatasetError(
            f"{len(values)} classes, over the limit of {limits.max_classes}", "too-many-classes"
        )
    classes = tuple(str(v) for v in values)
    for name in classes:
        _check_label(name)
    if counts.min() < limits.min_images_per_class:
        few = [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True)]
        few = [f for f, n in zip(few, counts, strict=True) if n < limits.min_images_per_class]
        raise DatasetError(
            f"every class needs at least {limits.min_images_per_class} images; "
            f"{', '.join(few[:5])}{' ...' if len(few) > 5 else ''} have fewer",
            "too-few-images-per-class",
        )
    return LabelledImages(
        np.ascontiguousarray(images), index.astype(np.int64), classes, tuple(skipped)
    )


def _check_label(label: str) -> None:
    """A class name must be printable text (it is shown in every answer about the task) and
    must not read as a spreadsheet formula when exported."""
    if not label.strip() or len(label) > 200 or not label.isprintable():
        raise DatasetError(
            f"class name {label[:80]!r} is empty, too long or not printable text",
            "bad-label",
        )
    if _looks_like_formula(label):
        raise DatasetError(
            f"class name {label[:80]!r} looks like a spreadsheet formula", "bad-label"
        )


def load_npz(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> LabelledImages:
    """``x`` and ``y`` from an .npz, without pickles and within the archive limits."""
    # Sizes, ratios and names are checked before any array loads; an array may be as large
    # as the whole upload.
    with _Archive(path, replace(limits, max_member_bytes=limits.max_total_bytes)):
        pass
    _check_npy_headers(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"x", "y"} - set(data.files)
            if missing:
                raise DatasetError(
                    f"{path.name}: an .npz dataset needs arrays 'x' and 'y'; missing "
                    f"{', '.join(sorted(missing))} (found: {', '.join(data.files) or 'none'})",
                    "invalid-npz",
                )
            x, y = data["x"], data["y"]
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path.name}: not a readable .npz file ({exc})", "invalid-npz") from exc
    return from_arrays(x, y, limits)


#: What each array of an .npz dataset may hold (numpy dtype kinds): images are bytes, labels
#: integers or text.
_NPY_KINDS = {"x": "u", "y": "iuU"}


def _check_npy_headers(path: Path) -> None:
    """Read every array's header before numpy allocates anything: a few hundred bytes can
    declare a terabyte-sized shape. The declared size must fit in the member's (already
    capped) uncompressed size, and the dtypes must be plain numbers or text."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype.hasobject or dtype.fields is not None:
                    raise DatasetError(
                        f"{path.name}: array {name!r} has dtype {dtype}; object and structured "
                        "arrays are not accepted",
                        "invalid-npz",
                    )
                if name in _NPY_KINDS and dtype.kind not in _NPY_KINDS[name]:
                    want = "x must hold uint8 images" if name == "x" else "y: integers or text"
                    raise DatasetError(
                        f"{path.name}: array {name!r} has dtype {dtype}; {want}", "invalid-npz"
                    )
                declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size:
                    raise DatasetError(
                        f"{path.name}: array {name!r} declares shape {shape} ({declared} bytes) "
                        f"but holds {info.file_size} bytes",
                        "invalid-npz",
                    )
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path.name}: not a readable .npz file ({exc})", "invalid-npz") from exc


# --------------------------------------------------------------------------------------------
# Archives


@dataclass(frozen=True)
class _Member:
    name: str  # normalised posix path inside the archive
    size: int
    compressed: int


def _check_name(raw: str) -> str:
    """Normalise a member name; refuse absolute paths and any climb out of the archive root."""
    name = raw.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise DatasetError(
            f"archive member {raw!r} has an unsafe path (absolute or '..')", "unsafe-member-path"
        )
    if any(not p.isprintable() for p in parts):
        raise DatasetError(
            f"archive member {raw!r} has a name that is not printable text (non-UTF-8 bytes or "
            "control characters)",
            "bad-member-name",
        )
    return "/".join(parts)


class _Archive:
    """Read-only view over a zip or tar file: member listing and bounded reads."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.path = path
        self.limits = limits
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}
        self._zip_names: dict[str, str] = {}
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)  # closed in close()
            elif (tar := _open_tar(path, limits)) is not None:
                self._tar = tar
            elif _starts_like_an_archive(path):
                raise DatasetError(
                    f"{path.name}: a damaged or truncated archive", "corrupt-archive"
                )
            else:
                raise DatasetError(
                    f"{path.name}: not a zip or tar archive, nor an .npz file", "not-a-dataset"
                )
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise DatasetError(
                f"{path.name}: unreadable archive ({exc})", "corrupt-archive"
            ) from exc
        self.members = self._list()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _list(self) -> list[_Member]:
        members: list[_Member] = []
        entries: list[tuple[str, int, int, bool, str | None]] = []
        total = 0
        try:
            if self._zip is not None:
                for zinfo in self._zip.infolist():
                    kind = _zip_special(zinfo)
                    entries.append(
                        (zinfo.filename, zinfo.file_size, zinfo.compress_size, zinfo.is_dir(), kind)
                    )
                    if len(entries) > self.limits.max_members:
                        break
                    self._zip_names[_check_name(zinfo.filename)] = zinfo.filename
            else:
                assert self._tar is not None
                for info in self._tar:
                    kind = None if info.isfile() or info.isdir() else _tar_kind(info)
                    entries.append((info.name, info.size, info.size, info.isdir(), kind))
                    if len(entries) > self.limits.max_members:
                        break
                    if info.isfile():
                        self._tar_members[_check_name(info.name)] = info
        except (OSError, tarfile.TarError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(
                f"{self.path.name}: corrupt archive ({exc})", "corrupt-archive"
            ) from exc
        if len(entries) > self.limits.max_members:
            raise DatasetError(
                f"{self.path.name}: more than the limit of {self.limits.max_members} members",
                "too-many-members",
            )
        seen: set[str] = set()
        for raw, size, compressed, is_dir, kind in entries:
            name = _check_name(raw)
            if kind is not None:
                raise DatasetError(
                    f"archive member {raw!r} is {kind}; only regular files count",
                    "unsupported-member",
                )
            if is_dir or not name:
                continue
            if name in seen:
                raise DatasetError(
                    f"archive member {raw!r} appears more than once: which one is meant?",
                    "duplicate-member",
                )
            seen.add(name)
            if size > self.limits.max_member_bytes:
                raise DatasetError(
                    f"archive member {raw!r} is {size} bytes, over the per-file limit of "
                    f"{self.limits.max_member_bytes}",
                    "member-too-large",
                )
            if compressed > 0 and size / compressed > self.limits.max_compression_ratio:
                raise DatasetError(
                    f"archive member {raw!r} expands {size / compressed:.0f}x, over the "
                    f"compression-ratio limit of {self.limits.max_compression_ratio:.0f}x",
                    "compression-bomb",
                )
            total += size
            if total > self.limits.max_total_bytes:
                raise DatasetError(
                    f"{self.path.name}: more than {self.limits.max_total_bytes} bytes "
                    "uncompressed, over the limit",
                    "too-large-uncompressed",
                )
            members.append(_Member(name, size, compressed))
        return members

    def read(self, member: _Member) -> bytes:
        """Read one member, never more than its declared (and capped) size."""
        try:
            if self._zip is not None:
                with self._zip.open(self._zip_names[member.name]) as fh:
                    data = fh.read(member.size + 1)
            else:
                assert self._tar is not None
                handle = self._tar.extractfile(self._tar_members[member.name])
                if handle is None:
                    raise DatasetError(
                        f"archive member {member.name!r} cannot be read", "corrupt-archive"
                    )
                with handle:
                    data = handle.read(member.size + 1)
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, RuntimeError) as exc:
            raise DatasetError(
                f"archive member {member.name!r} is corrupt or encrypted ({exc})",
                "corrupt-archive",
            ) from exc
        if len(data) > member.size:
            raise DatasetError(
                f"archive member {member.name!r} is larger than it declares", "corrupt-archive"
            )
        return data


class _BoundedStream(io.RawIOBase):
    """A (decompressed) tar stream that refuses to go further than the limits allow.

    ``tarfile`` reads GNU long names and pax headers whole and decompresses everything it
    skips; through this view no single read exceeds the largest member, and no position goes
    beyond the uncompressed total or the compression ratio allowed for the file's size.
    """

    def __init__(self, raw: Any, name: str, limits: ArchiveLimits, compressed: int | None) -> None:
        self.raw, self.name = raw, name
        self.max_read = limits.max_member_bytes + 2 * tarfile.BLOCKSIZE
        slack = 1024 * 1024 + 2 * tarfile.BLOCKSIZE * limits.max_members  # headers, padding
        self.max_total = limits.max_total_bytes + slack
        self.max_ratio = (
            None if compressed is None else limits.max_compression_ratio * compressed + slack
        )
        self.ratio = limits.max_compression_ratio

    def _check(self, position: int) -> None:
        if self.max_ratio is not None and position > self.max_ratio:
            raise DatasetError(
                f"{self.name}: expands more than {self.ratio:.0f}x, over the compression-ratio "
                "limit",
                "compression-bomb",
            )
        if position > self.max_total:
            raise DatasetError(
                f"{self.name}: more than {self.max_total} bytes uncompressed, over the limit",
                "too-large-uncompressed",
            )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.max_read:
            raise DatasetError(
                f"{self.name}: a header or member of more than {self.max_read} bytes",
                "member-too-large",
            )
        data: bytes = self.raw.read(size)
        self._check(self.raw.tell())
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise OSError("only absolute and relative seeks")
        self._check(target)
        position: int = self.raw.seek(target)
        return position

    def tell(self) -> int:
        position: int = self.raw.tell()
        return position

    def close(self) -> None:
        self.raw.close()
        super().close()


_DECOMPRESSORS: dict[bytes, Callable[..., Any]] = {
    b"\x1f\x8b": gzip.GzipFile,
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}


def _open_tar(path: Path, limits: ArchiveLimits) -> tarfile.TarFile | None:
    """The file as a tar archive read through ``_BoundedStream``, or None if it is not one."""
    with path.open("rb") as fh:
        head = fh.read(8)
    opener = next((o for magic, o in _DECOMPRESSORS.items() if head.startswith(magic)), None)
    # Closed with the stream (by the archive, or below when it is not a tar).
    raw = opener(path, "rb") if opener is not None else path.open("rb")
    compressed = path.stat().st_size if opener is not None else None
    stream = _BoundedStream(raw, path.name, limits, compressed)
    try:
        return tarfile.open(fileobj=stream, mode="r:")
    except tarfile.ReadError:
        stream.close()
        return None
    except BaseException:
        stream.close()
        raise


#: Leading bytes of zip, gzip, bzip2 and xz files: such a file that does not open is damaged.
_ARCHIVE_MAGIC = (b"PK\x03\x04", *_DECOMPRESSORS)


def _starts_like_an_archive(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(8)
    return head.startswith(_ARCHIVE_MAGIC)


def _zip_special(info: zipfile.ZipInfo) -> str | None:
    """What a zip member is when not a regular file or folder (zips made on Unix store file
    types in their external attributes: symlinks, devices, fifos)."""
    if info.create_system != 3:  # not made on Unix: the attributes mean something else
        return None
    mode = (info.external_attr >> 16) & 0o170000
    if mode in (0, 0o100000, 0o040000):
        return None
    return {0o120000: "a symbolic link"}.get(mode, "a device, fifo or socket")


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    return "a device, fifo or socket"


def _is_ignorable(name: str) -> bool:
    base = posixpath.basename(name)
    return name.startswith("__MACOSX/") or base.startswith(".") or base in {"Thumbs.db"}


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _decode(name: str, data: bytes, limits: ArchiveLimits) -> np.ndarray:
    """Decode one image to (H, W, 1) or (H, W, 3) uint8, refusing bombs and broken files.

    The size in the image's header is checked before any pixel is decoded (no global PIL
    setting and no warning filter: decoding runs in several threads at once)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            if width * height * max(frames, 1) > limits.max_image_pixels:
                raise DatasetError(
                    f"image {name!r} is {width}x{height} pixels"
                    f"{f' x {frames} frames' if frames > 1 else ''}, over the limit of "
                    f"{limits.max_image_pixels}",
                    "image-too-large",
                )
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


def _strip_common_root(names: list[str]) -> str:
    """The single top-level folder around the class folders, if any ('' otherwise).

    ``data/cat/1.png`` loses ``data/``; ``cat/1.png`` alone keeps ``cat/`` (one class).
    """
    heads = {n.split("/", 1)[0] for n in names}
    if len(heads) == 1 and all(n.count("/") >= 2 for n in names):
        return heads.pop() + "/"
    return ""


def _looks_like_formula(label: str) -> bool:
    """Whether a spreadsheet would run the label as a formula when the task is exported ("CSV
    injection"): '=…', '@…', or a sign followed by operators ('+cmd|…!A0', '-2+3'); '-1' and
    '-ve' are ordinary labels."""
    if label.startswith(("=", "@", "\t", "\r")):
        return True
    return (
        label.startswith(("+", "-"))
        and not _is_number(label)
        and any(c in label[1:] for c in "()!|=+-*/&^")
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _manifest_rows(archive: _Archive, manifest: _Member) -> list[tuple[str, str]]:
    try:
        text = archive.read(manifest).decode("utf-8-sig", errors="strict")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{manifest.name}: not UTF-8 text ({exc})", "bad-manifest") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["path", "label"]:
            raise DatasetError(
                f"{manifest.name}: the first row must be exactly the header 'path,label'",
                "bad-manifest",
            )
        rows: list[tuple[str, str]] = []
        listed: set[str] = set()
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(
                    f"{manifest.name} line {line}: expected two cells 'path,label', got {row!r}",
                    "bad-manifest",
                )
            label = row[1].strip()
            if _looks_like_formula(label):
                raise DatasetError(
                    f"{manifest.name} line {line}: label {label!r} looks like a spreadsheet "
                    "formula",
                    "bad-manifest",
                )
            if row[0].strip() in listed:
                raise DatasetError(
                    f"{manifest.name} line {line}: {row[0].strip()!r} is listed twice",
                    "bad-manifest",
                )
            listed.add(row[0].strip())
            rows.append((row[0].strip(), label))
    except csv.Error as exc:
        raise DatasetError(f"{manifest.name}: not valid CSV ({exc})", "bad-manifest") from exc
    return rows


_ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".npz")


def _why_not_an_image(name: str) -> str:
    if name.lower().endswith(_ARCHIVE_EXTENSIONS):
        return "an archive inside the archive (not opened)"
    return "not an image file"


def load_archive(
    path: Path, image_size: int, limits: ArchiveLimits = DEFAULT_LIMITS
) -> LabelledImages:
    with _Archive(path, limits) as archive:
        members = [m for m in archive.members if not _is_ignorable(m.name)]
        if not members:
            raise DatasetError(f"{path.name}: the archive is empty", "bad-layout")
        by_name = {m.name: m for m in members}
        manifests = sorted(
            (m for m in members if posixpath.basename(m.name) == MANIFEST_NAME),
            key=lambda m: m.name.count("/"),
        )
        pairs: list[tuple[_Member, str]] = []
        skipped: list[tuple[str, str]] = []
        if manifests:
            manifest = manifests[0]
            base = posixpath.dirname(manifest.name)
            for rel, label in _manifest_rows(archive, manifest):
                name = _check_name(posixpath.join(base, rel.replace("\\", "/")))
                member = by_name.get(name)
                if member is None:
                    raise DatasetError(
                        f"{MANIFEST_NAME} labels {rel!r} as {label!r}, but the archive has no "
                        "such image",
                        "bad-manifest",
                    )
                pairs.append((member, label))
            listed = {m.name for m, _ in pairs} | {manifest.name}
            skipped += [
                (m.name, f"not listed in {MANIFEST_NAME}") for m in members if m.name not in listed
            ]
        else:
            images = [m for m in members if _is_image(m.name)]
            skipped += [
                (m.name, _why_not_an_image(m.name)) for m in members if not _is_image(m.name)
            ]
            if not images:
                raise DatasetError(
                    f"{path.name}: no image files (and no {MANIFEST_NAME}) in the archive",
                    "bad-layout",
                )
            root = _strip_common_root([m.name for m in images])
            for member in images:
                rel = member.name[len(root) :]
                if "/" not in rel:
                    raise DatasetError(
                        f"image {member.name!r} is not inside a class folder; use "
                        f"<label>/<image> or a {MANIFEST_NAME} manifest",
                        "bad-layout",
                    )
                pairs.append((member, rel.split("/", 1)[0]))
        if not pairs:
            raise DatasetError(f"{path.name}: {MANIFEST_NAME} lists no images", "bad-layout")
        decoded, labels, broken = [], [], []
        for member, label in pairs:
            try:
                image = _decode(member.name, archive.read(member), limits)
            except DatasetError as exc:
                if exc.kind != "undecodable-images":
                    raise
                broken.append((member.name, str(exc)))
                continue
            decoded.append(_bound(image, image_size))
            labels.append(label)
    if not decoded or len(broken) > limits.max_skipped_fraction * len(pairs):
        names = ", ".join(repr(n) for n, _ in broken[:3])
        raise DatasetError(
            f"{len(broken)} of {len(pairs)} images cannot be decoded ({names}"
            f"{', ...' if len(broken) > 3 else ''}): more than the "
            f"{limits.max_skipped_fraction:.0%} that are skipped",
            "undecodable-images",
        )
    skipped += [(name, why.removeprefix(f"image {name!r} ")) for name, why in broken]
    return from_arrays(_stack(decoded, image_size), np.array(labels), limits, tuple(skipped))


def _stack(images: list[np.ndarray], image_size: int) -> np.ndarray:
    """Stack decoded images: mixed modes go to RGB, mixed sizes to ``image_size`` squared."""
    channels = max(i.shape[2] for i in images)
    if channels == 3:
        images = [np.repeat(i, 3, axis=2) if i.shape[2] == 1 else i for i in images]
    if len({i.shape for i in images}) > 1:
        images = [_resize_uint8(i, image_size) for i in images]
    return np.stack(images)


def _bound(image: np.ndarray, image_size: int) -> np.ndarray:
    """Shrink an image larger than the probe's input right away, so memory stays bounded."""
    if image.shape[0] * image.shape[1] > image_size * image_size:
        return _resize_uint8(image, image_size)
    return image


def _resize_uint8(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize with the same antialiased bilinear filter the batches use, back to uint8."""
    if image.shape[:2] == (image_size, image_size):
        return image
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(torch.float32)
    x = torch.nn.functional.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def load_dataset(
    path: str | Path, image_size: int = 224, limits: ArchiveLimits = DEFAULT_LIMITS
) -> LabelledImages:
    """Read and validate a dataset file in any of the accepted formats.

    ``image_size`` is the probe's input size: archive images larger than it, or of mixed
    sizes, are resized to it while decoding; the rest keep their size until batching.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist", "not-a-dataset")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path.name}: the file is empty", "empty-file")
    if _is_npz(path):
        return load_npz(path, limits)
    return load_archive(path, image_size, limits)


def _is_npz(path: Path) -> bool:
    """An .npz is a zip of .npy arrays: told apart by its members, not by its file name."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile, EOFError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


# --------------------------------------------------------------------------------------------
# Batching for the probe


def to_probe_input(batch: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B,H,W,C) → float (B,3,S,S) in [0, 1]: grey expanded to 3 channels, resized.

    Resizing is bilinear with antialiasing, done on whole batches in torch so it costs nothing
    next to the probe.
    """
    x = torch.as_tensor(batch)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.contiguous()


def iter_batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]
