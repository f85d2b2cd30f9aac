"""Zoo bundles, the archive alone: a zoo written and read back bit for bit, the same bytes for
the same zoo, and every hostile or damaged archive refused with a message that names the
member, before anything is read past it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from app.task2vec.embedding import EmbedConfig, Embedding
from app.zoo.bundle import (
    MANIFEST,
    MATRIX,
    VOLATILE,
    BundleError,
    BundleLimits,
    read_bundle,
    verify,
    write_bundle,
)
from app.zoo.experts import ExpertSpec
from app.zoo.matrix import EvaluationProtocol
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import Zoo

CONFIG = EmbedConfig(probe="efficientnet_lite0", image_size=32, fisher_labels="gaussian")
Members = list[tuple[str, bytes]]


def synthetic_zoo(folder: Path, config: EmbedConfig = CONFIG, prefix: str = "") -> Zoo:
    """Three tasks (one uploaded, with its dataset file), two experts (one trained, with a
    weight file; one a loader keyword), random embeddings and matrix: no training needed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dataset = folder / "products.upload"
    dataset.write_bytes(rng.bytes(3000))
    weights = folder / "cnn.pt"
    weights.write_bytes(rng.bytes(5000))
    tasks = [
        TaskSpec(f"{prefix}fm-a", "fashion_mnist", ((0,), (1,)), ("a", "b"), 40, seed=1),
        TaskSpec(f"{prefix}mnist-b", "mnist", ((2,), (3,), (4,)), ("2", "3", "4"), 60),
        TaskSpec(
            f"{prefix}products",
            "upload",
            ((0,), (1,)),
            ("x", "y"),
            10,
            dataset=str(dataset),
            domain_name="retail",
        ),
    ]
    experts = [
        ExpertSpec(f"{prefix}cnn", "cnn-8x2", str(weights), 28, source_task=tasks[0].name),
        ExpertSpec(f"{prefix}imagenet", "efficientnet_lite0", "imagenet", 32, tags=("imagenet",)),
    ]
    meta = {**asdict(config), "probe_weights": "imagenet:efficientnet_lite0", "wall_time_s": 1.5}
    embeddings = [
        Embedding(rng.random(50, dtype=np.float32), rng.random(50, dtype=np.float32), dict(meta))
        for _ in tasks
    ]
    errors = rng.random((len(tasks), len(experts)))
    return Zoo(config, tasks, embeddings, experts, errors, EvaluationProtocol(image_split_seed=0))


@pytest.fixture
def written(tmp_path: Path) -> tuple[Zoo, Path]:
    zoo = synthetic_zoo(tmp_path / "src")
    path = tmp_path / "zoo.t2vzoo"
    write_bundle(zoo, path)
    return zoo, path


def members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def rewrite(path: Path, change: Callable[[Members], Members]) -> Path:
    """The bundle with its members changed (plain tar.gz, as an attacker would write it)."""
    out = path.with_name("changed.t2vzoo")
    with tarfile.open(out, "w:gz") as tar:
        for name, data in change(members(path)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_a_zoo_reads_back_bit_for_bit(written: tuple[Zoo, Path], tmp_path: Path) -> None:
    zoo, path = written
    staging = tmp_path / "staging"
    bundle = read_bundle(path, staging)
    back = bundle.zoo
    assert back.embed_config == zoo.embed_config
    assert back.protocol == zoo.protocol
    assert [replace(t, dataset=None) for t in back.tasks] == [
        replace(t, dataset=None) for t in zoo.tasks
    ]
    assert np.array_equal(back.errors, zoo.errors)
    for ours, theirs in zip(back.embeddings, zoo.embeddings, strict=True):
        assert np.array_equal(ours.hessian, theirs.hessian)
        assert np.array_equal(ours.scale, theirs.scale)
        assert ours.meta == {k: v for k, v in theirs.meta.items() if k not in VOLATILE}
    # Files travel by content; keywords stay keywords.
    trained, keyword = back.experts
    assert Path(trained.weights).read_bytes() == Path(zoo.experts[0].weights).read_bytes()
    assert Path(trained.weights).is_relative_to(staging)
    assert keyword.weights == "imagenet"
    uploaded = back.tasks[2]
    assert uploaded.dataset is not None
    assert Path(uploaded.dataset).read_bytes() == Path(zoo.tasks[2].dataset or "").read_bytes()
    manifest = bundle.manifest
    assert (manifest["format_version"], manifest["tasks"], manifest["experts"]) == (1, 3, 2)
    assert members(path)[0][0] == MANIFEST


def test_the_same_zoo_gives_the_same_bytes(written: tuple[Zoo, Path], tmp_path: Path) -> None:
    zoo, path = written
    for source in (zoo.experts[0].weights, zoo.tasks[2].dataset or ""):
        os.utime(source, (1_000_000, 1_000_000))  # another mtime: nothing of it is kept
    again = tmp_path / "again.t2vzoo"
    for embedding in zoo.embeddings:  # the same embeddings, computed in another time
        embedding.meta["wall_time_s"] = 99.0
    assert write_bundle(zoo, again) == write_bundle(zoo, path)
    assert again.read_bytes() == path.read_bytes()
    with tarfile.open(path) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar} == {(0, 0, 0, "")}
    assert path.read_bytes()[4:8] == b"\0\0\0\0"  # the gzip header's mtime


def _replace(name: str, data: bytes) -> Callable[[Members], Members]:
    return lambda ms: [(n, data if n == name else d) for n, d in ms]


def _manifest(change: Callable[[dict], None]) -> Callable[[Members], Members]:  # type: ignore[type-arg]
    def edit(ms: Members) -> Members:
        manifest = json.loads(ms[0][1])
        change(manifest)
        return [(MANIFEST, json.dumps(manifest).encode()), *ms[1:]]

    return edit


REFUSED: dict[str, tuple[Callable[[Members], Members], str, str]] = {
    "tampered member": (
        _replace(MATRIX, b"\x93NUMPY tampered"),
        "bundle-hash-mismatch",
        "member 'matrix.npy'",
    ),
    "missing member": (
        lambda ms: [m for m in ms if m[0] != MATRIX],
        "bundle-missing-member",
        "'matrix.npy' is listed in the manifest but missing",
    ),
    "member outside the manifest": (
        lambda ms: [*ms, ("experts/" + "0" * 64 + ".pt", b"weights")],
        "bundle-unlisted-member",
        "is not listed in the manifest",
    ),
    "path traversal": (
        lambda ms: [*ms, ("../../etc/evil", b"x")],
        "bundle-unsafe-member",
        "'../../etc/evil': an absolute path or '..'",
    ),
    "absolute path": (
        lambda ms: [*ms, ("/tmp/evil", b"x")],
        "bundle-unsafe-member",
        "an absolute path",
    ),
    "wrong format version": (
        _manifest(lambda m: m.update(format_version=2)),
        "bundle-format",
        "bundle format version 2; this service reads version 1",
    ),
    "not a bundle": (
        _manifest(lambda m: m.pop("format")),
        "bundle-format",
        "not a zoo bundle",
    ),
    "manifest not first": (
        lambda ms: [*ms[1:], ms[0]],
        "bundle-format",
        "the first member must be manifest.json",
    ),
    "member twice": (
        lambda ms: [*ms, ms[-1]],
        "bundle-unlisted-member",
        "appears twice",
    ),
    "embeddings of another configuration": (
        lambda ms: ms,  # replaced below: needs a zoo of its own
        "invalid-bundle",
        "image_size",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_damaged_bundle_is_refused(case: str, written: tuple[Zoo, Path], tmp_path: Path) -> None:
    zoo, path = written
    change, kind, message = REFUSED[case]
    if case == "embeddings of another configuration":
        # A manifest that claims one configuration over embeddings made with another.
        changed = _bundle_with_meta(zoo, tmp_path, image_size=64)
    else:
        changed = rewrite(path, change)
    staging = tmp_path / "staging"
    with pytest.raises(BundleError) as refused:
        read_bundle(changed, staging)
    assert refused.value.kind == kind
    assert message in str(refused.value)


def _bundle_with_meta(zoo: Zoo, tmp_path: Path, **meta: object) -> Path:
    """A bundle whose embeddings' metadata disagrees with its manifest's configuration
    (written by hand: ``write_bundle`` only writes consistent zoos)."""
    path = tmp_path / "inconsistent.t2vzoo"
    write_bundle(zoo, path)

    def edit(ms: Members) -> Members:
        record = json.loads(dict(ms)["zoo.json"])
        record["embedding_meta"] = [{**m, **meta} for m in record["embedding_meta"]]
        data = json.dumps(record).encode()
        manifest = json.loads(ms[0][1])
        manifest["files"]["zoo.json"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        return [
            (MANIFEST, json.dumps(manifest).encode()),
            *((n, data if n == "zoo.json" else d) for n, d in ms[1:]),
        ]

    return rewrite(path, edit)


def test_links_and_oversized_members_are_refused(written: tuple[Zoo, Path], tmp_path: Path) -> None:
    _, path = written
    link = tmp_path / "link.t2vzoo"
    with tarfile.open(link, "w:gz") as tar:
        for name, data in members(path):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("experts/evil.pt")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(BundleError, match="is a link or special file"):
        read_bundle(link, tmp_path / "s1")
    with pytest.raises(BundleError, match="at most 100") as refused:
        read_bundle(path, tmp_path / "s2", BundleLimits(max_member_bytes=100))
    assert refused.value.kind == "bundle-hash-mismatch"
    with pytest.raises(BundleError, match="more than 2 members"):
        read_bundle(path, tmp_path / "s3", BundleLimits(max_members=2))


def test_garbage_is_not_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "garbage.t2vzoo"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(BundleError) as refused:
        verify(path)
    assert refused.value.kind == "bundle-corrupt"
