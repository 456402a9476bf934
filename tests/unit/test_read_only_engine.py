"""Reads on PostgreSQL run in autocommit and keep psycopg's prepared statements
(gateway/store/db.py `read_only`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Connection

from gateway.store.db import make_engine, read_only
from tests.conftest import _pg_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


def _prepared(conn: Connection) -> int:
    """Statements the connection's server session holds prepared (ended by COMMIT, which,
    unlike ROLLBACK, leaves psycopg's cache alone)."""
    n = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one()
    conn.commit()
    return int(n)


@pytest.mark.postgres
def test_a_read_keeps_the_connections_prepared_statements(pg_url: str) -> None:
    engine = make_engine(pg_url)
    reader = read_only(engine)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            for _ in range(6):  # psycopg prepares a statement at its 5th run
                conn.exec_driver_sql("SELECT 1 + %(n)s", {"n": 1})
            conn.commit()
            assert _prepared(conn) == 1
        with reader.connect() as conn:
            assert conn.connection.dbapi_connection is raw  # the same pooled connection
            assert raw.autocommit  # type: ignore[union-attr]
            assert conn.exec_driver_sql("SELECT 2").scalar() == 2
        # Before: the read's ROLLBACK made psycopg send DEALLOCATE ALL.
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection is raw
            assert not raw.autocommit  # type: ignore[union-attr]  # a writer's own again
            assert _prepared(conn) == 1
    finally:
        engine.dispose()
