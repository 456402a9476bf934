"""A pooled PostgreSQL connection is checked at checkout by polling its socket
(gateway/store/db.py `check_alive`, the engine's checkout listener, which replaced
SQLAlchemy's `pool_pre_ping`): a healthy idle connection is handed out without a round
trip; one the server or the network closed is replaced before the caller sees it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine

from gateway.store.db import check_alive, make_engine
from tests.conftest import _pg_admin
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.postgres]


def _pid(engine: Engine) -> int:
    """The backend pid of the connection the pool hands out (returned to the pool after)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pid: int) -> None:
    """The server ends backend `pid`, from another connection; returns once it has exited
    (the server's own wait, `pg_terminate_backend(pid, timeout)`, not a sleep)."""
    admin = _pg_admin()
    try:
        row = admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
        assert row == (True,), f"backend {pid} did not end"
    finally:
        admin.close()


def test_a_connection_the_server_terminated_is_replaced_at_checkout(pg_engine: Engine) -> None:
    """The idle pooled connection whose backend was terminated is not handed out: the next
    checkout gets a new backend and the caller's first statement succeeds."""
    first = _pid(pg_engine)
    assert _pid(pg_engine) == first  # the pool reuses its one idle connection
    _terminate(first)
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        second = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    assert second != first


def test_without_the_check_the_caller_meets_the_dead_connection(pg_url: str) -> None:
    """The control for the test above: an engine with neither the checkout listener nor a
    pre-ping hands out the terminated connection and the caller's statement fails, so the
    replacement above is the listener's doing."""
    plain = create_engine(pg_url)
    try:
        first = _pid(plain)
        _terminate(first)
        with pytest.raises(exc.OperationalError), plain.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        plain.dispose()


class CountingPing:
    """The dialect's ping, counting its calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0

    def __call__(self, dbapi_conn: Any) -> bool:
        self.calls += 1
        return bool(self.engine.dialect.do_ping(dbapi_conn))


def test_a_healthy_connection_is_not_pinged_a_dead_one_is_and_is_refused(
    pg_engine: Engine, pg_url: str
) -> None:
    """`check_alive` on a real psycopg connection: idle and healthy, no ping and no error
    (no round trip per checkout); after the server terminated it, one ping, and a
    `DisconnectionError` (which makes the pool open a new connection)."""
    conn = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert pid is not None
        conn.rollback()  # idle, as a connection returned to the pool is
        ping = CountingPing(pg_engine)
        check_alive(conn, ping)
        check_alive(conn, ping)
        assert ping.calls == 0
        _terminate(int(pid[0]))
        with pytest.raises(exc.DisconnectionError):
            check_alive(conn, ping)
        assert ping.calls == 1
    finally:
        conn.close()


def test_a_closed_connection_is_refused_without_a_ping(pg_engine: Engine, pg_url: str) -> None:
    """A connection closed on the client side is refused at once: nothing to ask."""
    conn = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"))
    conn.close()
    ping = CountingPing(pg_engine)
    with pytest.raises(exc.DisconnectionError, match="closed"):
        check_alive(conn, ping)
    assert ping.calls == 0


def test_a_connection_cut_by_the_network_is_replaced_once_it_forwards_again(
    pg_url: str,
) -> None:
    """Through a TCP proxy: the pool's idle connection is cut (the proxy closes both ends),
    then the proxy forwards again; the first checkout after that succeeds without an error
    to the caller, on a new connection through the proxy."""
    host_port, _, database = pg_url.rpartition("@")[2].partition("/")
    host, _, port = host_port.partition(":")
    with TcpProxy(host, int(port or 5432)) as proxy:
        engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{database}")
        try:
            first = _pid(engine)
            assert proxy.connections == 1
            proxy.cut()
            proxy.restore()
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
                second = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            assert second != first
            assert proxy.connections == 2
        finally:
            engine.dispose()
