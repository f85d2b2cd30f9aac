"""The candidate stage of a large task index: PCA-reduced log-embeddings in a FAISS IVF index,
rows for the exact re-rank read from a memory-mapped store.

Per process this holds the reduced vectors (``width`` float32 per task: 1 GB per million
tasks at 256) and the PCA (dim × width); the embeddings stay in the row store, of which a query
touches the few hundred rows it re-ranks. The measured choices (width, lists, probes, the
number re-ranked) are in docs/scale.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.zoo.index_reduce import (
    Reduction,
    log_transform_rows,
    reduced_chunks,
    symmetric_block,
)

#: PCA width: the reduced vectors a query is compared with in the first stage.
WIDTH = 256
#: Rows the PCA is fitted on (a random sample: the zoo's directions, not its every task).
FIT_SAMPLE = 10_000
#: Candidates re-ranked exactly, whatever k is asked (fewer when the zoo is smaller): at least
#: RERANK, and one per RERANK_PER tasks past that. recall@10 measured (docs/scale.md): 200
#: re-ranked gave 1.0 at 10k tasks and 0.997 at 100k, but 0.915 at 1M, where 500 gave 0.990.
RERANK = 200
RERANK_PER = 2_000
#: Inverted lists probed per query, of about 2·sqrt(N) lists.
NPROBE = 32


@dataclass(frozen=True)
class StageSettings:
    width: int = WIDTH
    fit_sample: int = FIT_SAMPLE
    rerank: int = 0  # 0: by the zoo's size (``rerank_for``)
    nprobe: int = NPROBE
    first_stage: str = "ivf"  # "ivf" (IVF-Flat), "ivfpq" (IVF, PQ 64 bytes) or "hnsw"
    seed: int = 0


def rerank_for(count: int) -> int:
    """Candidates to re-rank in a zoo of ``count`` tasks: a fixed share of a larger zoo keeps
    the true neighbours among them as the PCA space crowds."""
    return max(RERANK, -(-count // RERANK_PER))


def _first_stage(kind: str, width: int, count: int) -> tuple[faiss.Index, int]:
    lists = int(min(max(16, 2 * np.sqrt(count)), max(16, count // 39)))
    quantizer = faiss.IndexFlatL2(width)
    if kind == "ivf":
        return faiss.IndexIVFFlat(quantizer, width, lists), lists
    if kind == "ivfpq":
        return faiss.IndexIVFPQ(quantizer, width, lists, 64, 8), lists
    if kind == "hnsw":
        return faiss.IndexIDMap2(faiss.IndexHNSWFlat(width, 32)), 0
    raise ValueError(f"unknown first stage {kind!r}; choose ivf, ivfpq or hnsw")


class CompressedStage:
    """Reduction + FAISS over the reduced rows + the row store they came from."""

    def __init__(
        self,
        reduction: Reduction,
        index: faiss.Index,
        rows: np.memmap,
        factor: float,
        settings: StageSettings,
    ) -> None:
        self.reduction, self.index, self.rows = reduction, index, rows
        self.factor, self.settings = factor, settings
        self._tune()

    def retune(self, rerank: int, nprobe: int) -> None:
        """Search with other numbers of candidates (0: by the zoo's size) and probes (the
        index is unchanged)."""
        rerank = rerank if rerank > 0 else rerank_for(int(self.index.ntotal))
        self.settings = replace(self.settings, rerank=rerank, nprobe=nprobe)
        self._tune()

    def _tune(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self.settings.nprobe
        else:
            mapped: Any = faiss.downcast_index(self.index)
            hnsw: Any = faiss.downcast_index(mapped.index)
            hnsw.hnsw.efSearch = max(64, self.settings.rerank)

    @classmethod
    def build(
        cls, ids: np.ndarray, rows: np.memmap, factor: float, settings: StageSettings
    ) -> CompressedStage:
        """Fit the PCA on a sample of ``rows``, then index every row's reduced vector."""
        count = rows.shape[0]
        if settings.rerank <= 0:
            settings = replace(settings, rerank=rerank_for(count))
        rng = np.random.default_rng(settings.seed)
        sample = np.sort(rng.choice(count, size=min(count, settings.fit_sample), replace=False))
        logs = np.concatenate(
            [
                log_transform_rows(np.asarray(rows[part], np.float32) / np.float32(factor))
                for part in np.array_split(sample, max(1, len(sample) // 1024))
            ]
        )
        reduction = Reduction.fit(logs, settings.width, settings.seed)
        del logs
        reduced = np.concatenate(list(reduced_chunks(rows, reduction, factor)))
        index, lists = _first_stage(settings.first_stage, reduction.width, count)
        if lists:
            train = rng.choice(count, size=min(count, 64 * lists), replace=False)
            index.train(reduced[np.sort(train)])
        index.add_with_ids(reduced, np.asarray(ids, dtype=np.int64))
        return cls(reduction, index, rows, factor, settings)

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        logs = log_transform_rows(np.asarray(query, dtype=np.float64)[None])
        _, found = self.index.search(self.reduction.apply(logs), count)
        out: np.ndarray = np.asarray(found[0], dtype=np.int64)
        return out[out >= 0]

    def distances(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact symmetric distances from ``query`` to the store's ``rows`` (float64)."""
        if len(rows) == 0:
            return np.zeros(0)
        order = np.argsort(rows)
        block = np.asarray(self.rows[rows[order]])
        out = np.empty(len(rows))
        out[order] = symmetric_block(np.asarray(query, np.float64) * self.factor, block)
        return out

    def arrays(self, store: str, digest: str) -> dict[str, Any]:
        """What ``save`` writes beside the ids and version."""
        about = {"store": store, "digest": digest, "factor": self.factor}
        return {
            "mean": self.reduction.mean,
            "components": self.reduction.components,
            "faiss": faiss.serialize_index(self.index),
            "stage": np.array(json.dumps({**about, "settings": vars(self.settings)})),
        }

    @staticmethod
    def about(data: Any) -> dict[str, Any]:
        about: dict[str, Any] = json.loads(str(data["stage"]))
        return about

    @classmethod
    def from_arrays(cls, data: Any, rows: np.memmap) -> CompressedStage:
        about = cls.about(data)
        return cls(
            Reduction(np.asarray(data["mean"]), np.asarray(data["components"])),
            faiss.deserialize_index(np.asarray(data["faiss"])),
            rows,
            float(about["factor"]),
            StageSettings(**about["settings"]),
        )


def store_path(index_file: Path, saved: str) -> Path:
    """A store saved by name beside the index file, or by absolute path."""
    path = Path(saved)
    return path if path.is_absolute() else index_file.parent / path
