"""Reading an untrusted upload: zip and tar(.gz, .bz2, .xz) archives and .npz files.

Archives are read member by member in memory: nothing is extracted and no member name is ever
used as a filesystem path. Member count, total size, compression ratio and pixels per image are
capped (``ArchiveLimits``), and so is every read a tar stream makes; links, devices, duplicate
or unsafe names are refused. An .npz is checked the same way, and every array header is read
before numpy allocates anything. Every refusal is a ``DatasetError`` whose ``kind`` names it.

What the members mean (class folders or a ``labels.csv`` manifest, which ones are images) is
``app.task2vec.layouts``'s business; this module only lists and reads them safely
(decoding an image: ``app.task2vec.images``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.task2vec.errors import DatasetError
from app.task2vec.limits import DEFAULT_LIMITS, ArchiveLimits

#: A member as the archive declares it: name, size, compressed size, whether a folder, and
#: what special file it is (None: a regular file or a folder).
_Entry = tuple[str, int, int, bool, str | None]


@dataclass(frozen=True)
class Member:
    name: str  # normalised posix path inside the archive
    size: int
    compressed: int


def check_member_name(raw: str) -> str:
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


#: How a zip starts: a local file header, or the end record of an empty archive.
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")


def zip_at_start(path: Path) -> bool:
    """Whether a zip begins at the first byte. Python's zipfile also opens a zip appended to
    other data (found from its end), which would let one file read as two formats."""
    with path.open("rb") as fh:
        return fh.read(4) in _ZIP_STARTS


class Archive:
    """Read-only view over a zip or tar file: member listing and bounded reads."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.path = path
        self.limits = limits
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}
        self._zip_names: dict[str, str] = {}
        try:
            if zipfile.is_zipfile(path) and zip_at_start(path):
                self._zip = zipfile.ZipFile(path)  # closed in close()
            elif (tar := _open_tar(path, limits)) is not None:
                self._tar = tar
            elif zipfile.is_zipfile(path):
                raise DatasetError(
                    f"{path.name}: bytes before the first zip entry (a zip joined to other "
                    "data); send the zip alone",
                    "corrupt-archive",
                )
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

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entries(self) -> list[_Entry]:
        """The archive's directory as it declares it, at most ``max_members`` + 1 entries
        (one more is enough to refuse it); a zip's or tar's own names are kept to read by."""
        entries: list[_Entry] = []
        try:
            if self._zip is not None:
                for zinfo in self._zip.infolist():
                    kind = _zip_special(zinfo)
                    entries.append(
                        (zinfo.filename, zinfo.file_size, zinfo.compress_size, zinfo.is_dir(), kind)
                    )
                    if len(entries) > self.limits.max_members:
                        break
                    self._zip_names[check_member_name(zinfo.filename)] = zinfo.filename
            else:
                assert self._tar is not None
                for info in self._tar:
                    kind = None if info.isfile() or info.isdir() else _tar_kind(info)
                    entries.append((info.name, info.size, info.size, info.isdir(), kind))
                    if len(entries) > self.limits.max_members:
                        break
                    if info.isfile():
                        self._tar_members[check_member_name(info.name)] = info
        except (OSError, tarfile.TarError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(
                f"{self.path.name}: corrupt archive ({exc})", "corrupt-archive"
            ) from exc
        if len(entries) > self.limits.max_members:
            raise DatasetError(
                f"{self.path.name}: more than the limit of {self.limits.max_members} members",
                "too-many-members",
            )
        return entries

    def _list(self) -> list[Member]:
        """The regular files, each checked against the limits from what the archive
        declares, before a byte of any is read."""
        members: list[Member] = []
        total = 0
        seen: set[str] = set()
        for raw, size, compressed, is_dir, kind in self._entries():
            name = check_member_name(raw)
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
            members.append(Member(name, size, compressed))
        return members

    def read(self, member: Member) -> bytes:
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


# --------------------------------------------------------------------------------------------
# .npz files


def load_npz(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` from an .npz, without pickles and within the archive limits (their
    shapes, dtypes and labels are checked by ``datasets.from_arrays``)."""
    # Sizes, ratios and names are checked before any array loads; an array may be as large
    # as the whole upload.
    with Archive(path, replace(limits, max_member_bytes=limits.max_total_bytes)):
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
    return x, y


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
