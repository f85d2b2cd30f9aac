"""Execution plans: the calibration picks the faster plan, caches it per CPU model, ignores a
corrupt cache; a plan changes how the passes run, not the float32 embedding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.task2vec import EmbedConfig, Embedding, embed, from_arrays
from app.task2vec import calibration as cal
from app.task2vec.calibration import Calibration, Fidelity, PlanCache, calibrate, plan_key
from app.task2vec.datasets import LabelledImages
from app.task2vec.distances import symmetric
from app.task2vec.lanes import cpu_lanes
from app.task2vec.plans import CANDIDATES, DEFAULT, ExecutionPlan, using
from app.task2vec.probes import load_probe

ONE_LANE = ExecutionPlan(1, True)


class FakeClock:
    """A timer that a trial moves forward by its plan's cost: the calibration reads only it."""

    def __init__(self, costs: dict[ExecutionPlan, float]) -> None:
        self.now, self.costs = 0.0, costs
        self.trials: list[ExecutionPlan] = []

    def __call__(self) -> float:
        return self.now

    def trial(self, plan: ExecutionPlan) -> None:
        self.trials.append(plan)
        self.now += self.costs[plan]


def _costs(fastest: ExecutionPlan, bf16: float = 9.0) -> dict[ExecutionPlan, float]:
    costs = {plan: 2.0 + i for i, plan in enumerate(CANDIDATES)}
    costs[fastest] = 1.0
    costs.update({replace(p, bf16=True): bf16 for p in CANDIDATES})
    return costs


@pytest.mark.parametrize("fastest", CANDIDATES, ids=lambda p: p.name)
def test_the_calibration_picks_the_fastest_plan(fastest: ExecutionPlan) -> None:
    clock = FakeClock(_costs(fastest))
    found = calibrate(clock.trial, timer=clock, rounds=2)
    assert found.plan == fastest
    assert found.seconds[fastest.name] == 1.0
    assert set(clock.trials) == set(CANDIDATES)  # every plan timed
    assert clock.trials.count(fastest) == 2
    assert found.fidelity is None  # no bfloat16 check asked for: never tried
    assert not any(p.bf16 for p in clock.trials)


def test_a_hopeless_plan_is_not_timed_again() -> None:
    clock = FakeClock({plan: 1.0 if plan == ONE_LANE else 10.0 for plan in CANDIDATES})
    assert calibrate(clock.trial, timer=clock, rounds=3).plan == ONE_LANE
    assert clock.trials.count(ONE_LANE) == 3
    assert len(clock.trials) == 3 + len(CANDIDATES) - 1


def test_a_plan_is_timed_by_its_best_round() -> None:
    slow_once = {plan: [5.0, 1.0] if plan == ONE_LANE else [2.0, 2.0] for plan in CANDIDATES}
    clock = FakeClock({})

    def trial(plan: ExecutionPlan) -> None:
        clock.now += slow_once[plan].pop(0)  # a burst of load in the first round

    assert calibrate(trial, timer=clock).plan == ONE_LANE


@pytest.mark.parametrize(
    ("bf16_cost", "faithful", "chosen_bf16"),
    [(0.5, True, True), (0.5, False, False), (3.0, True, False)],
)
def test_bfloat16_only_when_faster_and_faithful(
    bf16_cost: float, faithful: bool, chosen_bf16: bool
) -> None:
    clock = FakeClock(_costs(ONE_LANE, bf16=bf16_cost))
    checked: list[ExecutionPlan] = []

    def check(plan: ExecutionPlan) -> Fidelity:
        checked.append(plan)
        return Fidelity(0.999 if faithful else 0.9, True)

    found = calibrate(clock.trial, check, timer=clock)
    assert checked == [replace(ONE_LANE, bf16=True)]
    assert found.plan == replace(ONE_LANE, bf16=chosen_bf16)
    assert found.fidelity is not None
    assert found.fidelity["same_ranking"]


def test_fidelity_needs_correlation_and_the_same_ranking() -> None:
    rng = np.random.default_rng(0)
    h = np.exp(rng.normal(size=200)).astype(np.float32)

    def e(values: np.ndarray) -> Embedding:
        return Embedding(values.astype(np.float32), np.ones_like(values, dtype=np.float32))

    refs = [e(h * np.exp(rng.normal(scale=s, size=200))) for s in (0.1, 0.5, 1.0, 2.0)]
    close = cal.fidelity(e(h), e(h * (1 + 1e-3 * rng.normal(size=200))), refs)
    assert close.holds
    assert close.correlation > 0.999
    far = cal.fidelity(e(h), e(h[::-1].copy()), refs)
    assert not far.holds
    assert Fidelity(0.999, False).holds is False


def test_only_cpus_with_native_bfloat16_try_it() -> None:
    assert cal.bf16_capable({"avx2", "avx512f", "avx512_bf16"})
    assert cal.bf16_capable({"amx_bf16", "amx_tile"})
    assert not cal.bf16_capable({"avx2", "avx512f", "fma"})


def test_the_cache_is_keyed_by_cpu_model_and_reused(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path / "cache" / "execution-plans.json")
    epyc = plan_key("resnet34", 64, model="AMD EPYC")
    xeon = plan_key("resnet34", 64, model="Intel(R) Xeon(R) Platinum 8480+")
    assert epyc != xeon
    assert torch.__version__ in epyc
    cache.put(epyc, Calibration(DEFAULT, {DEFAULT.name: 1.0}))
    cache.put(xeon, Calibration(ONE_LANE, {ONE_LANE.name: 1.0}))
    again = PlanCache(cache.path)
    assert again.get(epyc) == DEFAULT
    assert again.get(xeon) == ONE_LANE
    assert again.get(plan_key("resnet34", 64, model="another CPU")) is None
    assert again.get(plan_key("resnet18", 64, model="AMD EPYC")) is None


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"format": 1, "plans": []}', '{"format": 99, "plans": {}}'],
)
def test_a_corrupt_cache_is_ignored_and_written_again(tmp_path: Path, text: str) -> None:
    cache = PlanCache(tmp_path / "plans.json")
    cache.path.write_text(text)
    key = plan_key("resnet18", 32, model="AMD EPYC")
    assert cache.get(key) is None
    cache.put(key, Calibration(ONE_LANE, {}))
    assert cache.get(key) == ONE_LANE


def test_a_corrupt_entry_is_ignored(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path / "plans.json")
    key = plan_key("resnet18", 32, model="AMD EPYC")
    bad = {"plan": {"lanes": "two", "channels_last": True, "bf16": False}}
    cache.path.write_text(json.dumps({"format": 1, "plans": {key: bad}}))
    assert cache.get(key) is None


TINY = EmbedConfig(
    probe="resnet18",
    probe_weights="random:0",
    image_size=32,
    max_samples=48,
    fisher_samples=32,
    batch_size=8,
    head_epochs=1,
    device="cpu",
)


@pytest.fixture(scope="module")
def task() -> LabelledImages:
    rng = np.random.default_rng(3)
    return from_arrays(rng.integers(0, 256, (48, 16, 16), dtype=np.uint8), np.arange(48) % 3)


def test_measured_plan_is_calibrated_once_then_read_back(
    tmp_path: Path, task: LabelledImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = load_probe("resnet18", weights="random:0", image_size=32)
    monkeypatch.setattr(cal, "bf16_capable", lambda flags=None: False)
    clock = FakeClock({})
    cache = PlanCache(tmp_path / "plans.json")
    first = cal.measured_plan(cache, task, TINY, probe, timer=clock)
    assert first in CANDIDATES
    assert cache.get(plan_key("resnet18", 32)) == first

    def no_embedding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached plan is not measured again")

    monkeypatch.setattr(cal, "embed", no_embedding)
    assert cal.measured_plan(PlanCache(cache.path), task, TINY, probe) == first


def test_the_plan_sets_lanes_and_layout(task: LabelledImages) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with using(ONE_LANE), cpu_lanes(torch.device("cpu")) as lanes:
            assert lanes.count == 1
            assert torch.get_num_threads() == 2
        with cpu_lanes(torch.device("cpu")) as lanes:
            assert lanes.count == 2
    finally:
        torch.set_num_threads(before)
    e = embed(task, TINY, plan=ExecutionPlan(1, False))
    assert e.meta["execution"] == "1 lane, contiguous"


@pytest.mark.parametrize("estimator", ["per-sample", "batch"])
def test_float32_plans_give_the_same_embedding(task: LabelledImages, estimator: str) -> None:
    config = replace(TINY, fisher_estimator=estimator)  # type: ignore[arg-type]
    base = embed(task, config, plan=DEFAULT)
    for plan in CANDIDATES[1:]:
        other = embed(task, config, plan=plan)
        assert symmetric(base, other) < 1e-4, plan.name


LITE = replace(TINY, probe="efficientnet_lite0", probe_weights="imagenet", fisher_labels="gaussian")


@pytest.mark.parametrize("config", [TINY, LITE], ids=["resnet18", "efficientnet_lite0"])
def test_bfloat16_autocast_runs_the_passes_in_bfloat16(
    task: LabelledImages, config: EmbedConfig
) -> None:
    e = embed(task, config, plan=replace(DEFAULT, bf16=True))
    assert np.all(np.isfinite(e.hessian))
    assert e.meta["execution"].endswith("bf16")
    seen: list[torch.dtype] = []
    with using(replace(DEFAULT, bf16=True)), cpu_lanes(torch.device("cpu")) as lanes:
        layer = torch.nn.Linear(4, 4)
        seen.extend(lanes.map(lambda x: layer(x).dtype, [torch.ones(2, 4)]))
    assert seen == [torch.bfloat16]


def test_bfloat16_is_used_only_where_the_cpu_has_it() -> None:
    assert DEFAULT.bf16 is False
    assert not any(p.bf16 for p in CANDIDATES)
