"""SQLite writers take turns through the turnstile (gateway/store/turnstile.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from gateway.store.db import TURNSTILE, make_engine, read_scope, session_scope
from gateway.store.turnstile import Turnstile


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = make_engine(f"sqlite:///{tmp_path}/t.db")
    with e.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    return e


def _wait_for(flag: threading.Event, what: str) -> None:
    assert flag.wait(30), what


def test_a_writer_waits_for_the_turn_and_gets_it_at_commit(engine: Engine) -> None:
    order: list[str] = []
    began = threading.Event()

    def second() -> None:
        began.set()
        with session_scope(engine) as s:
            s.execute(text("INSERT INTO t VALUES (2)"))  # the transaction begins here
            order.append("second")

    with session_scope(engine) as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        t = threading.Thread(target=second)
        t.start()
        _wait_for(began, "the second writer started")
        # The second writer waits in the turnstile, announced as waiting.
        other = Turnstile(Path(str(engine.url.database)), 1)
        try:
            for _ in range(3000):
                if other._others_waiting():
                    break
                threading.Event().wait(0.01)
            assert other._others_waiting(), "the waiting writer is not announced"
        finally:
            other.close()
        order.append("first")
    t.join(30)
    assert order == ["first", "second"]
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT n FROM t ORDER BY n"))] == [1, 2]


def test_reads_never_take_a_turn(engine: Engine) -> None:
    with session_scope(engine) as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        # A reader's snapshot while the write transaction is open: no wait, no turn.
        with read_scope(engine) as r:
            assert r.execute(text("SELECT count(*) FROM t")).scalar_one() == 0


def _write_then_fail(engine: Engine) -> None:
    with session_scope(engine) as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        raise RuntimeError("fails")


def test_rollback_gives_the_turn_back(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        _write_then_fail(engine)
    # Another connection gets a turn at once (it would wait 30 s otherwise).
    probe = Turnstile(Path(str(engine.url.database)), 0.5)
    try:
        probe.acquire()
        probe.release()
    finally:
        probe.close()


def test_no_turn_within_the_busy_timeout_is_database_is_locked(tmp_path: Path) -> None:
    holder = Turnstile(tmp_path / "x.db", 30)
    waiter = Turnstile(tmp_path / "x.db", 0.2)
    try:
        holder.acquire()
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            waiter.acquire()
        assert not waiter.held
        holder.release()
        waiter.acquire()  # free now
        assert waiter.held
    finally:
        holder.close()
        waiter.close()


def test_closing_the_connection_gives_the_turn_back(engine: Engine) -> None:
    conn = engine.connect()
    conn.begin()
    conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    turnstile = conn.connection.info[TURNSTILE]
    assert turnstile.held
    conn.invalidate()  # the DBAPI connection is closed, and with it the lock file
    conn.close()
    probe = Turnstile(Path(str(engine.url.database)), 0.5)
    try:
        probe.acquire()
    finally:
        probe.close()


def test_memory_databases_have_no_turnstile() -> None:
    e = make_engine("sqlite://")
    with e.begin() as conn:
        assert TURNSTILE not in conn.connection.info
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
