"""Published zoo versions: which one to serve, and what a version holds.

Zoos only grow, so of two versions the one with more tasks and experts is the newer: a
publisher that finishes late can add an older version but never make it current. No lock is
needed; the database orders the versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.db.models import IndexVersionRow
from app.task2vec.embedding import EmbedConfig
from app.zoo.matrix import EvaluationProtocol


@dataclass(frozen=True)
class Version:
    """A published zoo version, detached from its database row."""

    id: int
    folder: Path
    content: str
    tasks: int
    experts: int
    embed_config: EmbedConfig
    protocol: EvaluationProtocol

    @classmethod
    def of(cls, row: IndexVersionRow) -> Version:
        return cls(
            id=row.id,
            folder=Path(row.zoo),
            content=row.content,
            tasks=row.count,
            experts=row.experts,
            embed_config=EmbedConfig(**row.config["embed_config"]),
            protocol=EvaluationProtocol(**row.config["protocol"]),
        )

    def names(self, of: str) -> set[str]:
        """Names of the version's ``"experts"`` or ``"tasks"`` (empty if its folder is gone)."""
        try:
            manifest = json.loads((self.folder / "zoo.json").read_text())
        except (OSError, ValueError):
            return set()
        return {item["name"] for item in manifest[of]}


def largest_first() -> Select[IndexVersionRow]:
    """Versions newest first: zoos only grow, so the largest is the newest."""
    return select(IndexVersionRow).order_by(
        (IndexVersionRow.count + IndexVersionRow.experts).desc(), IndexVersionRow.id.desc()
    )


def current(session: Session) -> Version | None:
    """The version to serve: the largest published zoo."""
    row = session.scalar(largest_first().limit(1))
    return None if row is None else Version.of(row)


def by_content(session: Session, content: str) -> Version | None:
    row = session.scalar(select(IndexVersionRow).where(IndexVersionRow.content == content))
    return None if row is None else Version.of(row)
