"""Task2Vec (Achille et al., ICCV 2019) as a pure library: probes, datasets, Fisher, distances.

Nothing here knows about the web service or the job queue; it is used by the command line,
the workers and the zoo alike.
"""

from app.task2vec.datasets import LabelledImages, from_arrays, load_dataset
from app.task2vec.distances import asymmetric, distance, distance_matrix, symmetric
from app.task2vec.embedding import EmbedConfig, Embedding, difficulty, embed
from app.task2vec.errors import (
    ConfigError,
    DatasetError,
    EmbeddingFileError,
    ProbeWeightsError,
    Task2VecError,
)
from app.task2vec.probes import PROBES, ProbeNetwork, load_probe

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
