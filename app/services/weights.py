"""Expert weight files: stored by content under the data directory, from an upload, a path
under the operator's import folder, or a URL a worker downloads.

An expert row names its weights as a stored file, a URL still to be fetched, or a keyword of
the probe loader (``imagenet``, ``random:N``). A rejected expert leaves no file behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from app.services import objects, outbound
from app.services.layout import DataLayout
from app.services.problems import ProblemError, redact
from app.services.storage import WEIGHTS_SUFFIX, store_file
from app.settings import Settings
from app.task2vec.probes import PROBES


def store(settings: Settings, source: Path) -> Path:
    """Copy a weight file into the data directory under its content hash (idempotent), and
    into the object store when there is one."""
    stored = store_file(source, DataLayout.of(settings).weights, WEIGHTS_SUFFIX)
    objects.share(settings, stored)
    return stored


def remote(weights: str) -> bool:
    return weights.startswith(("http://", "https://"))


def _invalid(uri: str, why: str) -> ProblemError:
    return ProblemError(422, "invalid-expert", "Invalid expert", f"weights_uri {uri!r}: {why}")


def place(settings: Settings, architecture: str, uri: str) -> str:
    """Where the weights named by ``uri`` are kept: a URL (a worker downloads it), a keyword
    of the probe loader, or a file under ``weights_import_dir`` copied into the data
    directory (at most ``max_upload_bytes``)."""
    if remote(uri):
        try:  # the scheme and the host's addresses, now; the worker checks every hop again
            outbound.check(uri, outbound.Policy.of(settings, settings.max_upload_bytes))
        except outbound.OutboundError as exc:
            raise _invalid(redact(uri), str(exc)) from None
        return uri
    if architecture in PROBES and (uri == "imagenet" or uri.startswith("random")):
        return uri
    root = settings.weights_import_dir
    if root is None:
        raise _invalid(
            uri,
            f"not an http(s) URL or (for {', '.join(PROBES)}) 'imagenet' / 'random:N'; "
            "weight files are uploaded as `weights`, or named by path when the service sets "
            "T2V_WEIGHTS_IMPORT_DIR",
        )
    try:
        path = Path(uri.removeprefix("file://")).resolve()
        inside = path.is_relative_to(root.resolve())
        size = path.stat().st_size if inside and path.is_file() else None
    except (OSError, ValueError):
        size, inside = None, False
    if not inside:
        raise _invalid(uri, f"not a file under the weights import folder {str(root)!r}")
    if size is None:
        raise _invalid(uri, "no such file in the weights import folder")
    if size > settings.max_upload_bytes:
        raise _invalid(uri, f"larger than the limit of {settings.max_upload_bytes} bytes")
    try:
        return str(store(settings, path))
    except OSError as exc:
        raise _invalid(uri, f"cannot be read ({exc.strerror})") from None


def fetch(settings: Settings, url: str) -> Path:
    """Download an expert's weights (at most ``max_upload_bytes``, through the outbound
    guard) to a file of this download's own, which the caller keeps (``store``) or
    removes; nothing of a failed download stays."""
    folder = DataLayout.of(settings).weights
    folder.mkdir(parents=True, exist_ok=True)
    policy = outbound.Policy.of(settings, settings.max_upload_bytes)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".download", delete=False) as out:
        tmp = Path(out.name)
        try:
            outbound.download(url, out, policy)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp
