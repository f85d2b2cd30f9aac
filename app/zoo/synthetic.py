"""Synthetic zoos of 10k to 1M tasks, made from a real zoo, for measuring the index at scale.

Each synthetic task has a parent real task and a mate of the parent's domain; in log space its
embedding is the mixture (1−w)·log h_parent + w·log h_mate (w ~ U(0, ½)), plus independent
per-filter noise of a spread drawn per task (σ ~ U(0.05, 0.35)) and an overall scale shift
(U(−½, ½), as the real tasks differ in scale). Filters dead in the parent stay dead. So the
synthetic zoo keeps the real dimension's statistics, the real domains as clusters, and the
continuum between related tasks. Its errors row is the same mixture of the two real rows plus
noise (σ = 0.02), clipped to [0, 1]; its domain is the parent's.

``dim`` below the real dimension keeps a fixed random subset of the real filters: a million
tasks of 42,016 float16 values are 84 GB, of ResNet-34's 17,024 (the paper's probe) 34 GB.

The rows are written chunk by chunk to a float16 ``.npy`` (never the whole matrix in RAM),
multiplied by one power of two that keeps them in float16's range; queries made by the same
generator carry the same factor, and the symmetric distance ignores a factor both sides share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import EmbeddingFileError
from app.zoo.index_store import open_rows, power_of_two_factor, write_rows
from app.zoo.matrix import EvaluationProtocol
from app.zoo.zoo import Zoo, expert_from_json, task_from_json

HESSIANS = "hessians.npy"
ERRORS = "errors.npy"
DOMAINS = "domains.npy"
PARENTS = "parents.npy"
MANIFEST = "synthetic.json"
_CHUNK = 256
_DEAD_FLOOR = 1e-30


@dataclass
class SyntheticZoo:
    """A generated zoo on disk: ``hessians`` is a read-only memmap (N, dim) of float16."""

    folder: Path
    hessians: np.memmap
    errors: np.ndarray  # (N, experts), float32
    domains: np.ndarray  # (N,) codes into domain_names
    domain_names: list[str]
    parents: np.ndarray  # (N,) the real task each row was made from
    manifest: dict[str, Any] = field(repr=False)

    @property
    def dim(self) -> int:
        return int(self.hessians.shape[1])

    def __len__(self) -> int:
        return int(self.hessians.shape[0])

    def zoo(self) -> Zoo:
        """A ``Zoo`` whose embeddings wrap the memmap's rows (nothing is read until used).

        Every embedding shares one ``scale`` array and one metadata dict; at a million tasks
        the objects alone take about a gigabyte, so this is for sizes where that is fine."""
        m = self.manifest
        real_tasks = [task_from_json(t) for t in m["tasks"]]
        tasks = [
            replace(real_tasks[p], name=f"syn{i:07d}-{real_tasks[p].name}", seed=i)
            for i, p in enumerate(self.parents.tolist())
        ]
        scale = np.ones(self.dim, dtype=np.float32)
        meta = {**m["embedding_meta"], "synthetic": True}
        embeddings = [Embedding(self.hessians[i], scale, meta) for i in range(len(self))]
        return Zoo(
            EmbedConfig(**m["embed_config"]),
            tasks,
            embeddings,
            [expert_from_json(e) for e in m["experts"]],
            np.asarray(self.errors, dtype=np.float64),
            EvaluationProtocol(**m["protocol"]),
        )


def _real_logs(real: Zoo, filters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log h of the real tasks on the kept filters, and where they are dead (zero)."""
    h = np.stack([e.hessian[filters] for e in real.embeddings]).astype(np.float64)
    dead = h <= 0
    return np.log(np.maximum(h, _DEAD_FLOOR)).astype(np.float32), dead


def _mates(domains: np.ndarray, parents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each parent, a random real task of the same domain (possibly itself)."""
    mates = np.empty_like(parents)
    for i, p in enumerate(parents):
        same = np.flatnonzero(domains == domains[p])
        mates[i] = same[rng.integers(len(same))]
    return mates


def _rows(
    logs: np.ndarray,
    dead: np.ndarray,
    plan: dict[str, np.ndarray],
    factor: float,
    seed: int,
) -> Iterator[np.ndarray]:
    """The synthetic rows, one chunk at a time (float16, times ``factor``)."""
    rng = np.random.default_rng([seed, 1])
    n, dim = len(plan["parents"]), logs.shape[1]
    for start in range(0, n, _CHUNK):
        part = slice(start, min(n, start + _CHUNK))
        p, q, w = plan["parents"][part], plan["mates"][part], plan["weights"][part, None]
        noise = rng.standard_normal((len(p), dim), dtype=np.float32)
        noise *= plan["spread"][part, None]
        x = (1 - w) * logs[p] + w * logs[q] + noise + plan["shift"][part, None]
        h = np.exp(x, dtype=np.float32) * np.float32(factor)
        h[dead[p]] = 0.0
        yield np.minimum(h, np.finfo(np.float16).max).astype(np.float16)


def _plan(real: Zoo, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    domain_names = sorted({t.domain for t in real.tasks})
    domains = np.array([domain_names.index(t.domain) for t in real.tasks])
    parents = rng.integers(len(real.tasks), size=n)
    return {
        "parents": parents,
        "mates": _mates(domains, parents, rng),
        "weights": rng.uniform(0.0, 0.5, n).astype(np.float32),
        "spread": rng.uniform(0.05, 0.35, n).astype(np.float32),
        "shift": rng.uniform(-0.5, 0.5, n).astype(np.float32),
        "domains": domains[parents],
    }


def _errors(real: Zoo, plan: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    w = plan["weights"][:, None].astype(np.float64)
    rows = (1 - w) * real.errors[plan["parents"]] + w * real.errors[plan["mates"]]
    rows += rng.normal(0.0, 0.02, rows.shape)
    out: np.ndarray = np.clip(rows, 0.0, 1.0).astype(np.float32)
    return out


def write_synthetic(
    real: Zoo, n_tasks: int, out: Path, seed: int = 0, *, dim: int | None = None
) -> Path:
    """Generate ``n_tasks`` tasks from ``real`` into the folder ``out``; returns ``out``.

    ``dim``: keep that many of the real filters (a fixed random subset); default all."""
    if n_tasks < 1 or not real.embeddings:
        raise EmbeddingFileError("a synthetic zoo needs a real zoo with tasks and n_tasks >= 1")
    full = real.embeddings[0].dim
    dim = full if dim is None else dim
    if not 1 <= dim <= full:
        raise EmbeddingFileError(f"dim must be between 1 and the real dimension {full}")
    # The kept filters depend on the dimension alone, so that zoos and queries drawn with
    # other seeds describe the same filters.
    pick = np.random.default_rng([dim, 0])
    filters = np.sort(pick.choice(full, size=dim, replace=False)) if dim < full else np.arange(full)
    rng = np.random.default_rng([seed, 0])
    logs, dead = _real_logs(real, filters)
    plan = _plan(real, n_tasks, rng)
    # Headroom of e^(½ + 4σ) over the largest real value, as the noise and shift allow.
    factor = power_of_two_factor(float(np.exp(logs.max() + 0.5 + 4 * 0.35)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = write_rows(
        out / HESSIANS, _rows(logs, dead, plan, factor, seed), n_tasks, dim, "float16"
    )
    np.save(out / ERRORS, _errors(real, plan, rng))
    np.save(out / DOMAINS, plan["domains"].astype(np.int32))
    np.save(out / PARENTS, plan["parents"].astype(np.int32))
    manifest = {
        "n_tasks": n_tasks,
        "dim": dim,
        "seed": seed,
        "factor": factor,
        "sha256": digest,
        "domain_names": sorted({t.domain for t in real.tasks}),
        "tasks": [_task_json(t) for t in real.tasks],
        "experts": [asdict(e) for e in real.experts],
        "embed_config": asdict(real.embed_config),
        "protocol": asdict(real.protocol),
        "embedding_meta": _stable_meta(real.embeddings[0].meta),
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _task_json(task: Any) -> dict[str, Any]:
    raw: dict[str, Any] = asdict(task)
    return raw


def _stable_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "wall_time_s"}


def load_synthetic(out: Path) -> SyntheticZoo:
    """The synthetic zoo written by ``write_synthetic`` into ``out``."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        errors = np.load(out / ERRORS, allow_pickle=False)
        domains = np.load(out / DOMAINS, allow_pickle=False)
        parents = np.load(out / PARENTS, allow_pickle=False)
    except (OSError, ValueError, KeyError) as exc:
        raise EmbeddingFileError(f"{out}: not a synthetic zoo ({exc})") from exc
    rows = open_rows(out / HESSIANS, manifest["n_tasks"], manifest["dim"])
    if rows is None:
        raise EmbeddingFileError(f"{out / HESSIANS}: missing, truncated or of another shape")
    return SyntheticZoo(
        out, rows, errors, domains, list(manifest["domain_names"]), parents, manifest
    )
