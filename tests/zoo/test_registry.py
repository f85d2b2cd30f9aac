"""The registry of ranking methods, and the baselines that keep the evaluation honest."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from task2vec_client.models import RankingMethod

from app.task2vec.errors import ConfigError
from app.zoo import recommenders
from app.zoo.recommenders import Query, Task2VecKNN, global_best
from app.zoo.recommenders.base import mean_ranks
from app.zoo.recommenders.registry import REGISTRY, names, register
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def zoo(tiny_built: Zoo) -> Zoo:
    return tiny_built


def test_every_served_method_is_registered_and_every_label_baseline_is_not_served() -> None:
    assert set(recommenders.served()) <= set(REGISTRY)
    for method in REGISTRY.values():
        if method.needs == "label":
            assert method.runs == "evaluation", method.name
        if method.needs == "images" and method.served:
            assert method.runs == "worker", method.name
    assert "brute-force" not in recommenders.evaluated()
    assert names(runs=("api",)) + names(runs=("worker",)) == recommenders.served()


def test_the_clients_method_names_are_the_registrys() -> None:
    assert typing.get_args(RankingMethod) == recommenders.served()


def test_a_name_is_registered_once_and_an_unknown_one_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("learned", summary="", needs="embedding", runs="api")(lambda zoo, k: global_best)
    with pytest.raises(ConfigError, match="unknown ranking method 'oracle'; choose one of: "):
        recommenders.method("oracle")
    with pytest.raises(ConfigError, match="choose one of: global-best"):
        recommenders.method("domain-best", among=recommenders.served())


def test_domain_best_ranks_by_the_domains_tasks_and_falls_back_without_them(zoo: Zoo) -> None:
    domain = zoo.tasks[0].domain
    rows = [t for t, task in enumerate(zoo.tasks) if task.domain == domain]
    ranking = recommenders.build("domain-best", zoo)(zoo, Query(domain=domain))
    means = mean_ranks(zoo.errors[rows])
    assert ranking[0].expert == zoo.experts[int(np.argmin(means))].name
    expected = {"mean_rank": float(means.min()), "tasks": len(rows), "of": domain}
    assert ranking[0].evidence == expected
    elsewhere = recommenders.build("domain-best", zoo)(zoo, Query(domain="no such domain"))
    assert elsewhere == global_best(zoo, Query())
    with pytest.raises(ConfigError, match="needs the task's domain label"):
        recommenders.build("domain-best", zoo)(zoo, Query())


def test_source_best_reads_the_source_label(zoo: Zoo) -> None:
    source = zoo.tasks[0].source
    rows = [t for t, task in enumerate(zoo.tasks) if task.source == source]
    ranking = recommenders.build("source-best", zoo)(zoo, Query(source=source))
    assert ranking[0].evidence["tasks"] == len(rows) < len(zoo.tasks)


def test_largest_expert_is_data_blind_and_orders_by_parameters(zoo: Zoo) -> None:
    ranking = recommenders.build("largest-expert", zoo)(zoo, Query())
    sizes = [r.evidence["parameters"] for r in ranking]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(zoo.expert_parameters(e) for e in range(len(zoo.experts)))


def test_one_nn_ranks_by_the_nearest_task_alone(zoo: Zoo) -> None:
    query = Query(zoo.embeddings[2])
    one = recommenders.build("1-nn", zoo)(zoo, query)
    assert one == Task2VecKNN(zoo, 1)(zoo, query)
    assert len(one[0].evidence["neighbours"]) == 1


def test_logme_reads_scores_the_query_carries(zoo: Zoo) -> None:
    scores = {e.name: float(i) for i, e in enumerate(zoo.experts)}
    ranking = recommenders.build("logme", zoo)(zoo, Query(logme=scores))
    assert [r.expert for r in ranking] == [e.name for e in reversed(zoo.experts)]
