"""The service's state in SQL: SQLAlchemy 2 models, sessions, Alembic migrations."""
