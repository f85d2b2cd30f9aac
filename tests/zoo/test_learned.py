"""The learned scorer uses the task embedding: a zoo whose best expert follows the task's
domain, against the same zoo with its embeddings dealt out to the wrong tasks."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from app.task2vec.embedding import EmbedConfig, Embedding
from app.zoo.evaluate import evaluate
from app.zoo.experts import ExpertSpec
from app.zoo.matrix import EvaluationProtocol
from app.zoo.recommenders import LearnedScorer, Query, shuffled_embeddings
from app.zoo.recommenders.learned import _principal_axes
from app.zoo.tasks import TaskSpec
from app.zoo.zoo import COMPARABLE_KEYS, Zoo


def _domain_zoo(tasks_per_domain: int = 12, dim: int = 300, seed: int = 0) -> Zoo:
    """Three domains, each with its own embedding profile; expert d is the best on domain d
    (with noise), and a fourth, generic expert sits in the middle everywhere."""
    rng = np.random.default_rng(seed)
    config = EmbedConfig(probe="synthetic")
    meta = {key: asdict(config)[key] for key in COMPARABLE_KEYS}
    centres = rng.normal(0, 1, (3, dim))
    tasks, embeddings, rows = [], [], []
    for d in range(3):
        for i in range(tasks_per_domain):
            size = int(rng.choice([100, 400, 1600]))
            # Uploaded tasks: they have no source images, so no two of them overlap.
            name = f"d{d}-{i}"
            tasks.append(
                TaskSpec(name, "upload", ((0,), (1,)), ("a", "b"), size, dataset=f"{name}.npz")
            )
            h = np.exp(centres[d] + rng.normal(0, 0.3, dim)).astype(np.float32)
            embeddings.append(
                Embedding(h, np.ones_like(h), {**meta, "num_images": size, "num_classes": 2})
            )
            errors = rng.uniform(0.25, 0.4, 4)
            errors[d] = rng.uniform(0.02, 0.08)
            errors[3] = rng.uniform(0.1, 0.2)
            rows.append(errors)
    experts = [ExpertSpec(f"expert-{d}", "cnn-8x2", "random:0", 28) for d in range(4)]
    return Zoo(config, tasks, embeddings, experts, np.array(rows), EvaluationProtocol())


def _top1(zoo: Zoo, query_zoo: Zoo) -> float:
    hits = []
    everyone = list(range(len(zoo.experts)))
    for t in range(len(zoo.tasks)):
        seen = query_zoo.subset([j for j in range(len(zoo.tasks)) if j != t], everyone)
        ranking = LearnedScorer(seen, k=3)(seen, Query(query_zoo.embeddings[t]))
        hits.append(ranking[0].expert == zoo.experts[zoo.best_expert(t)].name)
    return float(np.mean(hits))


def test_learned_scorer_beats_its_shuffled_embedding_control() -> None:
    zoo = _domain_zoo(tasks_per_domain=8)
    assert _top1(zoo, zoo) >= 0.9
    for seed in range(2):
        assert _top1(zoo, shuffled_embeddings(zoo, seed)) <= 0.6


def test_evaluation_reports_the_shuffled_control() -> None:
    zoo = _domain_zoo(tasks_per_domain=6)
    methods = ["learned", "learned-shuffled", "global-best"]
    results = evaluate(zoo, methods, k=3, protocols=("task",))
    summary = results["protocols"]["task"]["recommenders"]
    assert summary["learned"]["top1"] > summary["learned-shuffled"]["top1"]
    assert summary["learned"]["rel_error_increase"] < summary["global-best"]["rel_error_increase"]


def test_shuffled_embeddings_leave_no_task_its_own() -> None:
    zoo = _domain_zoo(tasks_per_domain=2)
    control = shuffled_embeddings(zoo, seed=1)
    assert not any(a is b for a, b in zip(zoo.embeddings, control.embeddings, strict=True))
    assert sorted(id(e) for e in control.embeddings) == sorted(id(e) for e in zoo.embeddings)


def test_the_principal_axes_are_the_svds_up_to_sign() -> None:
    x = np.random.default_rng(0).normal(size=(30, 500))
    x -= x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    expected = vt[:4].T / singular[:4]
    got = _principal_axes(x, 4)
    signs = np.sign((expected * got).sum(axis=0))
    np.testing.assert_allclose(got * signs, expected, atol=1e-12)
