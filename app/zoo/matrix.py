"""The performance matrix: how well each expert's fixed features solve each zoo task.

Protocol (the paper's "fixed" setting, made deterministic): a seeded, class-stratified split
holds out ``holdout`` of the task's images; features are standardised on the training part;
an L2-regularised multinomial logistic regression (L-BFGS, ``C``) is fit on them; the entry is
its error on the held-out part. The protocol is stored with the numbers, so a matrix is never
compared with one made differently.

The protocol also names the zoo's image provenance (``image_split_seed``, ``expert_share``):
the seeded rule that keeps every image a matrix entry is measured on out of every expert's
training set. Zoos built before that rule existed have no seed and are read as they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from app.task2vec.errors import ConfigError
from app.zoo.provenance import ImageSplit


@dataclass(frozen=True)
class EvaluationProtocol:
    holdout: float = 0.3
    C: float = 1.0
    max_iter: int = 500
    seed: int = 0
    #: The seed of the zoo's ``ImageSplit``; None for zoos built without provenance.
    image_split_seed: int | None = None
    expert_share: float = 0.5

    @property
    def split(self) -> ImageSplit | None:
        """The zoo's split of its sources into expert and evaluation images."""
        if self.image_split_seed is None:
            return None
        return ImageSplit(self.image_split_seed, self.expert_share)

    def resolution(self, size: int) -> float:
        """The smallest non-zero error measurable on a task of ``size`` images: one held-out
        image. Used as the floor when errors are compared relatively or in log space."""
        return 1.0 / max(1, math.ceil(self.holdout * size))

    def describe(self) -> dict[str, Any]:
        return {
            "name": "fixed-features logistic regression",
            "split": f"stratified, {self.holdout:.0%} held out, seed {self.seed}",
            "provenance": (
                "none (experts may have trained on the evaluation images)"
                if self.image_split_seed is None
                else f"images split {self.expert_share:.0%} for experts / rest for zoo tasks, "
                f"per source, seed {self.image_split_seed}; every domain has its own slice"
            ),
            "classifier": f"standardised features, L2 multinomial logistic regression, C={self.C}, "
            f"L-BFGS, at most {self.max_iter} iterations",
            **asdict(self),
        }


def holdout_error(
    features: np.ndarray, labels: np.ndarray, protocol: EvaluationProtocol = EvaluationProtocol()
) -> float:
    """Held-out error in [0, 1] of a linear classifier on ``features``."""
    if features.shape[0] != labels.shape[0]:
        raise ConfigError(f"{features.shape[0]} feature rows for {labels.shape[0]} labels")
    x_train, x_test, y_train, y_test = train_test_split(
        features.astype(np.float64),
        labels,
        test_size=protocol.holdout,
        stratify=labels,
        random_state=protocol.seed,
    )
    # One BLAS thread: these are small problems, and beside torch's OpenMP threads (a worker
    # or a zoo build) a multi-threaded BLAS spun so hard that a 175-image fit took minutes.
    with threadpool_limits(limits=1, user_api="blas"):
        scaler = StandardScaler().fit(x_train)
        model = LogisticRegression(C=protocol.C, max_iter=protocol.max_iter)
        model.fit(scaler.transform(x_train), y_train)
        return float(np.mean(model.predict(scaler.transform(x_test)) != y_test))
