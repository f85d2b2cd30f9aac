"""The FAISS task index: candidate recall, exact re-ranking, versioned persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.task2vec.distances import symmetric
from app.task2vec.embedding import Embedding
from app.task2vec.errors import EmbeddingFileError
from app.zoo.index import IndexVersion, TaskIndex, log_transform, recall_at_k


def _zoo(n_families: int = 12, per_family: int = 10, dim: int = 400, seed: int = 0):  # type: ignore[no-untyped-def]
    """Log-normal 'embeddings' in families (shared domain) with task-specific deviations,
    overall scales spanning two orders of magnitude, and dead filters (the same ones for
    every task, as a probe's dead channels are)."""
    rng = np.random.default_rng(seed)
    dead = np.random.default_rng(99).random(dim) < 0.1
    entries = []
    for f in range(n_families):
        family = rng.normal(0, 1.0, dim)
        for t in range(per_family):
            logs = family + rng.normal(0, rng.uniform(0.1, 0.5), dim) + rng.uniform(-2, 2)
            h = np.exp(logs).astype(np.float32)
            h[dead] = 0.0
            entries.append(
                (
                    1000 * (seed + 1) + f * per_family + t,
                    Embedding(h, np.ones_like(h), {"probe": "p"}),
                )
            )
    return entries


def test_transform_distance_is_the_symmetric_distance_for_nearby_tasks() -> None:
    rng = np.random.default_rng(1)
    a = np.exp(rng.normal(0, 2.0, 5000))
    for scale in (1.0, 3.0):  # the overall scale drops out at second order
        b = a * scale * np.exp(rng.normal(0, 0.05, a.shape))
        x = log_transform(np.stack([a, b]))
        approx = float(np.sum((x[0] - x[1]) ** 2))
        exact = symmetric(_emb(a), _emb(b))
        assert approx == pytest.approx(exact, rel=0.05)


def _emb(h: np.ndarray) -> Embedding:
    return Embedding(h.astype(np.float32), np.ones(h.shape, np.float32), {"probe": "p"})


def test_candidate_stage_recall_at_10() -> None:
    entries = _zoo(n_families=6, per_family=20)
    index = TaskIndex.build("p", entries)
    assert recall_at_k(index, entries, k=10) >= 0.95  # default oversampling: 40 candidates


def test_search_returns_the_exact_order_of_its_candidates() -> None:
    entries = _zoo(n_families=3, per_family=5)
    index = TaskIndex.build("p", entries)
    query_id, query = entries[7]
    everything = index.search(query, k=len(entries), oversample=10, exclude=[query_id])
    assert everything == index.exact_search(query, k=len(entries), exclude=[query_id])
    assert query_id not in {n.id for n in everything}
    assert [n.distance for n in everything] == sorted(n.distance for n in everything)
    assert index.search(query, k=1)[0].id == query_id  # itself, at distance 0
    assert index.search(query, k=1)[0].distance == pytest.approx(0.0, abs=1e-9)


def test_saved_index_loads_and_stale_or_damaged_files_are_rejected(tmp_path: Path) -> None:
    entries = _zoo(n_families=2, per_family=4)
    index = TaskIndex.build("p", entries)
    index.save(tmp_path / "index.npz")
    loaded = TaskIndex.load(tmp_path / "index.npz", expected=index.version)
    assert loaded is not None
    assert loaded.version == index.version
    assert loaded.search(entries[0][1], k=3) == index.search(entries[0][1], k=3)

    grown = TaskIndex.build("p", [*entries, *_zoo(n_families=1, per_family=1, seed=5)])
    assert grown.version.count == index.version.count + 1
    assert TaskIndex.load(tmp_path / "index.npz", expected=grown.version) is None  # stale
    assert TaskIndex.load(tmp_path / "missing.npz") is None
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert TaskIndex.load(tmp_path / "bad.npz") is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_version_names_probe_dimension_count_and_content() -> None:
    entries = _zoo(n_families=1, per_family=3, dim=10)
    v = TaskIndex.build("p", entries).version
    assert (v.probe, v.dim, v.count) == ("p", 10, 3)
    changed = [(entries[0][0], Embedding(entries[0][1].hessian * 2, entries[0][1].scale, {}))]
    assert (
        IndexVersion.of("p", np.array([entries[0][0]]), changed[0][1].hessian[None]).content
        != v.content
    )


def test_mixed_probes_and_sizes_are_refused() -> None:
    a = Embedding(np.ones(4, np.float32), np.ones(4, np.float32), {"probe": "resnet34"})
    b = Embedding(np.ones(4, np.float32), np.ones(4, np.float32), {"probe": "efficientnet_lite0"})
    with pytest.raises(EmbeddingFileError, match="tied to one probe"):
        TaskIndex.build("resnet34", [(1, a), (2, b)])
    c = Embedding(np.ones(5, np.float32), np.ones(5, np.float32), {"probe": "resnet34"})
    with pytest.raises(EmbeddingFileError, match="different sizes"):
        TaskIndex.build("resnet34", [(1, a), (2, c)])
    index = TaskIndex.build("resnet34", [(1, a)])
    with pytest.raises(EmbeddingFileError, match="another probe"):
        index.search(c)
