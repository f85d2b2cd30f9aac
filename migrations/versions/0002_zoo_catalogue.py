"""zoo catalogue: item status, task recipes, published versions

The experts, zoo_tasks and index_versions tables were created empty by 0001 and first written
with this revision, so the new NOT NULL columns need no defaults. Batch mode lets SQLite,
which cannot add constraints in place, rebuild the tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 08:01:03.178877
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ITEM_COLUMNS = ("status", "error", "job_id", "created_at")


def _item_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    with op.batch_alter_table("experts") as batch:
        batch.add_column(sa.Column("mean", sa.JSON(), nullable=False))
        batch.add_column(sa.Column("std", sa.JSON(), nullable=False))
        for column in _item_columns():
            batch.add_column(column)
    with op.batch_alter_table("zoo_tasks") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=False))
        batch.add_column(sa.Column("embedding_path", sa.String(length=1024), nullable=True))
        for column in _item_columns():
            batch.add_column(column)
    with op.batch_alter_table("index_versions") as batch:
        batch.add_column(sa.Column("experts", sa.Integer(), nullable=False))
        batch.add_column(sa.Column("config", sa.JSON(), nullable=False))
        batch.create_unique_constraint("uq_index_versions_content", ["content"])


def downgrade() -> None:
    with op.batch_alter_table("index_versions") as batch:
        batch.drop_constraint("uq_index_versions_content", type_="unique")
        batch.drop_column("config")
        batch.drop_column("experts")
    with op.batch_alter_table("zoo_tasks") as batch:
        for name in (*ITEM_COLUMNS, "embedding_path", "spec"):
            batch.drop_column(name)
    with op.batch_alter_table("experts") as batch:
        for name in (*ITEM_COLUMNS, "std", "mean"):
            batch.drop_column(name)
