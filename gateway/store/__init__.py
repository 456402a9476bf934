"""The ticket database: SQLModel tables, named queries, Alembic migrations."""
