"""Errors the Task2Vec engine raises for problems a caller can fix.

Every error carries a message that names the problem in words a user understands; command
lines and services print the message, never a traceback.
"""


class Task2VecError(Exception):
    """Base class: something about the request (data, weights, options) cannot be used."""


class DatasetError(Task2VecError):
    """The dataset cannot be read, or is not a usable labelled image classification task.

    ``kind`` names the problem in a stable, machine-readable way (the service turns it into
    the problem type URI); the message says it in words.
    """

    def __init__(self, message: str, kind: str = "invalid-dataset") -> None:
        super().__init__(message)
        self.kind = kind


class ProbeWeightsError(Task2VecError):
    """The probe's weights are missing or do not fit the probe's architecture."""


class ConfigError(Task2VecError):
    """Options that contradict each other or the probe (e.g. a layer index out of range)."""


class EmbeddingFileError(Task2VecError):
    """An embedding file is unreadable, or two embeddings cannot be compared."""
