"""Which member of an uploaded archive is an image of which class: class folders
(``<label>/<image>``, inside at most one common top-level folder) or a ``labels.csv``
manifest. Members that are not images, or that the manifest does not list, are skipped and
reported; a layout that labels nothing, or an image twice, is refused. The reading itself is
``archives.py``'s, the decoding ``datasets.py``'s.
"""

from __future__ import annotations

import csv
import io
import posixpath
from pathlib import Path

from app.task2vec.archives import Archive, Member, check_member_name
from app.task2vec.errors import DatasetError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_NAME = "labels.csv"

#: Each image member with its label.
Pairs = list[tuple[Member, str]]
#: Each member left out, with why.
Skipped = list[tuple[str, str]]


def labelled_members(path: Path, archive: Archive) -> tuple[Pairs, Skipped]:
    """The images of ``archive`` (the file at ``path``) with their labels, by its manifest
    when it has one (the one nearest the top), else by class folder; the members skipped."""
    members = [m for m in archive.members if not _is_ignorable(m.name)]
    if not members:
        raise DatasetError(f"{path.name}: the archive is empty", "bad-layout")
    manifests = sorted(
        (m for m in members if posixpath.basename(m.name) == MANIFEST_NAME),
        key=lambda m: m.name.count("/"),
    )
    if manifests:
        pairs, skipped = _listed_pairs(archive, manifests[0], members)
    else:
        pairs, skipped = _folder_pairs(path, members)
    if not pairs:
        raise DatasetError(f"{path.name}: {MANIFEST_NAME} lists no images", "bad-layout")
    return pairs, skipped


def _is_ignorable(name: str) -> bool:
    base = posixpath.basename(name)
    return name.startswith("__MACOSX/") or base.startswith(".") or base in {"Thumbs.db"}


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _strip_common_root(names: list[str]) -> str:
    """The single top-level folder around the class folders, if any ('' otherwise).

    ``data/cat/1.png`` loses ``data/``; ``cat/1.png`` alone keeps ``cat/`` (one class).
    """
    heads = {n.split("/", 1)[0] for n in names}
    if len(heads) == 1 and all(n.count("/") >= 2 for n in names):
        return heads.pop() + "/"
    return ""


def looks_like_formula(label: str) -> bool:
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


def _manifest_rows(archive: Archive, manifest: Member) -> list[tuple[str, str]]:
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
            if looks_like_formula(label):
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


def _listed_pairs(
    archive: Archive, manifest: Member, members: list[Member]
) -> tuple[Pairs, Skipped]:
    """Each image the manifest labels, and the members it does not list (skipped): an image
    it names must be in the archive, once."""
    by_name = {m.name: m for m in members}
    base = posixpath.dirname(manifest.name)
    pairs: Pairs = []
    paired: set[str] = set()
    for rel, label in _manifest_rows(archive, manifest):
        name = check_member_name(posixpath.join(base, rel.replace("\\", "/")))
        member = by_name.get(name)
        if member is None:
            raise DatasetError(
                f"{MANIFEST_NAME} labels {rel!r} as {label!r}, but the archive has no such image",
                "bad-manifest",
            )
        if member.name in paired:  # 'img0.png' and './img0.png' are one image
            raise DatasetError(
                f"{MANIFEST_NAME} lists the image {member.name!r} twice", "bad-manifest"
            )
        paired.add(member.name)
        pairs.append((member, label))
    listed = {m.name for m, _ in pairs} | {manifest.name}
    skipped = [(m.name, f"not listed in {MANIFEST_NAME}") for m in members if m.name not in listed]
    return pairs, skipped


def _folder_pairs(path: Path, members: list[Member]) -> tuple[Pairs, Skipped]:
    """Each image labelled by its class folder, and the members that are not images
    (skipped): an image outside a class folder has no label."""
    images = [m for m in members if _is_image(m.name)]
    skipped = [(m.name, _why_not_an_image(m.name)) for m in members if not _is_image(m.name)]
    if not images:
        raise DatasetError(
            f"{path.name}: no image files (and no {MANIFEST_NAME}) in the archive", "bad-layout"
        )
    root = _strip_common_root([m.name for m in images])
    pairs: Pairs = []
    for member in images:
        rel = member.name[len(root) :]
        if "/" not in rel:
            raise DatasetError(
                f"image {member.name!r} is not inside a class folder; use "
                f"<label>/<image> or a {MANIFEST_NAME} manifest",
                "bad-layout",
            )
        pairs.append((member, rel.split("/", 1)[0]))
    return pairs, skipped
