"""The hybrid (learned shortlist, LogME re-rank) and the out-of-distribution flag."""

from __future__ import annotations

import numpy as np
import pytest

from app.task2vec.datasets import from_arrays
from app.task2vec.embedding import embed
from app.task2vec.errors import ConfigError
from app.zoo.evaluate import logme_scores
from app.zoo.folds import shared_images
from app.zoo.novelty import Novelty
from app.zoo.recommenders import Query
from app.zoo.recommenders.hybrid import SHORTLISTS, WEIGHTS, Hybrid, Rule, combine, fit_rule
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    """The tiny zoo with its LogME matrix (what the hybrid fits its rule on)."""
    scored = tiny_built.subset(list(range(len(tiny_built.tasks))), list(range(3)))
    scored.logme = logme_scores(tiny_built)[0][:, :3]
    return scored


def test_the_shortlist_leads_and_the_weight_moves_between_the_two_orders() -> None:
    predicted = np.array([0.1, -1.0, 0.5, -0.5, 2.0])  # learned order: 1, 3, 0, 2, 4
    logme = np.array([5.0, 1.0, 0.0, 3.0, 9.0])
    shortlist = [1, 3, 0]
    learned_only = combine(predicted, logme, shortlist, 0.0)
    assert list(np.argsort(-learned_only)) == [1, 3, 0, 2, 4]
    logme_only = combine(predicted, logme, shortlist, 1.0)
    # LogME orders the shortlist (0, 3, 1); the rest follow in the learned order, below it,
    # whatever their LogME (expert 4's 9.0 was never computed in a real query).
    assert list(np.argsort(-logme_only)) == [0, 3, 1, 2, 4]
    assert min(logme_only[shortlist]) > max(logme_only[[2, 4]])


def test_the_rule_comes_from_the_grid_and_needs_the_zoos_logme(zoo: Zoo) -> None:
    rule = fit_rule(zoo, k=3)
    assert rule.shortlist in SHORTLISTS
    assert rule.weight in WEIGHTS
    bare = zoo.subset(list(range(len(zoo.tasks))), list(range(len(zoo.experts))))
    bare.logme = None
    with pytest.raises(ConfigError, match="LogME"):
        fit_rule(bare)


def test_the_hybrid_runs_only_its_shortlist_over_the_images(zoo: Zoo) -> None:
    target = 5
    others = [t for t in range(len(zoo.tasks)) if t not in shared_images(zoo)[target]]
    seen = zoo.subset(others, list(range(len(zoo.experts))))
    hybrid = Hybrid(seen, k=3, rule=Rule(shortlist=2, weight=1.0))
    data = zoo.task_data(target)
    ranking = hybrid(seen, Query(zoo.embeddings[target], data))
    assert {r.expert for r in ranking} == {e.name for e in seen.experts}
    flagged = hybrid.novelty.of(seen, zoo.embeddings[target])["out_of_distribution"]
    passes = [r for r in ranking if "logme" in r.evidence]
    assert len(passes) == (len(seen.experts) if flagged else 2)
    assert ranking[: len(passes)] == passes  # the shortlist leads
    assert sorted(r.evidence["logme_rank"] for r in passes) == list(range(1, len(passes) + 1))
    # Given the same LogME values in the query, it ranks the same without touching images.
    known = {r.expert: r.evidence["logme"] for r in passes}
    known.update({e.name: 0.0 for e in seen.experts if e.name not in known})
    again = hybrid(seen, Query(zoo.embeddings[target], logme=known))
    assert [r.expert for r in again] == [r.expert for r in ranking]


def test_noise_with_random_labels_is_out_of_the_zoos_distribution(zoo: Zoo) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 3, 120)
    data = from_arrays(images, labels)
    noise = embed(data, zoo.embed_config)
    novelty = Novelty.fit(zoo, shared_images(zoo))
    verdict = novelty.of(zoo, noise)
    assert verdict["out_of_distribution"]
    assert verdict["nearest_distance"] > verdict["threshold"]
    assert verdict["zoo_quantile"] == 1.0
    # The zoo's own tasks sit inside it: each, compared with the tasks it shares no image
    # with, is flagged only at the rate the quantile allows (one task of rounding).
    own = [novelty.check(d)["out_of_distribution"] for d in novelty.distances]
    assert np.mean(own) <= 1 - novelty.quantile + 1 / len(own)
