"""The suite's own rules, so that it stays one that never hangs and has a fast loop.

- Tests by level mirror the packages: one file per service in tests/services.
- Tests that start real processes (tests/drills: fault drills; tests/e2e: end to end) are
  marked slow, so that ``make test-fast`` leaves them out.
- No test asserts a wall-clock bound: on a busy machine every duration grows, so a test that
  asserts one fails (or, worse, leaves threads behind and hangs) for reasons that are not
  bugs. A test asserts order and outcomes; a wait on another process or thread is bounded by
  ``tests.helpers.PATIENCE``, a guard against hanging, not a claim about speed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

#: The clock readings a duration is made of.
CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time", "time_ns"}


def _reads_the_clock(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in CLOCKS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "time"
    )


def _bound_names(scope: ast.AST) -> set[str]:
    """Names bound, anywhere in ``scope``, to a clock reading or to anything computed from
    one (a deadline, a duration)."""
    bound: set[str] = set()
    assignments = [
        (node.targets if isinstance(node, ast.Assign) else [node.target], node.value)
        for node in ast.walk(scope)
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
    ]
    while True:
        more = {
            target.id
            for targets, value in assignments
            if _timed(value, bound)
            for target in targets
            if isinstance(target, ast.Name)
        } - bound
        if not more:
            return bound
        bound |= more


def _timed(node: ast.AST, bound: set[str]) -> bool:
    return any(
        _reads_the_clock(part) or (isinstance(part, ast.Name) and part.id in bound)
        for part in ast.walk(node)
    )


def timed_assertions(source: str) -> list[int]:
    """The lines of ``source`` whose assertions read the clock: a duration, a deadline, a
    moment compared with another."""
    found: set[int] = set()
    for scope in ast.walk(ast.parse(source)):
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
            bound = _bound_names(scope)
            found |= {
                node.lineno
                for node in ast.walk(scope)
                if isinstance(node, ast.Assert) and _timed(node.test, bound)
            }
    return sorted(found)


def _test_modules() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_no_test_asserts_a_wall_clock_bound() -> None:
    bad = {
        str(path.relative_to(ROOT)): lines
        for path in _test_modules()
        if (lines := timed_assertions(path.read_text()))
    }
    assert bad == {}


@pytest.mark.parametrize(
    ("source", "timed"),
    [
        ("started = time.monotonic()\nwork()\nassert time.monotonic() - started < 1.0", True),
        ("t = time.perf_counter()\nwaited = time.perf_counter() - t\nassert waited > 2.5", True),
        ("def f():\n    assert abs(sent_at - time.time()) < 120", True),
        ("assert time.monotonic() - started == pytest.approx(4.0, abs=0.5)", True),
        ("before = int(time.time())\nassert before <= sent_at", True),
        ("deadline = time.monotonic() + 5\nassert time.monotonic() < deadline", True),
        ("assert clock.pauses == [0.1, 0.15]", False),
        ("deadline = time.monotonic() + 5\nassert count == 3", False),
    ],
)
def test_the_check_catches_a_timed_assertion(source: str, timed: bool) -> None:
    assert bool(timed_assertions(source)) is timed


#: What starts a process: the standard library's calls and the helpers built on them.
STARTERS = {"Popen", "run", "check_output", "check_call", "start_api", "start_worker", "worker"}
#: Calls that start one whatever they are called on (``ctx.Process``).
ALWAYS = {"Popen", "Process"}


def _marks_slow(node: ast.AST) -> bool:
    return any(isinstance(part, ast.Attribute) and part.attr == "slow" for part in ast.walk(node))


def _starts(node: ast.AST, starters: set[str]) -> bool:
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            module = getattr(getattr(func, "value", None), "id", None)
            if name in ALWAYS or (
                name in starters and (module in (None, "subprocess") or name not in STARTERS)
            ):
                return True
    return False


def unmarked_process_tests(source: str) -> list[str]:
    """The tests of ``source`` that start a process (themselves, through a function of their
    module, or through one of its fixtures) and are not marked slow."""
    tree = ast.parse(source)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    starters = set(STARTERS)
    while more := {f.name for f in functions if f.name not in starters and _starts(f, starters)}:
        starters |= more
    if any(
        isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
        and _marks_slow(n.value)
        for n in tree.body
    ):
        return []
    return [
        f.name
        for f in functions
        if f.name.startswith("test_")
        and not any(_marks_slow(d) for d in f.decorator_list)
        and (f.name in starters or any(a.arg in starters for a in f.args.args))
    ]


def test_tests_that_start_processes_are_marked_slow() -> None:
    """``make test-fast`` is the loop to run while changing code: every test that starts a
    process (the fault drills, end to end, the command line as a user runs it) is left to
    ``make test``."""
    unmarked = {
        str(path.relative_to(ROOT)): names
        for path in _test_modules()
        if (names := unmarked_process_tests(path.read_text()))
    }
    assert unmarked == {}


@pytest.mark.parametrize(
    ("source", "unmarked"),
    [
        ("def test_a():\n    subprocess.run(['x'])", ["test_a"]),
        ("def go():\n    start_api(s)\ndef test_a():\n    go()", ["test_a"]),
        (
            "def live():\n    with worker(s, log):\n        yield\ndef test_a(live):\n    pass",
            ["test_a"],
        ),
        ("@pytest.mark.slow\ndef test_a():\n    subprocess.Popen(['x'])", []),
        ("pytestmark = [pytest.mark.slow]\ndef test_a():\n    subprocess.run(['x'])", []),
        ("def test_a():\n    client.post('/v1/tasks')\n    run_job(s, j)", []),
        ("def test_a():\n    asyncio.run(main())", []),
        ("def test_a():\n    spawn.Process(target=f).start()", ["test_a"]),
    ],
)
def test_the_check_finds_a_test_that_starts_a_process(source: str, unmarked: list[str]) -> None:
    assert unmarked_process_tests(source) == unmarked


def test_every_service_has_its_own_test_file() -> None:
    """tests/services mirrors app/services: a service's direct tests are in one file named for
    it, and no file there is named for a service that does not exist."""
    services = {p.stem for p in (ROOT / "app" / "services").glob("*.py")} - {"__init__"}
    tested = {p.stem.removeprefix("test_") for p in (TESTS / "services").glob("test_*.py")}
    assert (sorted(services - tested), sorted(tested - services)) == ([], [])
