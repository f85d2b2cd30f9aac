"""The probe's view of a task while it is embedded: normalised image batches, the pooled
features of one forward pass (what the head is fitted on), and the input of the first layer
whose Fisher is taken, cached for the images the Fisher step draws or recomputed per batch.
Each stage reports its progress as (stage, done, total)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.task2vec import plans
from app.task2vec.datasets import LabelledImages, iter_batches, to_probe_input
from app.task2vec.lanes import cpu_lanes
from app.task2vec.probes import ProbeNetwork

if TYPE_CHECKING:  # embedding.py imports this module: only the configuration's type here
    from app.task2vec.embedding import EmbedConfig

ProgressCallback = Callable[[str, int, int], None]


class Stage:
    """Reports (stage, done, total) to an optional callback."""

    def __init__(self, callback: ProgressCallback | None, name: str, total: int) -> None:
        self.callback, self.name, self.total, self.done = callback, name, total, 0
        self.update(0)

    def update(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.name, min(self.done, self.total), self.total)


class TaskInputs:
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
        #: The plan of the embedding that made these inputs: set once, lanes may read it.
        self.memory_format = plans.current().memory_format(device)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        batch = to_probe_input(self.data.images[indices], self.config.image_size)
        batch = self.probe.normalize(batch.to(self.device, non_blocking=True))
        return batch.contiguous(memory_format=self.memory_format)

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

        stage = Stage(progress, "features", n)
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
        # float32 whatever the passes ran in (bfloat16 autocast): the head is fit on these.
        self.features = torch.cat(pooled).float()
        if kept_parts:
            self.cached = torch.cat(kept_parts).float()

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
