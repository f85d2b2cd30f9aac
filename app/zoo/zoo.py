"""A built zoo: tasks with their embeddings, experts, and the performance matrix.

A zoo is tied to one probe and one embedding configuration; embeddings made otherwise are
refused. It is saved as a folder: ``zoo.json`` (configuration, tasks, experts, protocol,
matrix), ``embeddings.npz`` (one row per task), the trained experts' weights, and
``index.npz``, the FAISS task index: a cache of the embeddings, rebuilt whenever its version
no longer matches them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding
from app.task2vec.errors import EmbeddingFileError
from app.zoo.experts import ExpertSpec, load_expert
from app.zoo.index import TaskIndex
from app.zoo.index_zoo import INDEX_FILE as INDEX_FILE
from app.zoo.index_zoo import zoo_index
from app.zoo.matrix import EvaluationProtocol
from app.zoo.tasks import TaskSpec, materialize

FORMAT_VERSION = 1

#: Embedding settings that must agree for two embeddings to be comparable.
COMPARABLE_KEYS = (
    "probe",
    "probe_weights",
    "method",
    "fisher_estimator",
    "fisher_labels",
    "image_size",
    "skip_layers",
)


@dataclass
class Zoo:
    embed_config: EmbedConfig
    tasks: list[TaskSpec]
    embeddings: list[Embedding]
    experts: list[ExpertSpec]
    errors: np.ndarray  # (tasks, experts) held-out error of each expert's features
    protocol: EvaluationProtocol
    folder: Path | None = field(default=None, compare=False)  # where it was loaded from
    #: (tasks, experts) LogME scores of every expert on every task, when they are known (the
    #: build computes them; a subset keeps its cells). What a method that combines the
    #: embedding with LogME fits its rule on.
    logme: np.ndarray | None = field(default=None, repr=False, compare=False)
    _models: dict[int, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    _index: TaskIndex | None = field(default=None, repr=False, compare=False)
    _parent: tuple[Zoo, list[int]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.errors.shape != (len(self.tasks), len(self.experts)):
            raise EmbeddingFileError(
                f"matrix of shape {self.errors.shape} for {len(self.tasks)} tasks and "
                f"{len(self.experts)} experts"
            )
        if len(self.embeddings) != len(self.tasks):
            raise EmbeddingFileError("one embedding per zoo task is needed")
        for task, embedding in zip(self.tasks, self.embeddings, strict=True):
            self.check_compatible(embedding, what=f"task {task.name!r}")

    @property
    def probe(self) -> str:
        return self.embed_config.probe

    def check_compatible(self, embedding: Embedding, what: str = "the embedding") -> None:
        """Refuse an embedding made with another probe or embedding configuration."""
        expected = asdict(self.embed_config)
        for key in COMPARABLE_KEYS:
            got = embedding.meta.get(key)
            want = expected[key]
            if key == "probe_weights" and isinstance(got, str) and want == "imagenet":
                got = "imagenet" if got.startswith("imagenet") else got
            if key == "fisher_estimator" and self.embed_config.method == "variational":
                continue
            if got != want:
                raise EmbeddingFileError(
                    f"{what} was made with {key}={got!r}, but this zoo uses {key}={want!r}: "
                    "a zoo compares only embeddings made with one probe and configuration"
                )

    def expert_model(self, index: int) -> nn.Module:
        """Expert ``index``, loaded once per zoo object rather than once per query; a rebuilt
        zoo is a new object, so replaced weights are never served from a stale copy. A
        ``subset`` borrows the models its parent loaded."""
        if index not in self._models:
            if self._parent is not None:
                parent, experts = self._parent
                self._models[index] = parent.expert_model(experts[index])
            else:
                self._models[index] = load_expert(self.experts[index])
        return self._models[index]

    def subset(self, tasks: list[int], experts: list[int]) -> Zoo:
        """The zoo of only these tasks and experts (in this order): what a recommender sees
        when the others are held out. It shares nothing it could leak through: the index is
        built over the kept embeddings alone, and the matrix holds only the kept cells."""
        zoo = Zoo(
            self.embed_config,
            [self.tasks[t] for t in tasks],
            [self.embeddings[t] for t in tasks],
            [self.experts[e] for e in experts],
            self.errors[np.ix_(tasks, experts)],
            self.protocol,
            logme=None if self.logme is None else self.logme[np.ix_(tasks, experts)],
        )
        zoo._parent = (self, list(experts))
        return zoo

    def task_data(self, index: int, image_size: int = 224) -> LabelledImages:
        """Zoo task ``index``'s images, drawn as its matrix row was measured on them."""
        return materialize(self.tasks[index], image_size=image_size, split=self.protocol.split)

    def index(self) -> TaskIndex:
        """The FAISS index over the zoo's tasks (ids = task positions).

        Loaded from the zoo folder when its saved version matches the embeddings; otherwise
        (missing, stale, damaged) it is rebuilt and saved again, atomically. Flat and exact
        below ``index_zoo.COMPRESSED_FROM`` tasks, compressed from there on.
        """
        if self._index is None:
            self._index = zoo_index(self.probe, self.embeddings, self.folder)
        return self._index

    def expert_parameters(self, index: int) -> int:
        """Expert ``index``'s parameter count: its capacity."""
        return sum(p.numel() for p in self.expert_model(index).parameters())

    def task_index(self, name: str) -> int:
        for i, task in enumerate(self.tasks):
            if task.name == name:
                return i
        raise KeyError(name)

    def best_expert(self, task: int) -> int:
        return int(np.argmin(self.errors[task]))

    # ----------------------------------------------------------------------------------------
    # Persistence

    def save(self, folder: str | Path, weights: dict[str, Path] | None = None) -> None:
        """Write the zoo to ``folder`` atomically (a sibling temp folder, then a rename)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            experts = []
            for expert in self.experts:
                spec = asdict(expert)
                source = (weights or {}).get(expert.name)
                if source is not None:
                    (tmp / "experts").mkdir(exist_ok=True)
                    shutil.copyfile(source, tmp / "experts" / f"{expert.name}.pt")
                    spec["weights"] = f"experts/{expert.name}.pt"
                experts.append(spec)
            manifest: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "embed_config": asdict(self.embed_config),
                "protocol": asdict(self.protocol),
                "tasks": [asdict(t) for t in self.tasks],
                "experts": experts,
                "errors": self.errors.tolist(),
            }
            (tmp / "zoo.json").write_text(json.dumps(manifest, indent=1))
            np.savez(
                tmp / "embeddings.npz",
                hessian=np.stack([e.hessian for e in self.embeddings]),
                scale=np.stack([e.scale for e in self.embeddings]),
                meta=np.array([json.dumps(e.meta, sort_keys=True) for e in self.embeddings]),
            )
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | Path) -> Zoo:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "zoo.json").read_text())
            with np.load(folder / "embeddings.npz", allow_pickle=False) as data:
                hessians, scales, metas = data["hessian"], data["scale"], data["meta"]
        except (OSError, ValueError, KeyError) as exc:
            raise EmbeddingFileError(f"{folder}: not a readable zoo ({exc})") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise EmbeddingFileError(f"{folder}: zoo format {manifest.get('format_version')}")
        experts = []
        for spec in manifest["experts"]:
            weights = spec["weights"]
            if weights.startswith("experts/"):
                spec = {**spec, "weights": str(folder / weights)}
            experts.append(expert_from_json(spec))
        return cls(
            embed_config=EmbedConfig(**manifest["embed_config"]),
            tasks=[task_from_json(t) for t in manifest["tasks"]],
            embeddings=[
                Embedding(h, s, json.loads(str(m)))
                for h, s, m in zip(hessians, scales, metas, strict=True)
            ],
            experts=experts,
            errors=np.array(manifest["errors"], dtype=np.float64),
            protocol=EvaluationProtocol(**manifest["protocol"]),
            folder=folder,
        )


def task_from_json(raw: dict[str, Any]) -> TaskSpec:
    return TaskSpec(
        name=raw["name"],
        source=raw["source"],
        groups=tuple(tuple(g) for g in raw["groups"]),
        group_names=tuple(raw["group_names"]),
        size=raw["size"],
        seed=raw["seed"],
        dataset=raw.get("dataset"),
        domain_name=raw.get("domain_name"),
        transform=raw.get("transform"),
    )


def expert_from_json(raw: dict[str, Any]) -> ExpertSpec:
    return ExpertSpec(
        name=raw["name"],
        architecture=raw["architecture"],
        weights=raw["weights"],
        input_size=raw["input_size"],
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        source_task=raw["source_task"],
        tags=tuple(raw["tags"]),
    )
