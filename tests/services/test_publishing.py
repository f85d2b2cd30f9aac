"""Publishing zoo versions: every ready task × every ready expert; entries a race left missing
are computed first, and a version never goes back."""

from __future__ import annotations

from sqlalchemy import delete, select

from app.db.models import IndexVersionRow, MatrixEntry
from app.db.session import session_scope
from app.services import publishing
from app.services.layout import DataLayout
from app.settings import Settings


def test_publish_fills_missing_entries_and_never_goes_back(settings: Settings) -> None:
    current = publishing.ensure_published(settings, DataLayout.of(settings).zoo("tiny"))
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        entry = session.scalars(select(MatrixEntry).order_by(MatrixEntry.id.desc())).first()
        assert entry is not None
        pair, error = (entry.zoo_task_id, entry.expert_id), entry.error
        session.execute(delete(MatrixEntry).where(MatrixEntry.id == entry.id))
    # A worker that raced another left an entry out: the next publish computes it again,
    # and the seeded protocol gives the same number, so the version is the same.
    version = publishing.publish(settings)
    assert version.content == current.content
    with session_scope(url) as session:
        restored = session.scalar(
            select(MatrixEntry.error).where(
                MatrixEntry.zoo_task_id == pair[0], MatrixEntry.expert_id == pair[1]
            )
        )
    assert restored == error

    # A smaller version committed late (a slow publisher) does not become current.
    with session_scope(url) as session:
        row = session.scalar(select(IndexVersionRow))
        assert row is not None
        session.add(
            IndexVersionRow(
                zoo=row.zoo,
                probe=row.probe,
                dim=row.dim,
                count=row.count - 1,
                experts=row.experts,
                config=row.config,
                content="older",
            )
        )
    assert publishing.current_version(settings) == version
