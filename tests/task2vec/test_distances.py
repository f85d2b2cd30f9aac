"""Distances: the paper's definitions, checked on vectors small enough to verify by hand."""

from __future__ import annotations

import numpy as np
import pytest

from app.task2vec.distances import (
    METRICS,
    asymmetric,
    distance,
    distance_matrix,
    memoised_distances,
    symmetric,
    trivial_embedding,
    zero_filter_convention,
)
from app.task2vec.embedding import Embedding, difficulty
from app.task2vec.errors import EmbeddingFileError


def _e(values: list[float], scale: float = 1.0, **meta: object) -> Embedding:
    h = np.array(values, dtype=np.float32)
    return Embedding(h, np.full_like(h, scale), dict(meta))


def test_symmetric_matches_the_definition_by_hand() -> None:
    a, b = _e([1.0, 3.0]), _e([3.0, 1.0])
    # h_a/(h_a+h_b) = (1/4, 3/4), h_b/(h_a+h_b) = (3/4, 1/4): cos = 6/16 / (10/16) = 0.6
    assert symmetric(a, b) == pytest.approx(0.4)
    assert symmetric(a, a) == pytest.approx(0.0)
    assert symmetric(a, b) == pytest.approx(symmetric(b, a))


def test_symmetric_is_invariant_to_scaling_both_but_not_one() -> None:
    rng = np.random.default_rng(0)
    a, b = _e(list(rng.random(50))), _e(list(rng.random(50)))
    a10 = Embedding(a.hessian * 10, a.scale, {})
    b10 = Embedding(b.hessian * 10, b.scale, {})
    assert symmetric(a10, b10) == pytest.approx(symmetric(a, b), rel=1e-5)
    assert symmetric(a10, b) > symmetric(a, b) + 0.1  # why estimators must never be mixed


def test_asymmetric_subtracts_the_complexity_of_the_source() -> None:
    source, target = _e([4.0, 0.5, 2.0]), _e([1.0, 1.0, 1.0])
    t0 = trivial_embedding(source)
    assert np.array_equal(t0.hessian, source.scale)
    expected = symmetric(source, target) - 0.15 * symmetric(source, t0)
    assert asymmetric(source, target) == pytest.approx(expected)
    assert asymmetric(source, target, alpha=0.0) == pytest.approx(symmetric(source, target))
    assert asymmetric(source, target) != pytest.approx(asymmetric(target, source))


def test_zero_filters_in_both_drop_out_as_in_the_reference() -> None:
    assert symmetric(_e([0.0, 1.0]), _e([0.0, 1.0])) == pytest.approx(0.0)
    # Dropped, the dead first filter leaves (1/4, 3/4) against (3/4, 1/4) as by hand above;
    # counted as 1/2 on each side it pulls the two closer.
    a, b = _e([0.0, 1.0, 3.0]), _e([0.0, 3.0, 1.0])
    assert symmetric(a, b) == pytest.approx(0.4)
    with zero_filter_convention("half"):
        assert symmetric(a, b) == pytest.approx(1.0 - (0.25 + 6 / 16) / (0.25 + 10 / 16))


def test_memoised_distances_are_the_plain_ones_and_live_only_inside_the_block() -> None:
    rng = np.random.default_rng(3)
    a, b = _e(list(rng.random(40))), _e(list(rng.random(40)))
    a.hessian[:5] = b.hessian[:5] = 0.0  # filters zero in both: the convention matters
    plain = symmetric(a, b), asymmetric(a, b)
    with memoised_distances():
        assert (symmetric(a, b), asymmetric(a, b)) == plain  # bit for bit
        assert (symmetric(a, b), asymmetric(a, b)) == plain  # now from the memo
        with zero_filter_convention("half"):
            halved = symmetric(a, b)
        assert halved != plain[0]  # the convention is part of the key
        a.hessian[10] *= 3.0  # inside the block, the caller owns not changing embeddings
        assert symmetric(a, b) == plain[0]
    # Outside, nothing is remembered: the changed embedding is measured again.
    assert symmetric(a, b) != plain[0]
    with zero_filter_convention("half"):
        assert symmetric(_e([0.0, 1.0]), _e([0.0, 1.0])) == pytest.approx(0.0)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_is_zero_on_itself_and_positive_elsewhere(metric: str) -> None:
    a, b = _e([1.0, 2.0, 3.0], 0.5), _e([3.0, 1.0, 0.5], 0.5)
    if metric == "asymmetric":
        assert distance(a, a, metric) == pytest.approx(-0.15 * symmetric(a, trivial_embedding(a)))
    else:
        assert distance(a, a, metric) == pytest.approx(0.0, abs=1e-9)
        assert distance(a, b, metric) > 0.0


def test_kl_is_the_gaussian_kl_of_the_posteriors() -> None:
    a, b = _e([2.0]), _e([1.0])  # variances 1/2 and 1
    kl_ab = 0.5 * (0.5 / 1.0 - 1 + np.log(1.0) - np.log(0.5))
    kl_ba = 0.5 * (1.0 / 0.5 - 1 + np.log(0.5) - np.log(1.0))
    assert distance(a, b, "asymmetric_kl") == pytest.approx(kl_ab)
    assert distance(a, b, "kl") == pytest.approx(max(kl_ab, kl_ba))


def test_incomparable_embeddings_are_refused() -> None:
    with pytest.raises(EmbeddingFileError, match="different sizes"):
        distance(_e([1.0, 2.0]), _e([1.0, 2.0, 3.0]))
    with pytest.raises(EmbeddingFileError, match="fisher_estimator"):
        distance(_e([1.0], fisher_estimator="batch"), _e([1.0], fisher_estimator="per-sample"))
    with pytest.raises(EmbeddingFileError, match="unknown metric"):
        distance(_e([1.0]), _e([2.0]), "euclid")


def test_matrix_and_difficulty() -> None:
    es = [_e([1.0, 3.0]), _e([3.0, 1.0]), _e([1.0, 1.0])]
    m = distance_matrix(es)
    assert m.shape == (3, 3)
    assert np.allclose(np.diag(m), 0.0)
    assert m[0, 1] == pytest.approx(0.4)
    assert difficulty(_e([3.0, 4.0])) == pytest.approx(5.0)
    assert difficulty(_e([3.0, 4.0], scale=2.0)) == pytest.approx(2.5)
