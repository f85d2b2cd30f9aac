"""Downloading a checkpoint (the probes' ImageNet weights), bounded in every way a server can
hold it up: a connect and read timeout, a deadline for the whole, a size cap, and the file's
SHA-256 prefix where its name carries one (torchvision's convention). Nothing of a failed or
forged download is left where the checkpoint belongs.

The bounds come from the environment, as the probes' other download switch does:
``TASK2VEC_DOWNLOAD_TIMEOUT`` (seconds to connect and for each read, 30 by default) and
``TASK2VEC_DOWNLOAD_DEADLINE`` (seconds for the whole download, 600 by default).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

#: The largest checkpoint a download accepts (torchvision's ResNet-34 is 83 MB).
MAX_CHECKPOINT_BYTES = 1 << 30
_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that did not finish: no answer, too slow, too large, or refused."""


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = default
    return value if value > 0 else default


def _copy(answer: BinaryIO, out: BinaryIO, *, max_bytes: int, deadline: float, limit: float) -> str:
    """Copy ``answer`` to ``out``; its SHA-256. Each read waits at most the socket's timeout, so
    the deadline is overrun by one read's timeout at most."""
    digest = hashlib.sha256()
    size = 0
    read = getattr(answer, "read1", answer.read)  # what one receive brings, not a full chunk
    while chunk := read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise DownloadError(f"the server sends more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise DownloadError(f"the download was not finished within {limit:g} s")
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def _fetch(url: str, out: BinaryIO, max_bytes: int) -> str:
    timeout = _seconds("TASK2VEC_DOWNLOAD_TIMEOUT", 30.0)
    limit = _seconds("TASK2VEC_DOWNLOAD_DEADLINE", 600.0)
    deadline = time.monotonic() + limit
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            length = answer.headers.get("Content-Length") if hasattr(answer, "headers") else None
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise DownloadError(f"the server sends more than {max_bytes} bytes")
            return _copy(answer, out, max_bytes=max_bytes, deadline=deadline, limit=limit)
    except DownloadError:
        raise
    except TimeoutError as exc:
        raise DownloadError(f"no answer within {timeout:g} s") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise DownloadError(f"no answer within {timeout:g} s") from exc
        raise DownloadError(f"cannot reach the server ({exc.reason})") from exc


def download(url: str, target: Path, *, hash_prefix: str | None, max_bytes: int) -> None:
    """``url``'s content at ``target`` (written beside it, then renamed into place), or
    ``DownloadError`` with the reason; a content whose SHA-256 does not start with
    ``hash_prefix`` is a ``RuntimeError`` (a forged or truncated file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, max_bytes)
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise RuntimeError(
                f"invalid hash value (expected {hash_prefix!r}, got {digest[: len(hash_prefix)]!r})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
