"""Building a zoo from a recipe, with every artifact cached under its content hash.

Expert weights, task embeddings and matrix entries live under ``<data dir>/cache``, named by a
hash of everything they depend on (the task recipe, the expert recipe, the embedding
configuration, the evaluation protocol). A rebuild recomputes only what is missing or whose
inputs changed; an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding, embed
from app.task2vec.files import atomic_write
from app.task2vec.probes import load_probe
from app.zoo.experts import ExpertSpec, extract_features, load_expert, train_cnn
from app.zoo.matrix import EvaluationProtocol, holdout_error
from app.zoo.tasks import TaskSpec, materialize
from app.zoo.zoo import Zoo

#: (stage, done, total) — the same shape as the embedding's progress callback.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExpertRecipe:
    """How to obtain an expert: pretrained/random weights, or trained on a zoo task."""

    name: str
    architecture: str
    input_size: int
    weights: str = "train"  # "train", "imagenet" or "random:N"
    source_task: str | None = None
    epochs: int = 6
    seed: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ZooRecipe:
    name: str
    tasks: list[TaskSpec]
    experts: list[ExpertRecipe]
    embed_config: EmbedConfig
    protocol: EvaluationProtocol = field(default_factory=EvaluationProtocol)


def zoo_folder(data_dir: Path, name: str) -> Path:
    """Where the zoo built from preset ``name`` lives under the data directory."""
    return data_dir / "zoos" / name


def _hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ZooBuilder:
    def __init__(self, recipe: ZooRecipe, data_dir: Path, progress: Progress | None = None):
        self.recipe = recipe
        self.cache = data_dir / "cache"
        self.out = zoo_folder(data_dir, recipe.name)
        self.progress = progress
        self._tasks = {t.name: t for t in recipe.tasks}
        self._data: dict[str, LabelledImages] = {}

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def data(self, task: TaskSpec) -> LabelledImages:
        if task.name not in self._data:
            self._data[task.name] = materialize(task)
        return self._data[task.name]

    def expert_key(self, recipe: ExpertRecipe) -> str:
        source = self._tasks[recipe.source_task].key() if recipe.source_task else None
        return _hash(asdict(recipe), source)

    def expert(self, recipe: ExpertRecipe) -> tuple[ExpertSpec, Path | None]:
        """The expert's spec, training and caching its weights when the recipe says so."""
        spec = ExpertSpec(
            recipe.name,
            recipe.architecture,
            recipe.weights,
            recipe.input_size,
            source_task=recipe.source_task,
            tags=recipe.tags,
        )
        if recipe.weights != "train":
            return spec, None
        if recipe.source_task is None:
            raise ValueError(f"expert {recipe.name!r} is trained but names no source task")
        path = self.cache / "experts" / f"{self.expert_key(recipe)}.pt"
        spec = ExpertSpec(**{**asdict(spec), "weights": str(path)})
        if not path.exists():
            state = train_cnn(
                spec,
                self.data(self._tasks[recipe.source_task]),
                epochs=recipe.epochs,
                seed=recipe.seed,
            )
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        return spec, path

    def embedding(self, task: TaskSpec, probe: Any) -> Embedding:
        config = self.recipe.embed_config
        path = self.cache / "embeddings" / f"{_hash(task.key(), asdict(config))}.npz"
        if path.exists():
            return Embedding.load(path)
        e = embed(self.data(task), config, probe=probe)
        e.meta["task"] = task.name
        e.save(path)
        return e

    def matrix_row(self, task: TaskSpec, experts: list[tuple[str, ExpertSpec, Any]]) -> list[float]:
        """Held-out errors of every expert on ``task`` (cached per task and expert)."""
        protocol = self.recipe.protocol
        path = self.cache / "matrix" / f"{_hash(task.key(), asdict(protocol))}.json"
        cached: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        row = []
        changed = False
        for key, spec, model in experts:
            if key not in cached:
                features = extract_features(spec, model, self.data(task))
                cached[key] = holdout_error(features, self.data(task).labels, protocol)
                changed = True
            row.append(cached[key])
        if changed:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(cached)))
        return row

    def build(self) -> Zoo:
        recipe = self.recipe
        experts = []
        weights: dict[str, Path] = {}
        for i, expert_recipe in enumerate(recipe.experts):
            spec, path = self.expert(expert_recipe)
            experts.append((self.expert_key(expert_recipe), spec, load_expert(spec)))
            if path is not None:
                weights[spec.name] = path
            self._report("experts", i + 1, len(recipe.experts))
        config = recipe.embed_config
        probe = load_probe(
            config.probe,
            weights=config.probe_weights,
            image_size=config.image_size,
            seed=config.seed,
        )
        embeddings, rows = [], []
        for i, task in enumerate(recipe.tasks):
            embeddings.append(self.embedding(task, probe))
            rows.append(self.matrix_row(task, experts))
            self._data.pop(task.name, None)
            self._report("tasks", i + 1, len(recipe.tasks))
        zoo = Zoo(
            embed_config=config,
            tasks=list(recipe.tasks),
            embeddings=embeddings,
            experts=[spec for _, spec, _ in experts],
            errors=np.array(rows, dtype=np.float64),
            protocol=recipe.protocol,
        )
        zoo.save(self.out, weights)
        return Zoo.load(self.out)
