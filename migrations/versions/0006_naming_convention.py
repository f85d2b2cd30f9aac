"""naming convention: constraints get the names the models' naming convention gives them

0001-0005 left the primary keys, the foreign keys and most unique constraints unnamed, so each
dialect named them its own way: PostgreSQL ``<table>_pkey``, ``<table>_<columns>_key`` and
``<table>_<columns>_fkey``, SQLite not at all. They get the names of NAMING_CONVENTION here
(``app.db.models`` names with it since this revision; it is copied, as a migration must not
change when the models do). Indexes and the constraints named explicitly (uq_datasets_tenant_sha256,
uq_index_versions_content, uq_idempotency_tenant_key) already had their names.

What each database holds is reflected, not assumed, and only what differs is renamed:
PostgreSQL renames in place; SQLite, which cannot, rebuilds the table (batch mode), rows,
indexes and all. The downgrade gives back the dialect's own names (SQLite: none).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:40:00
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: ``app.db.models.NAMING_CONVENTION`` as of this revision.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Every table; each primary key is on ``id`` and was left unnamed.
TABLES = (
    "api_keys",
    "datasets",
    "embeddings",
    "experts",
    "idempotency_records",
    "index_versions",
    "jobs",
    "matrix_entries",
    "recommendations",
    "tasks",
    "zoo_tasks",
)
#: The unique constraints 0001 left unnamed that still exist: (table, columns).
UNIQUE = (
    ("embeddings", ("task_id",)),
    ("experts", ("name",)),
    ("matrix_entries", ("zoo_task_id", "expert_id")),
    ("tasks", ("dataset_id", "config_hash")),
    ("zoo_tasks", ("name",)),
)
#: The foreign keys 0001 left unnamed (all of them): (table, columns, referred table).
FOREIGN = (
    ("embeddings", ("task_id",), "tasks"),
    ("jobs", ("task_id",), "tasks"),
    ("matrix_entries", ("expert_id",), "experts"),
    ("matrix_entries", ("zoo_task_id",), "zoo_tasks"),
    ("recommendations", ("index_version_id",), "index_versions"),
    ("recommendations", ("task_id",), "tasks"),
    ("tasks", ("dataset_id",), "datasets"),
)

#: A constraint: (table, kind "pk", "uq" or "fk", columns, referred table or "").
Key = tuple[str, str, tuple[str, ...], str]


def _constraints() -> list[Key]:
    return [
        *((table, "pk", ("id",), "") for table in TABLES),
        *((table, "uq", columns, "") for table, columns in UNIQUE),
        *((table, "fk", columns, referred) for table, columns, referred in FOREIGN),
    ]


def _convention_name(key: Key) -> str:
    table, kind, columns, referred = key
    tokens = {
        "table_name": table,
        "column_0_name": columns[0],
        "column_0_N_name": "_".join(columns),
        "referred_table_name": referred,
    }
    return NAMING_CONVENTION[kind] % tokens


def _dialect_name(key: Key) -> str | None:
    """The name the dialect gave the constraint created without one (PostgreSQL's
    ChooseConstraintName: table, columns, suffix; these are far below its 63 characters)."""
    if op.get_bind().dialect.name == "sqlite":
        return None
    table, kind, columns, _ = key
    if kind == "pk":
        return f"{table}_pkey"
    return "_".join((table, *columns, "key" if kind == "uq" else "fkey"))


def _reflected_name(inspector: sa.Inspector, key: Key) -> str | None:
    table, kind, columns, referred = key
    if kind == "pk":
        return inspector.get_pk_constraint(table).get("name")
    if kind == "uq":
        found = [
            uq["name"]
            for uq in inspector.get_unique_constraints(table)
            if tuple(uq["column_names"]) == columns
        ]
    else:
        found = [
            fk["name"]
            for fk in inspector.get_foreign_keys(table)
            if tuple(fk["constrained_columns"]) == columns and fk["referred_table"] == referred
        ]
    if len(found) != 1:
        raise RuntimeError(f"expected one {kind} constraint on {table}{columns}, found {found}")
    return found[0]


def _matches(constraint: sa.Constraint, key: Key) -> bool:
    _, kind, columns, referred = key
    if kind == "pk":
        return isinstance(constraint, sa.PrimaryKeyConstraint)
    if kind == "uq":
        return (
            isinstance(constraint, sa.UniqueConstraint)
            and tuple(constraint.columns.keys()) == columns
        )
    return (
        isinstance(constraint, sa.ForeignKeyConstraint)
        and tuple(constraint.column_keys) == columns
        and constraint.elements[0].target_fullname.split(".")[0] == referred
    )


def _rebuild_sqlite(table: str, names: dict[Key, str | None]) -> None:
    """Rebuild a SQLite table as reflected, with its constraints renamed by ``names``."""
    reflected = sa.Table(
        table,
        sa.MetaData(),
        autoload_with=op.get_bind(),
        resolve_fks=False,
        # what batch mode does when it reflects by itself (SQL expression defaults)
        listeners=[("column_reflect", op.get_context().impl.autogen_column_reflect)],
    )
    for key, name in names.items():
        (constraint,) = [c for c in reflected.constraints if _matches(c, key)]
        constraint.name = name
    with op.batch_alter_table(table, copy_from=reflected, recreate="always"):
        pass


def _rename(name_for: Callable[[Key], str | None]) -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    renames: dict[str, dict[Key, tuple[str | None, str | None]]] = {}
    for key in _constraints():
        old, new = _reflected_name(inspector, key), name_for(key)
        if old != new:
            renames.setdefault(key[0], {})[key] = (old, new)
    quote = bind.dialect.identifier_preparer.quote
    for table, names in renames.items():
        if bind.dialect.name == "sqlite":
            _rebuild_sqlite(table, {key: new for key, (_, new) in names.items()})
            continue
        for old, new in names.values():
            if old is None or new is None:  # pragma: no cover - PostgreSQL names them all
                raise RuntimeError(f"cannot rename {old!r} to {new!r} on {table}")
            op.execute(f"ALTER TABLE {quote(table)} RENAME CONSTRAINT {quote(old)} TO {quote(new)}")


def upgrade() -> None:
    _rename(_convention_name)


def downgrade() -> None:
    _rename(_dialect_name)
