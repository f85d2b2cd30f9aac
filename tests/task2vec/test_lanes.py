"""Lanes: batches side by side, results in order, draws from one generator in turn."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from app.task2vec.lanes import Turnstile, cpu_lanes
from tests.helpers import PATIENCE


@pytest.fixture
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_results_come_in_order_with_few_items_taken_ahead() -> None:
    taken: list[int] = []

    def items() -> object:
        for i in range(12):
            taken.append(i)
            yield i

    def slow_first(i: int) -> int:
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i * i

    with cpu_lanes(torch.device("cpu")) as lanes:
        assert lanes.count == 2
        assert torch.get_num_threads() == 1  # each lane runs on one intra-op thread
        results = []
        for result in lanes.map(slow_first, items()):  # type: ignore[arg-type]
            results.append(result)
            # Never more than one item beyond the lanes ahead of what came back.
            assert len(taken) <= len(results) + lanes.count + 1
    assert results == [i * i for i in range(12)]
    assert torch.get_num_threads() == 2


def test_one_lane_on_a_gpu_device() -> None:
    with cpu_lanes(torch.device("cuda")) as lanes:
        assert lanes.count == 1
        assert list(lanes.map(str, [1, 2])) == ["1", "2"]


@pytest.mark.usefixtures("two_threads")
def test_turnstile_draws_in_step_order_whatever_finishes_first() -> None:
    turnstile = Turnstile()
    order: list[int] = []

    def step(i: int) -> int:
        time.sleep(0.03 * (5 - i))  # later steps reach their turn first
        with turnstile.turn(i):
            order.append(i)
        return i

    with cpu_lanes(torch.device("cpu")) as lanes:
        assert list(lanes.map(step, range(5))) == list(range(5))
    assert order == list(range(5))


@pytest.mark.usefixtures("two_threads")
def test_a_step_that_fails_before_its_turn_does_not_hold_up_the_rest() -> None:
    turnstile = Turnstile()
    passed: list[int] = []

    def step(i: int) -> None:
        try:
            if i == 1:
                raise ValueError("batch 1 failed")
            with turnstile.turn(i):
                passed.append(i)
        finally:
            turnstile.release(i)

    done = threading.Event()

    def run() -> None:
        with pytest.raises(ValueError, match="batch 1"), cpu_lanes(torch.device("cpu")) as lanes:
            list(lanes.map(step, range(4)))
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(PATIENCE)
    assert done.is_set()
    assert passed[:1] == [0]


def test_lanes_share_the_threads_and_stay_few() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with cpu_lanes(torch.device("cpu")) as lanes:
            assert lanes.count == 2  # each lane holds a batch's activations: memory x lanes
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
