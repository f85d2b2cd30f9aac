"""Alembic environment: the URL comes from the caller's config or the T2V_ settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from app.db.models import Base
from app.db.session import engine_for
from app.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url()
#: What autogenerate compares the database with. Alembic also names the constraints a migration
#: leaves unnamed by the naming convention of target_metadata when it is a MetaData: that would
#: change what 0001-0005 create on a new database (0004 drops PostgreSQL's own name of a
#: constraint 0001 left unnamed) and leave nothing for 0006 to rename. A list of the models'
#: metadata is compared the same but lends no convention: every migration creates what it
#: always did, on new databases as on old ones; 0006 and later name their constraints.
target_metadata = [Base.metadata]


def run_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = engine_for(url) if url.startswith("sqlite") else None
    if engine is None:
        from sqlalchemy import create_engine

        engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        if url.startswith("sqlite"):
            # SQLite rebuilds a table to change its constraints (batch mode): with foreign
            # keys enforced, dropping a referenced table fails. Off for the migration (it must
            # be set outside a transaction), checked after, on again at the end.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=url.startswith("sqlite"),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if url.startswith("sqlite"):
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
            if broken:
                raise RuntimeError(f"foreign keys broken by the migration: {broken[:5]}")


if context.is_offline_mode():
    run_offline()
else:
    run_online()
