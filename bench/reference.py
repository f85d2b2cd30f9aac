"""The public reference Task2Vec, run beside the project in one benchmark: the same images, the
same probe weights, the same machine and the same run, so that only the ratio of the two times
is claimed (absolute times of one machine kind differ by 1.5x or more between machines).

The reference is not part of the project and is never imported by it: its files and a runner
(``run_reference.py``, which times the reference's ``embed()`` with imports and model
construction excluded) live in a folder of their own (``--reference``, ``T2V_REFERENCE_DIR``,
or ``../shared/reference`` beside the repository), and run in a child process. They need
``tqdm``, which the project's development dependencies install.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.task2vec import Embedding
from app.task2vec.datasets import LabelledImages

ROOT = Path(__file__).resolve().parents[1]
RUNNER = "run_reference.py"
CODE = "aws-cv-task2vec"


@dataclass(frozen=True)
class ReferenceRun:
    """One embedding by the reference: the wall time of its ``embed()`` and the embedding."""

    seconds: float
    embedding: Embedding


def locate(folder: str | None = None) -> Path | None:
    """The reference folder (runner and code), or None when this machine has none."""
    for candidate in (
        folder,
        os.environ.get("T2V_REFERENCE_DIR"),
        ROOT.parent / "shared" / "reference",
    ):
        if candidate is None:
            continue
        path = Path(candidate)
        if (path / RUNNER).is_file() and (path / CODE).is_dir():
            return path
    return None


def missing_requirement() -> str | None:
    """What the reference needs and this environment lacks, in words; None when nothing."""
    if importlib.util.find_spec("tqdm") is None:  # the reference's own import
        return "the reference needs tqdm (pip install tqdm; make install does)"
    return None


def run(
    folder: Path,
    data: LabelledImages,
    probe_state: dict[str, torch.Tensor],
    *,
    seed: int,
    image_size: int,
    fisher_samples: int,
    batchnorm: str = "eval",
    threads: int = 2,
) -> ReferenceRun:
    """Embed ``data`` with the reference's ResNet-34 holding ``probe_state``."""
    images = data.images[..., 0] if data.images.shape[-1] == 1 else data.images
    with tempfile.TemporaryDirectory() as tmp:
        task, out, weights = Path(tmp, "task.npz"), Path(tmp, "out.npz"), Path(tmp, "probe.pt")
        np.savez(task, x=images, y=data.labels.astype(np.int64))
        torch.save(probe_state, weights)
        command = [
            sys.executable,
            str(folder / RUNNER),
            "--ref",
            str(folder / CODE),
            "--npz",
            str(task),
            "--out",
            str(out),
            "--weights",
            str(weights),
            "--arch",
            "resnet34",
            "--res",
            str(image_size),
            "--fisher-samples",
            str(fisher_samples),
            "--seed",
            str(seed),
            "--bn-mode",
            batchnorm,
            "--threads",
            str(threads),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the reference failed: {done.stderr.strip()[-2000:]}")
        result = np.load(out)
        embedding = Embedding(
            np.asarray(result["hessian"], dtype=np.float32).ravel(),
            np.asarray(result["scale"], dtype=np.float32).ravel(),
            {"source": "reference"},
        )
        return ReferenceRun(float(result["wall_s"]), embedding)
