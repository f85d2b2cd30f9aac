"""Building a zoo from a recipe, with every artifact cached under its content hash.

Expert weights, task embeddings and matrix entries live under ``<data dir>/cache``, named by a
hash of everything they depend on (the task recipe, the expert recipe, the embedding
configuration, the evaluation protocol and its image split). A rebuild recomputes only what is
missing or whose inputs changed; an interrupted build resumes where it stopped.

Experts train on their source task drawn from the expert pool; zoo tasks are embedded and
measured on their domain's evaluation slice (``provenance.py``). The builder writes which
source images each of them used to ``provenance.json`` in the zoo folder, so the separation
can be checked on the built zoo, not only on the rule.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding, embed
from app.task2vec.files import atomic_write
from app.zoo.experts import ExpertSpec, load_expert, train_expert
from app.zoo.features import extract_features
from app.zoo.matrix import EvaluationProtocol, holdout_error
from app.zoo.provenance import EXPERT_POOL
from app.zoo.recommenders import logme
from app.zoo.tasks import TaskSpec, materialize, source_indices
from app.zoo.zoo import Zoo

#: (stage, done, total) — the same shape as the embedding's progress callback.
Progress = Callable[[str, int, int], None]


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as the same bytes wherever it is written: ``torch.save`` to a file records
    the file's name in the archive (and this one is written under a temporary name), so it
    saves to memory first. The same weights give the same file, and the same zoo bundle."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


@dataclass(frozen=True)
class ExpertRecipe:
    """How to obtain an expert: pretrained/random weights, or trained on a zoo task."""

    name: str
    architecture: str
    input_size: int
    #: "train" (from a random start), "finetune" (a probe architecture from its ImageNet
    #: weights, trained on the source task), "imagenet" or "random:N" (used as they are).
    weights: str = "train"
    source_task: str | None = None
    epochs: int = 6
    seed: int = 0
    lr: float = 2e-3
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ZooRecipe:
    name: str
    tasks: list[TaskSpec]
    experts: list[ExpertRecipe]
    embed_config: EmbedConfig
    protocol: EvaluationProtocol = field(default_factory=EvaluationProtocol)


TRAINED = ("train", "finetune")
PROVENANCE_FILE = "provenance.json"
#: LogME scores of every expert on every zoo task, written beside the zoo by the build.
LOGME_FILE = "logme.json"


def save_logme(folder: Path, zoo: Zoo, scores: np.ndarray) -> None:
    """(tasks, experts, 2) LogME scores and seconds, named by task and expert."""
    record = {
        "tasks": [t.name for t in zoo.tasks],
        "experts": [e.name for e in zoo.experts],
        "scores": scores[..., 0].tolist(),
        "seconds": scores[..., 1].tolist(),
    }
    atomic_write(folder / LOGME_FILE, lambda tmp: tmp.write_text(json.dumps(record)))


def load_logme(zoo: Zoo) -> tuple[np.ndarray, np.ndarray] | None:
    """The build's LogME scores and seconds of ``zoo``, when they are for exactly its tasks
    and experts (a zoo changed since is scored again)."""
    if zoo.folder is None or not (zoo.folder / LOGME_FILE).exists():
        return None
    record = json.loads((zoo.folder / LOGME_FILE).read_text())
    if record["tasks"] != [t.name for t in zoo.tasks] or record["experts"] != [
        e.name for e in zoo.experts
    ]:
        return None
    return np.array(record["scores"]), np.array(record["seconds"])


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
        """The zoo task's images: its domain's evaluation slice."""
        if task.name not in self._data:
            self._data[task.name] = materialize(task, split=self.recipe.protocol.split)
        return self._data[task.name]

    def _expert_pool(self) -> str | None:
        """The pool experts train on: the expert pool, or (no split) the whole task."""
        return None if self.recipe.protocol.split is None else EXPERT_POOL

    def _split_key(self) -> dict[str, Any] | None:
        split = self.recipe.protocol.split
        return None if split is None else asdict(split)

    def expert_key(self, recipe: ExpertRecipe) -> str:
        source = self._tasks[recipe.source_task].key() if recipe.source_task else None
        if self._split_key() is None:
            return _hash(asdict(recipe), source)
        return _hash(asdict(recipe), source, self._split_key())

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
        if recipe.weights not in TRAINED:
            return spec, None
        if recipe.source_task is None:
            raise ValueError(f"expert {recipe.name!r} is trained but names no source task")
        path = self.cache / "experts" / f"{self.expert_key(recipe)}.pt"
        spec = ExpertSpec(**{**asdict(spec), "weights": str(path)})
        if not path.exists():
            source = self._tasks[recipe.source_task]
            state = train_expert(
                spec,
                materialize(source, split=self.recipe.protocol.split, pool=self._expert_pool()),
                init="imagenet" if recipe.weights == "finetune" else "random",
                epochs=recipe.epochs,
                lr=recipe.lr,
                seed=recipe.seed,
            )
            save_weights(state, path)
        return spec, path

    def provenance(self) -> dict[str, Any]:
        """Which source images every zoo task and every trained expert is made of."""
        split = self.recipe.protocol.split

        def used(task: TaskSpec, pool: str | None) -> dict[str, Any]:
            return {
                "source": task.source,
                "indices": source_indices(task, split, pool).tolist(),
            }

        return {
            "split": self._split_key(),
            "tasks": {t.name: used(t, None) for t in self.recipe.tasks},
            "experts": {
                e.name: used(self._tasks[e.source_task], self._expert_pool())
                for e in self.recipe.experts
                if e.weights in TRAINED and e.source_task is not None
            },
        }

    def embedding(self, task: TaskSpec, probe: Any) -> Embedding:
        config = self.recipe.embed_config
        parts: list[Any] = [task.key(), asdict(config)]
        if self._split_key() is not None:
            parts.append(self._split_key())
        path = self.cache / "embeddings" / f"{_hash(*parts)}.npz"
        if path.exists():
            return Embedding.load(path)
        e = embed(self.data(task), config, probe=probe)
        e.meta["task"] = task.name
        e.save(path)
        return e

    def matrix_row(
        self, task: TaskSpec, experts: list[tuple[str, ExpertSpec, Any]]
    ) -> tuple[list[float], list[tuple[float, float]]]:
        """Held-out errors of every expert on ``task``, and the expert's LogME score with the
        seconds it took (forward pass included): both need the same features, so they are
        computed together and cached per task and expert."""
        protocol = self.recipe.protocol
        path = self.cache / "matrix" / f"{_hash(task.key(), asdict(protocol))}.json"
        scores_path = path.with_suffix(".logme.json")
        cached: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        scored: dict[str, list[float]] = (
            json.loads(scores_path.read_text()) if scores_path.exists() else {}
        )
        row, logme_row = [], []
        changed = False
        for key, spec, model in experts:
            if key not in cached or key not in scored:
                data = self.data(task)
                started = time.perf_counter()
                features = extract_features(spec, model, data)
                score = logme(features, data.labels)
                scored[key] = [score, time.perf_counter() - started]
                if key not in cached:
                    cached[key] = holdout_error(features, data.labels, protocol)
                changed = True
            row.append(cached[key])
            logme_row.append((scored[key][0], scored[key][1]))
        if changed:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(cached)))
            atomic_write(scores_path, lambda tmp: tmp.write_text(json.dumps(scored)))
        return row, logme_row

    def build(self) -> Zoo:
        recipe = self.recipe
        experts = []
        weights: dict[str, Path] = {}
        self._report("experts", 0, len(recipe.experts))
        for i, expert_recipe in enumerate(recipe.experts):
            spec, path = self.expert(expert_recipe)
            experts.append((self.expert_key(expert_recipe), spec, load_expert(spec)))
            if path is not None:
                weights[spec.name] = path
            self._report(f"experts: {spec.name}", i + 1, len(recipe.experts))
        config = recipe.embed_config
        probe = config.load_probe()
        embeddings, rows, scores = [], [], []
        self._report("tasks", 0, len(recipe.tasks))
        for i, task in enumerate(recipe.tasks):
            embeddings.append(self.embedding(task, probe))
            row, logme_row = self.matrix_row(task, experts)
            rows.append(row)
            scores.append(logme_row)
            self._data.pop(task.name, None)
            self._report(f"tasks: {task.name}", i + 1, len(recipe.tasks))
        zoo = Zoo(
            embed_config=config,
            tasks=list(recipe.tasks),
            embeddings=embeddings,
            experts=[spec for _, spec, _ in experts],
            errors=np.array(rows, dtype=np.float64),
            protocol=recipe.protocol,
        )
        zoo.save(self.out, weights)
        provenance = json.dumps(self.provenance())
        atomic_write(self.out / PROVENANCE_FILE, lambda tmp: tmp.write_text(provenance))
        save_logme(self.out, zoo, np.array(scores, dtype=np.float64))
        return Zoo.load(self.out)
