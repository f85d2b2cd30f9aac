"""Task2Vec (Achille et al., ICCV 2019) as a pure library: probes, datasets, Fisher, distances.

Nothing here knows about the web service or the job queue; it is used by the command line,
the workers and the zoo alike. The names below load on first use (PEP 562), so that importing
a light submodule (``app.task2vec.limits``, ``app.task2vec.errors``) loads neither torch nor
numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.task2vec.datasets import LabelledImages, from_arrays, load_dataset
    from app.task2vec.distances import asymmetric, distance, distance_matrix, symmetric
    from app.task2vec.embedding import EmbedConfig, Embedding, difficulty, embed
    from app.task2vec.probes import PROBES, ProbeNetwork, load_probe

from app.task2vec.errors import (
    ConfigError,
    DatasetError,
    EmbeddingFileError,
    ProbeWeightsError,
    Task2VecError,
)

_LAZY = {
    "LabelledImages": "datasets",
    "from_arrays": "datasets",
    "load_dataset": "datasets",
    "asymmetric": "distances",
    "distance": "distances",
    "distance_matrix": "distances",
    "symmetric": "distances",
    "EmbedConfig": "embedding",
    "Embedding": "embedding",
    "difficulty": "embedding",
    "embed": "embedding",
    "PROBES": "probes",
    "ProbeNetwork": "probes",
    "load_probe": "probes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "PROBES",
    "ConfigError",
    "DatasetError",
    "EmbedConfig",
    "Embedding",
    "EmbeddingFileError",
    "LabelledImages",
    "ProbeNetwork",
    "ProbeWeightsError",
    "Task2VecError",
    "asymmetric",
    "difficulty",
    "distance",
    "distance_matrix",
    "embed",
    "from_arrays",
    "load_dataset",
    "load_probe",
    "symmetric",
]
