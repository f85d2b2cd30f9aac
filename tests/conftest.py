"""Shared fixtures: small synthetic labelled image tasks (helpers: ``tests.helpers``)."""

from __future__ import annotations

import numpy as np
import pytest

from app.task2vec.datasets import LabelledImages, from_arrays
from tests.helpers import random_images


@pytest.fixture
def tiny_task() -> LabelledImages:
    """48 random 12-px grey images in 3 classes: enough to exercise every code path fast."""
    labels = np.repeat(np.arange(3), 16)
    return from_arrays(random_images(48), labels)
