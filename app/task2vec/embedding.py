"""Task2Vec: embed a labelled image task as the Fisher information of a probe's weights.

The pipeline (the reference's, made explicit and seeded):

1. take a seeded, class-stratified subset of at most ``max_samples`` images;
2. one forward pass caches the pooled features (the classifier's input) and, with
   ``skip_layers > 0``, the input of ``layers[skip_layers]`` for the images the Fisher step will
   draw — the frozen layers before it are never run again;
3. fit a fresh linear head on the cached features, class-balanced (Adam, lr 4e-4, weight decay
   1e-4, ``head_epochs`` x 10,000 draws' worth of steps, as the reference; see ``fit_head``);
4. estimate the Fisher on ``fisher_samples`` class-balanced draws (see ``fisher.py``);
5. one value per filter, in module order: ``hessian`` and ``scale``.

BatchNorm mode: ``eval`` (default) normalises with the ImageNet running statistics, so an
image's features do not depend on the rest of its batch, and per-sample gradients exist.
``train`` uses batch statistics, as the reference code does; it is offered with the ``batch``
estimator only, to reproduce the reference's numbers.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from app.task2vec import fisher, variational
from app.task2vec.datasets import LabelledImages, iter_batches, to_probe_input
from app.task2vec.errors import ConfigError, EmbeddingFileError
from app.task2vec.files import save_npz
from app.task2vec.head import HeadFit as HeadFit
from app.task2vec.head import fit_head, head_steps
from app.task2vec.lanes import cpu_lanes
from app.task2vec.probes import IMAGENET, ProbeNetwork, load_probe
from app.task2vec.sampling import balanced_draws, stratified_subset

Method = Literal["montecarlo", "variational"]
Estimator = Literal["per-sample", "batch"]
BatchNormMode = Literal["eval", "train"]
Device = Literal["cpu", "cuda", "auto"]
FisherLabels = fisher.LabelExpectation

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that determines an embedding besides the data.

    Embeddings are comparable only when probe, method, estimator, image size and the Fisher
    budget agree (the symmetric distance is not invariant to rescaling one side).
    """

    probe: str = "resnet34"
    probe_weights: str = IMAGENET
    method: Method = "montecarlo"
    fisher_estimator: Estimator = "per-sample"
    #: How the per-sample estimator takes the expectation over model labels (see fisher.py).
    fisher_labels: FisherLabels = "sampled"
    batchnorm: BatchNormMode = "eval"
    image_size: int = 112
    max_samples: int = 2000
    fisher_samples: int = 2048
    batch_size: int = 64
    skip_layers: int = 0
    head_fit: HeadFit = "full-batch"
    head_epochs: int = 10
    seed: int = 0
    device: Device = "auto"
    #: Largest intermediate-feature cache kept for ``skip_layers > 0``; past it the frozen
    #: layers are recomputed per batch instead (same result, more time, bounded memory).
    feature_cache_mb: int = 1024

    def load_probe(self) -> ProbeNetwork:
        """The probe network this configuration names, with its weights."""
        return load_probe(
            self.probe, weights=self.probe_weights, image_size=self.image_size, seed=self.seed
        )

    def validate(self) -> None:
        if self.fisher_labels != "sampled" and (
            self.method != "montecarlo" or self.fisher_estimator != "per-sample"
        ):
            raise ConfigError(
                "fisher-labels gaussian/exact apply to the per-sample Monte Carlo estimator only"
            )
        if self.batchnorm == "train" and (
            self.method != "montecarlo" or self.fisher_estimator != "batch"
        ):
            raise ConfigError(
                "BatchNorm in train mode is only offered with --method montecarlo "
                "--fisher-estimator batch (the reference's setting): per-sample gradients do "
                "not exist when a sample's activations depend on its batch"
            )
        for name in ("image_size", "max_samples", "fisher_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if self.image_size < 16:
            raise ConfigError("image-size must be at least 16 pixels")
        if self.head_epochs < 0 or self.skip_layers < 0:
            raise ConfigError("head-epochs and skip-layers cannot be negative")
        whole_batches = self.method == "variational" or self.fisher_estimator == "batch"
        if whole_batches and self.fisher_samples < self.batch_size:
            what = (
                "the variational method" if self.method == "variational" else "the batch estimator"
            )
            raise ConfigError(
                f"{what} needs fisher-samples ({self.fisher_samples}) of at least one batch "
                f"({self.batch_size})"
            )


@dataclass
class Embedding:
    """A task embedding: per-filter ``hessian`` and ``scale`` vectors plus how they were made."""

    hessian: np.ndarray
    scale: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.hessian.shape[0])

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old file or the complete new one, never half."""
        save_npz(
            path,
            hessian=self.hessian,
            scale=self.scale,
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Embedding:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if not {"hessian", "scale"} <= set(data.files):
                    raise EmbeddingFileError(
                        f"{path.name}: not a Task2Vec embedding (needs 'hessian' and 'scale')"
                    )
                hessian = data["hessian"].astype(np.float32)
                scale = data["scale"].astype(np.float32)
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        except EmbeddingFileError:
            raise
        except (OSError, ValueError) as exc:
            raise EmbeddingFileError(f"{path.name}: unreadable embedding file ({exc})") from exc
        if hessian.ndim != 1 or hessian.shape != scale.shape:
            raise EmbeddingFileError(
                f"{path.name}: hessian {hessian.shape} and scale {scale.shape} must be equal 1-D"
            )
        return cls(hessian, scale, meta)


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


ProgressCallback = Callable[[str, int, int], None]


class _Stage:
    """Reports (stage, done, total) to an optional callback."""

    def __init__(self, callback: ProgressCallback | None, name: str, total: int) -> None:
        self.callback, self.name, self.total, self.done = callback, name, total, 0
        self.update(0)

    def update(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.name, min(self.done, self.total), self.total)


class _TaskInputs:
    """The probe's view of the task: normalised image batches and cached features."""

    def __init__(
        self,
        probe: ProbeNetwork,
        data: LabelledImages,
        config: EmbedConfig,
        device: torch.device,
    ) -> None:
        self.probe, self.data, self.config, self.device = probe, data, config, device
        self.labels = torch.as_tensor(data.labels, device=device)
        self.features = torch.empty(0)
        self.cached: torch.Tensor | None = None
        self.cache_rows: dict[int, int] = {}

    def images(self, indices: np.ndarray) -> torch.Tensor:
        batch = to_probe_input(self.data.images[indices], self.config.image_size)
        batch = self.probe.normalize(batch.to(self.device, non_blocking=True))
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def cache(self, keep: np.ndarray, progress: ProgressCallback | None) -> None:
        """One pass: pooled features of every image; layer-``skip`` inputs of ``keep``.
        Batches run side by side in lanes (``lanes.py``)."""
        skip = self.config.skip_layers
        n = len(self.data)
        keep_set = set(keep.tolist()) if skip > 0 else set()

        def one(idx: np.ndarray) -> tuple[list[int], torch.Tensor | None, torch.Tensor]:
            with torch.no_grad():  # grad mode is per thread
                h = self.probe.trunk(self.images(idx), 0, skip)
                rows = [i for i, j in enumerate(idx) if int(j) in keep_set]
                kept = h[rows].clone() if rows else None
                return [int(idx[i]) for i in rows], kept, self.probe.trunk(h, skip)

        stage = _Stage(progress, "features", n)
        pooled: list[torch.Tensor] = []
        kept_parts: list[torch.Tensor] = []
        batches = list(iter_batches(np.arange(n), self.config.batch_size))
        with cpu_lanes(self.device) as lanes:
            for idx, (images, kept, features) in zip(batches, lanes.map(one, batches), strict=True):
                for image in images:
                    self.cache_rows[image] = len(self.cache_rows)
                if kept is not None:
                    kept_parts.append(kept)
                pooled.append(features)
                stage.update(len(idx))
        self.features = torch.cat(pooled)
        if kept_parts:
            self.cached = torch.cat(kept_parts)

    def layer_input(self, indices: np.ndarray) -> torch.Tensor:
        """Input of ``layers[skip_layers]`` for these images (cached or recomputed)."""
        skip = self.config.skip_layers
        if skip == 0:
            return self.images(indices)
        if self.cached is not None:
            rows = torch.as_tensor([self.cache_rows[int(i)] for i in indices], device=self.device)
            return self.cached[rows]
        with torch.no_grad():
            return self.probe.trunk(self.images(indices), 0, skip)

    def draws(
        self, draws: np.ndarray, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.config.batch_size
        for idx in iter_batches(draws, size):
            if drop_last and len(idx) < size:
                return
            yield self.layer_input(idx), self.labels[torch.as_tensor(idx, device=self.device)]


def layer_input_numel(
    probe: ProbeNetwork, skip_layers: int, image_size: int, device: torch.device
) -> int:
    """Elements of one image's input to ``layers[skip_layers]`` (for the cache budget)."""
    was_training = probe.training
    probe.eval()  # a single image has no batch statistics
    try:
        with torch.no_grad():
            probe_input = torch.zeros(1, 3, image_size, image_size, device=device)
            return int(probe.trunk(probe_input, 0, skip_layers).numel())
    finally:
        probe.train(was_training)


def embed(
    data: LabelledImages,
    config: EmbedConfig,
    *,
    probe: ProbeNetwork | None = None,
    progress: ProgressCallback | None = None,
) -> Embedding:
    """Embed ``data``. A loaded ``probe`` may be passed in (loaded once per process); it is
    copied, never modified. Same data, config and device → the same embedding.

    On CUDA, convolutions run in full float32: cuDNN's default TF32 truncates mantissas to 10
    bits, which moved a GPU embedding 0.0024 (symmetric distance) away from the CPU's, a
    seventh of the seed-to-seed noise, for no reason worth having.
    """
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=True,
        benchmark=cudnn.benchmark,
        deterministic=cudnn.deterministic,
        allow_tf32=False,
    ):
        return _embed(data, config, probe, progress)


def _embed(
    data: LabelledImages,
    config: EmbedConfig,
    probe: ProbeNetwork | None,
    progress: ProgressCallback | None,
) -> Embedding:
    config.validate()
    started = time.perf_counter()
    device = resolve_device(config.device)
    if probe is None:
        probe = config.load_probe()
    elif probe.name != config.probe:
        raise ConfigError(f"probe {probe.name!r} was passed for a config of {config.probe!r}")
    probe = copy.deepcopy(probe).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions run on channels-last tensors without a layout conversion
        # around each call: ResNet-34's forward at 64 px took 0.32 s for 64 images instead
        # of 0.47 s, the per-sample Fisher 19% less (2 cores).
        probe = probe.to(memory_format=torch.channels_last)
    probe.train(config.batchnorm == "train")
    for module in probe.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # Train mode normalises with batch statistics and never reads the running ones:
            # not updating them keeps batches running side by side from writing to one buffer.
            module.track_running_stats = False
    if not 0 <= config.skip_layers < len(probe.layers) - 1:
        raise ConfigError(
            f"skip-layers must be between 0 and {len(probe.layers) - 2} for probe {probe.name!r}"
        )

    generator = torch.Generator().manual_seed(config.seed)
    if config.max_samples < data.num_classes:
        raise ConfigError(
            f"max-samples ({config.max_samples}) is below the number of classes "
            f"({data.num_classes})"
        )
    subset = stratified_subset(data.labels, config.max_samples, generator)
    task = data.subset(subset)
    fisher_draws = balanced_draws(task.labels, config.fisher_samples, generator)

    inputs = _TaskInputs(probe, task, config, device)
    needed = np.unique(fisher_draws)
    if config.skip_layers > 0:
        per_image = layer_input_numel(probe, config.skip_layers, config.image_size, device) * 4
        if per_image * len(needed) > config.feature_cache_mb * 1024**2:
            needed = np.empty(0, dtype=np.int64)  # recompute the frozen prefix per batch
    inputs.cache(needed, progress)
    stage = _Stage(progress, "head", head_steps(config.head_epochs, config.batch_size))
    head_accuracy = fit_head(
        probe,
        inputs.features,
        inputs.labels,
        task.num_classes,
        mode=config.head_fit,
        epochs=config.head_epochs,
        batch_size=config.batch_size,
        generator=generator,
        progress=stage.update,
    )

    stage = _Stage(progress, "fisher", config.fisher_samples)
    if config.method == "variational":
        layers = variational.variational_fisher(
            probe, config.skip_layers, inputs.draws(fisher_draws, True), generator, stage.update
        )
        estimator = None
    elif config.fisher_estimator == "batch":
        layers = fisher.batch_fisher(
            probe, config.skip_layers, inputs.draws(fisher_draws, True), generator, stage.update
        )
        estimator = "batch"
    else:
        with torch.no_grad():  # the model's logits of every image, to draw labels from
            logits = probe.classifier(inputs.features)
        layers = fisher.per_sample_fisher(
            probe,
            config.skip_layers,
            inputs.layer_input,
            fisher_draws,
            logits,
            generator,
            config.batch_size,
            stage.update,
            labels=config.fisher_labels,
        )
        estimator = "per-sample"
    if not layers:
        raise ConfigError(f"no conv or norm layers after skip-layers={config.skip_layers}")

    hessian = np.concatenate([layer.hessian for layer in layers])
    scale = np.concatenate([layer.scale for layer in layers])
    if not np.all(np.isfinite(hessian)):
        raise ConfigError("the Fisher estimate is not finite; try a smaller learning budget")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in asdict(config).items() if k not in {"device", "probe_weights"}},
        "fisher_estimator": estimator,
        "probe_weights": probe.weights_source,
        "device": device.type,
        "num_images": len(data),
        "samples": len(task),
        "num_classes": task.num_classes,
        "classes": list(task.classes),
        "head_train_accuracy": head_accuracy,
        "cached_layer_input": bool(inputs.cached is not None),
        "layout": [[layer.name, int(layer.hessian.shape[0])] for layer in layers],
        "dim": int(hessian.shape[0]),
        "torch": torch.__version__,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return Embedding(hessian, scale, meta)


def difficulty(embedding: Embedding) -> float:
    """Task difficulty as the paper reads it: the norm of the (scale-normalised) embedding."""
    normalised = embedding.hessian.astype(np.float64) / embedding.scale.astype(np.float64)
    return float(math.sqrt(float(np.sum(normalised**2))))
