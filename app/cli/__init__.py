"""The ``task2vec`` command line: embed a dataset, compare embeddings.

Problems the user can fix (bad data, missing weights, contradictory options) end with one
``error: ...`` line on stderr and exit status 2, never a traceback; nothing is written then.
"""

from __future__ import annotations

from app.cli import engine, remote, service, zoo
from app.cli.common import app

__all__ = ["app", "engine", "main", "remote", "service", "zoo"]


def main() -> None:
    app()
