"""tenants and API keys: who owns each dataset, task, job and recommendation

Rows written before keys existed belong to the tenant "local" (the keyless embedded default).
The same dataset bytes may now be uploaded by several tenants, each with its own row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_TABLES = ("datasets", "tasks", "jobs", "recommendations")
#: 0001 left the unique constraint on datasets.sha256 unnamed: PostgreSQL named it, SQLite did
#: not (batch mode names it by this convention while it rebuilds the table).
SQLITE_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_unique() -> str:
    return "uq_datasets_sha256" if op.get_bind().dialect.name == "sqlite" else "datasets_sha256_key"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    for table in TENANT_TABLES:
        op.add_column(
            table,
            sa.Column("tenant", sa.String(length=64), server_default="local", nullable=False),
        )
        op.create_index(f"ix_{table}_tenant", table, ["tenant"])
    with op.batch_alter_table("datasets", naming_convention=SQLITE_NAMING) as batch:
        batch.drop_constraint(_old_unique(), type_="unique")
        batch.create_unique_constraint("uq_datasets_tenant_sha256", ["tenant", "sha256"])


def downgrade() -> None:
    with op.batch_alter_table("datasets", naming_convention=SQLITE_NAMING) as batch:
        batch.drop_constraint("uq_datasets_tenant_sha256", type_="unique")
        batch.create_unique_constraint(_old_unique(), ["sha256"])
    for table in TENANT_TABLES:
        op.drop_index(f"ix_{table}_tenant", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
    op.drop_table("api_keys")
