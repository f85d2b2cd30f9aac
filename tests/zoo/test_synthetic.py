"""Synthetic zoos: written chunk by chunk to a float16 memmap, shaped like the real zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.task2vec.errors import EmbeddingFileError
from app.zoo.bundle import read_bundle
from app.zoo.index_store import file_digest
from app.zoo.synthetic import HESSIANS, load_synthetic, write_synthetic
from app.zoo.zoo import Zoo

STARTER = Path(__file__).parents[2] / "app" / "data" / "bundles" / "starter.t2vzoo"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return read_bundle(STARTER, tmp_path_factory.mktemp("starter")).zoo


def test_rows_are_a_float16_memmap_with_the_real_structure(real: Zoo, tmp_path: Path) -> None:
    out = write_synthetic(real, 600, tmp_path / "syn", seed=3, dim=2000)
    syn = load_synthetic(out)
    assert isinstance(syn.hessians, np.memmap)
    assert syn.hessians.dtype == np.float16
    assert (len(syn), syn.dim) == (600, 2000)
    assert syn.errors.shape == (600, len(real.experts))
    assert 0.0 <= syn.errors.min() <= syn.errors.max() <= 1.0
    assert np.isfinite(syn.hessians[:50].astype(np.float32)).all()
    # Every domain of the real zoo is represented, and each row follows its parent's domain.
    real_domains = sorted({t.domain for t in real.tasks})
    assert syn.domain_names == real_domains
    parent_domains = [real_domains.index(real.tasks[p].domain) for p in syn.parents]
    assert syn.domains.tolist() == parent_domains
    # The errors row stays near the parent's (mixture within the domain plus small noise).
    gap = np.abs(syn.errors - real.errors[syn.parents]).mean()
    spread = np.abs(syn.errors - real.errors[np.roll(syn.parents, 1)]).mean()
    assert gap < spread
    # Dead filters of the probe stay dead, as in the real embeddings.
    assert 0.2 < float((syn.hessians[:50] == 0).mean()) < 0.5


def test_same_seed_same_bytes_and_the_digest_is_the_files(real: Zoo, tmp_path: Path) -> None:
    a = write_synthetic(real, 300, tmp_path / "a", seed=1, dim=500)
    b = write_synthetic(real, 300, tmp_path / "b", seed=1, dim=500)
    c = write_synthetic(real, 300, tmp_path / "c", seed=2, dim=500)
    assert (a / HESSIANS).read_bytes() == (b / HESSIANS).read_bytes()
    assert (a / HESSIANS).read_bytes() != (c / HESSIANS).read_bytes()
    saved = load_synthetic(a).manifest["sha256"]
    (a / "hessians.npy.sha256").unlink()
    assert file_digest(a / HESSIANS) == saved  # the digest taken while writing is the file's


def test_zoo_view_wraps_memmap_rows(real: Zoo, tmp_path: Path) -> None:
    syn = load_synthetic(write_synthetic(real, 120, tmp_path / "syn", dim=300))
    zoo = syn.zoo()
    assert len(zoo.tasks) == 120
    assert isinstance(zoo.embeddings[5].hessian, np.memmap)
    assert zoo.embeddings[5].hessian.shape == (300,)
    assert zoo.errors.shape == (120, len(real.experts))


def test_truncated_store_and_bad_arguments_are_refused(real: Zoo, tmp_path: Path) -> None:
    out = write_synthetic(real, 100, tmp_path / "syn", dim=200)
    with (out / HESSIANS).open("r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(EmbeddingFileError, match="truncated"):
        load_synthetic(out)
    with pytest.raises(EmbeddingFileError, match="dim must be"):
        write_synthetic(real, 10, tmp_path / "x", dim=10**7)
    with pytest.raises(EmbeddingFileError, match="not a synthetic zoo"):
        load_synthetic(tmp_path / "nowhere")
