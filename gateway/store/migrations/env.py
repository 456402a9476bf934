"""Alembic environment: runs migrations on the engine the gateway hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import gateway.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from gateway.store.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///var/gateway.db")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things in place
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
