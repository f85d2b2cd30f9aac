"""The CLI's progress reporter, driven directly: plain lines off a terminal, bars on one."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from app.progress import ProgressReporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain() -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def lines(out: StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_plain_lines_for_start_progress_and_finish() -> None:
    console, out = plain()
    clock = Clock()
    with ProgressReporter(console=console, clock=clock) as progress:
        progress("tasks", 0, 150)
        for done in range(1, 13):
            clock.now += 8
            progress("tasks", done, 150)
        clock.now += 14  # past the 10 s throttle
        progress("tasks", 13, 150)
        clock.now += 1000
        progress("tasks", 150, 150)
    got = lines(out)
    assert got[0] == "tasks 0/150 (0%), 0s elapsed"
    assert got[-2] == "tasks 13/150 (8%), 1m50s elapsed, about 19m left"
    assert got[-1] == "tasks 150/150 (100%), 18m30s elapsed, done"
    assert all("left" in line for line in got[1:-1])


def test_no_estimate_before_the_first_item() -> None:
    console, out = plain()
    clock = Clock()
    progress = ProgressReporter(console=console, clock=clock)
    progress("fisher", 0, 10)
    clock.now += 30
    progress("fisher", 0, 10)
    assert lines(out) == ["fisher 0/10 (0%), 0s elapsed", "fisher 0/10 (0%), 30s elapsed"]


def test_thousands_of_items_print_few_lines() -> None:
    console, out = plain()
    clock = Clock()
    with ProgressReporter(console=console, clock=clock) as progress:
        for done in range(1001):
            clock.now += 0.05  # 50 s in all: a few interval lines, the rest by 10% steps
            progress("features", done, 1000)
    got = lines(out)
    assert 10 <= len(got) <= 20
    assert got[0].startswith("features 0/1000 (0%)")
    assert got[-1].startswith("features 1000/1000 (100%)")
    assert got[-1].endswith("done")


def test_stages_interleave_and_restart_with_a_new_total() -> None:
    console, out = plain()
    clock = Clock()
    progress = ProgressReporter(console=console, clock=clock)
    progress("experts: training cnn-16x3", 0, 4)
    progress("head", 0, 2)
    clock.now += 5
    progress("experts: training cnn-32x3", 1, 4)
    progress("head", 2, 2)
    progress("head", 2, 2)  # a repeated finish prints nothing
    progress("head", 0, 3)  # a new run of the stage
    got = lines(out)
    assert got == [
        "experts: training cnn-16x3 0/4 (0%), 0s elapsed",
        "head 0/2 (0%), 0s elapsed",
        "experts: training cnn-32x3 1/4 (25%), 5s elapsed, about 15s left",
        "head 2/2 (100%), 5s elapsed, done",
        "head 0/3 (0%), 0s elapsed",
    ]


def test_quiet_prints_nothing() -> None:
    for terminal in (False, True):
        out = StringIO()
        console = Console(file=out, force_terminal=terminal)
        with ProgressReporter(True, console=console) as progress:
            for done in range(101):
                progress("tasks", done, 100)
        assert out.getvalue() == ""


def test_terminal_renders_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    out = StringIO()
    console = Console(force_terminal=True, file=out, width=120)
    with ProgressReporter(console=console) as progress:
        for done in range(51):
            progress("experts: training cnn-16x3", done, 50)
        progress("evaluate", 1, 10)
        progress("evaluate", 1, 12)  # the total changed: the same bar, updated
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "experts: training cnn-16x3" in text
    assert "50/50" in text
    assert "1/12" in text
    final = text.rsplit("experts: training", 1)[1]
    assert final.count("evaluate") == 1
