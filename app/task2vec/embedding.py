"""Task2Vec: embed a labelled image task as the Fisher information of a probe's weights.

The pipeline (the reference's, made explicit and seeded):

1. take a seeded, class-stratified subset of at most ``max_samples`` images;
2. one forward pass caches the pooled features (the classifier's input) and, with
   ``skip_layers > 0``, the input of ``layers[skip_layers]`` for the images the Fisher step will
   draw — the frozen layers before it are never run again (``inputs.py``);
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from app.task2vec import fisher, plans, variational
from app.task2vec.datasets import LabelledImages
from app.task2vec.errors import ConfigError, EmbeddingFileError
from app.task2vec.files import save_npz
from app.task2vec.head import HeadFit as HeadFit
from app.task2vec.head import fit_head, head_steps
from app.task2vec.inputs import ProgressCallback, Stage, TaskInputs, layer_input_numel
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


def embed(
    data: LabelledImages,
    config: EmbedConfig,
    *,
    probe: ProbeNetwork | None = None,
    progress: ProgressCallback | None = None,
    plan: plans.ExecutionPlan | None = None,
) -> Embedding:
    """Embed ``data``. A loaded ``probe`` may be passed in (loaded once per process); it is
    copied, never modified. Same data, config and device → the same embedding. ``plan``: how
    the passes run on a CPU (``plans.py``; by default the context's, ``plans.current()``).

    On CUDA, convolutions run in full float32: cuDNN's default TF32 truncates mantissas to 10
    bits, which moved a GPU embedding 0.0024 (symmetric distance) away from the CPU's, a
    seventh of the seed-to-seed noise, for no reason worth having.
    """
    cudnn = torch.backends.cudnn
    with (
        cudnn.flags(
            enabled=True,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        ),
        plans.using(plan or plans.current()),
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
    probe = _prepared_probe(config, probe, device)
    generator = torch.Generator().manual_seed(config.seed)
    task, draws = _drawn(data, config, generator)
    inputs = TaskInputs(probe, task, config, device)
    accuracy = _fitted_head(inputs, draws, generator, progress)
    layers, estimator = _fisher(inputs, draws, generator, progress)
    return _assembled(inputs, layers, estimator, len(data), accuracy, started)


def _prepared_probe(
    config: EmbedConfig, probe: ProbeNetwork | None, device: torch.device
) -> ProbeNetwork:
    """A copy of the probe on ``device`` in the BatchNorm mode asked for: a probe passed in
    (loaded once per process) is never modified."""
    if probe is None:
        probe = config.load_probe()
    elif probe.name != config.probe:
        raise ConfigError(f"probe {probe.name!r} was passed for a config of {config.probe!r}")
    probe = copy.deepcopy(probe).to(device)
    # On the 2-core AMD EPYC, oneDNN's convolutions ran on channels-last tensors without a
    # layout conversion around each call: ResNet-34's forward at 64 px took 0.32 s for 64
    # images instead of 0.47 s, the per-sample Fisher 19% less. The plan says (plans.py).
    probe = probe.to(memory_format=plans.current().memory_format(device))
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
    return probe


def _drawn(
    data: LabelledImages, config: EmbedConfig, generator: torch.Generator
) -> tuple[LabelledImages, np.ndarray]:
    """The class-stratified subset that is embedded, and the images the Fisher step draws
    from it, both from ``generator`` and in this order: the same seed, the same images."""
    if config.max_samples < data.num_classes:
        raise ConfigError(
            f"max-samples ({config.max_samples}) is below the number of classes "
            f"({data.num_classes})"
        )
    task = data.subset(stratified_subset(data.labels, config.max_samples, generator))
    return task, balanced_draws(task.labels, config.fisher_samples, generator)


def _fitted_head(
    inputs: TaskInputs,
    draws: np.ndarray,
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> float:
    """Cache the features in one pass, then fit a fresh head on them (its training accuracy
    is returned): the Fisher is the probe's with a head for this task. With
    ``skip_layers``, the frozen prefix's output is cached for the drawn images too, unless it
    would take more than ``feature_cache_mb``."""
    probe, config = inputs.probe, inputs.config
    needed = np.unique(draws)
    if config.skip_layers > 0:
        numel = layer_input_numel(probe, config.skip_layers, config.image_size, inputs.device)
        if numel * 4 * len(needed) > config.feature_cache_mb * 1024**2:
            needed = np.empty(0, dtype=np.int64)  # recompute the frozen prefix per batch
    inputs.cache(needed, progress)
    stage = Stage(progress, "head", head_steps(config.head_epochs, config.batch_size))
    return fit_head(
        probe,
        inputs.features,
        inputs.labels,
        inputs.data.num_classes,
        mode=config.head_fit,
        epochs=config.head_epochs,
        batch_size=config.batch_size,
        generator=generator,
        progress=stage.update,
    )


def _fisher(
    inputs: TaskInputs,
    draws: np.ndarray,
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> tuple[list[fisher.LayerFisher], Estimator | None]:
    """The Fisher of each layer after ``skip_layers`` on the drawn images, by the method and
    estimator configured (``fisher.py``, ``variational.py``), and which estimator that was
    (None for the variational method): the meta records it."""
    probe, config = inputs.probe, inputs.config
    stage = Stage(progress, "fisher", config.fisher_samples)
    if config.method == "variational":
        batches = inputs.draws(draws, True)
        layers = variational.variational_fisher(
            probe, config.skip_layers, batches, generator, stage.update
        )
        return layers, None
    if config.fisher_estimator == "batch":
        batches = inputs.draws(draws, True)
        layers = fisher.batch_fisher(probe, config.skip_layers, batches, generator, stage.update)
        return layers, "batch"
    with torch.no_grad():  # the model's logits of every image, to draw labels from
        logits = probe.classifier(inputs.features)
    layers = fisher.per_sample_fisher(
        probe,
        config.skip_layers,
        inputs.layer_input,
        draws,
        logits,
        generator,
        config.batch_size,
        stage.update,
        labels=config.fisher_labels,
    )
    return layers, "per-sample"


def _assembled(
    inputs: TaskInputs,
    layers: list[fisher.LayerFisher],
    estimator: Estimator | None,
    num_images: int,
    head_accuracy: float,
    started: float,
) -> Embedding:
    """The layers' values end to end in module order, with what makes two embeddings
    comparable (the configuration, probe, layout) and how this one was made."""
    config, task = inputs.config, inputs.data
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
        "probe_weights": inputs.probe.weights_source,
        "device": inputs.device.type,
        "num_images": num_images,
        "samples": len(task),
        "num_classes": task.num_classes,
        "classes": list(task.classes),
        "head_train_accuracy": head_accuracy,
        "cached_layer_input": bool(inputs.cached is not None),
        "layout": [[layer.name, int(layer.hessian.shape[0])] for layer in layers],
        "dim": int(hessian.shape[0]),
        "torch": torch.__version__,
        "execution": plans.current().name if inputs.device.type == "cpu" else None,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return Embedding(hessian, scale, meta)


def difficulty(embedding: Embedding) -> float:
    """Task difficulty as the paper reads it: the norm of the (scale-normalised) embedding."""
    normalised = embedding.hessian.astype(np.float64) / embedding.scale.astype(np.float64)
    return float(math.sqrt(float(np.sum(normalised**2))))
