"""The layout reads as the data flow, and stays so: entry points (the API, the workers, the
command line) → services → zoo → Task2Vec, with the database models beside. No import runs
back up; every import statement counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.api.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

#: What an entry point (the API, the workers, the command line) may import.
_ENTRY_POINT = {
    "app.services",
    "app.observability",
    "app.zoo",
    "app.task2vec",
    "app.db",
    "app.settings",
}

#: Each package (or module) and what it may import from the project, besides itself.
ALLOWED: dict[str, set[str]] = {
    "app.api": _ENTRY_POINT,
    "workers": _ENTRY_POINT,
    "app.cli": {*_ENTRY_POINT, "app.progress"},
    "app.services": {
        "app.observability",
        "app.zoo",
        "app.task2vec",
        "app.data",
        "app.db",
        "app.settings",
    },
    # Metrics and logs: the standard library and prometheus_client; the job ledger is read
    # from the models.
    "app.observability": {"app.db", "app.settings"},
    "app.zoo": {"app.task2vec", "app.data"},
    "app.data": {"app.task2vec"},
    "app.task2vec": set(),
    "app.db": set(),
    # Settings load for every migration: the upload limits, nothing heavier.
    "app.settings": {"app.task2vec.limits", "app.task2vec.errors"},
    "app.progress": set(),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> str | None:
    matches = [p for p in ALLOWED if _within(module, p)]
    return max(matches, key=len) if matches else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _layer(node.module) is not None:
                found.append((node.lineno, node.module))
            else:  # ``from app import services``: the names are the modules
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(module: str, source: str) -> list[str]:
    """Imports in ``source`` (the code of ``module``) that run against the layers."""
    own = _layer(module)
    if own is None:
        return [f"{module}: in no layer"]
    return [
        f"{module}:{line} imports {target}"
        for line, target in _imports(source)
        if _layer(target) not in (None, own)
        and not any(_within(target, allowed) for allowed in ALLOWED[own])
    ]


def _project_modules() -> list[Path]:
    """Every module of the project but the empty ``app/__init__.py``."""
    found = [*ROOT.joinpath("app").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")]
    return sorted(p for p in found if p != ROOT / "app" / "__init__.py")


def test_no_import_runs_back_up() -> None:
    bad = [
        v for path in _project_modules() for v in violations(_module_name(path), path.read_text())
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("app.services.uploads", "from app.api.problems import ProblemError"),
        ("app.zoo.zoo", "def f():\n    from app.services import serving"),
        ("app.task2vec.embedding", "import app.zoo.experts"),
        ("app.settings", "from app.task2vec.datasets import LabelledImages"),
        ("app.api.main", "from workers.tasks import celery"),
        ("workers.tasks", "from app import api"),
        ("app.observability.metrics", "from app.services.jobs import JobKind"),
    ],
)
def test_the_check_catches_an_upward_import(module: str, source: str) -> None:
    assert violations(module, source)


def test_every_module_is_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _project_modules()}
    assert {path: n for path, n in sizes.items() if n > 450} == {}


#: Where every function says what it does in a few calls, held to ``LONGEST_FUNCTION``
#: lines; migrations are written once and never read as code.
_FUNCTION_ROOTS = ("app", "workers", "bench", "client/task2vec_client")
LONGEST_FUNCTION = 60

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _is_command(function: Function) -> bool:
    """A typer command or callback (``@app.command(...)``, ``@app.callback(...)``): its
    parameters are the command line's options, so its length is the interface's."""
    return any(
        isinstance(d, ast.Call)
        and isinstance(d.func, ast.Attribute)
        and d.func.attr in ("command", "callback")
        for d in function.decorator_list
    )


def long_functions(source: str, where: str = "<source>") -> list[str]:
    """Functions in ``source`` longer than ``LONGEST_FUNCTION`` lines, from ``def`` to their
    last line (decorators not counted), typer commands aside."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, Function) and not _is_command(node):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LONGEST_FUNCTION:
                found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_every_function_is_short() -> None:
    paths = sorted(
        path
        for root in _FUNCTION_ROOTS
        for path in ROOT.joinpath(root).rglob("*.py")
        if "migrations" not in path.relative_to(ROOT).parts
    )
    assert paths
    found = [f for p in paths for f in long_functions(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def _function(lines: int, decorator: str = "", indent: str = "") -> str:
    """A function of ``lines`` lines, its ``def`` line included."""
    body = [f"{indent}    x = {i}" for i in range(lines - 1)]
    return "\n".join([f"{indent}{decorator}", f"{indent}def f() -> None:", *body, ""])


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        (_function(61), True),
        (_function(60), False),
        (_function(61, "@functools.cache"), True),
        ("class C:\n" + _function(61, indent="    "), True),
        ("async " + _function(61).lstrip(), True),
        (_function(61, "@app.command('embed')"), False),
        (_function(61, "@zoo_app.callback()"), False),
        (_function(61, "@command"), True),
    ],
)
def test_the_check_catches_a_long_function(source: str, caught: bool) -> None:
    assert bool(long_functions(source)) is caught


def test_every_success_answer_has_a_schema(tmp_path: Path) -> None:
    """A generated client gets typed answers: each operation's 2xx body is described."""
    spec = create_app(Settings(data_dir=tmp_path)).openapi()
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith("2"):
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if not schema or schema == {}:
                    missing.append(f"{method.upper()} {path} {status}")
    assert missing == []
    assert len(spec["paths"]) >= 12
