"""The cluster's wakeups go out in one autocommit statement (gateway/store/notify.py
`ClusterNotifier._send`): every channel asked for in one `SELECT pg_notify(...), ...`, the
node's name as payload, and the pooled connection handed back with no transaction open."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine

from gateway.store.notify import OUTBOX_CHANNEL, TICKET_CHANNEL, ClusterNotifier

pytestmark = [pytest.mark.postgres]

WAIT = 10.0  # the most a notification that was sent may take to arrive (a bound, not a pause)


def _plain(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def listener(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg session listening on both channels, as another node's would."""
    conn = psycopg.connect(_plain(pg_url), autocommit=True)
    conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
    conn.execute(f"LISTEN {TICKET_CHANNEL}")
    yield conn
    conn.close()


def _statements(engine: Engine) -> list[tuple[str, bool]]:
    """Records each statement run through `engine`, with whether its connection was in
    autocommit when it ran."""
    seen: list[tuple[str, bool]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append((statement, bool(conn.connection.dbapi_connection.autocommit)))

    return seen


def test_both_channels_go_out_in_one_autocommit_statement(
    pg_engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    """Both notifications arrive, each with the node's name, from one statement run in
    autocommit on one backend; the pooled connection is back idle, outside any transaction,
    and no longer in autocommit."""
    notifier = ClusterNotifier(pg_engine, "mx1", on_wake=lambda: None, on_ticket=lambda: None)
    statements = _statements(pg_engine)
    notifier._send([OUTBOX_CHANNEL, TICKET_CHANNEL])
    got = list(listener.notifies(timeout=WAIT, stop_after=2))
    assert sorted((n.channel, n.payload) for n in got) == [
        (OUTBOX_CHANNEL, "mx1"),
        (TICKET_CHANNEL, "mx1"),
    ]
    assert len({n.pid for n in got}) == 1  # one sender
    assert len(statements) == 1
    [(sql, autocommit)] = statements
    assert sql.count("pg_notify(") == 2
    assert autocommit
    assert pg_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    raw = pg_engine.raw_connection()
    try:
        pq = raw.dbapi_connection
        assert pq is not None
        assert pq.info.transaction_status == TransactionStatus.IDLE
        assert pq.autocommit is False  # the engine's other users get transactions again
    finally:
        raw.close()


def test_no_channel_sends_nothing(
    pg_engine: Engine, pg_url: str, listener: psycopg.Connection[Any]
) -> None:
    """`_send([])` runs no statement, and a listener's next notification is a marker sent
    after it: nothing went out before it."""
    notifier = ClusterNotifier(pg_engine, "mx1", on_wake=lambda: None, on_ticket=lambda: None)
    statements = _statements(pg_engine)
    notifier._send([])
    assert statements == []
    with psycopg.connect(_plain(pg_url), autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, 'marker')", (OUTBOX_CHANNEL,))
    [first] = list(listener.notifies(timeout=WAIT, stop_after=1))
    assert (first.channel, first.payload) == (OUTBOX_CHANNEL, "marker")


async def test_requests_within_the_spacing_fold_into_the_next_notify(
    pg_engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    """A burst of requests (one per committed pipeline batch) costs one NOTIFY now and one
    more after `spacing`, carrying every channel asked for meanwhile: none is lost, and a
    request after a quiet spell goes out at once."""
    import asyncio

    notifier = ClusterNotifier(
        pg_engine, "mx1", on_wake=lambda: None, on_ticket=lambda: None, spacing=0.5
    )
    statements = _statements(pg_engine)
    stopping = asyncio.Event()
    sender = asyncio.create_task(notifier._sender(stopping))
    loop = asyncio.get_running_loop()
    try:
        notifier.notify()
        while notifier.sent < 1:
            await asyncio.sleep(0.01)
        for _ in range(20):  # inside the spacing: fold into one
            notifier.notify()
            notifier.notify_ticket()
            await asyncio.sleep(0.005)
        deadline = loop.time() + WAIT
        while notifier.sent < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.6)  # a quiet spell longer than the spacing
        assert notifier.sent == 2
        notifier.notify_ticket()
        start = loop.time()
        while notifier.sent < 3 and loop.time() < deadline:
            await asyncio.sleep(0.005)
        assert loop.time() - start < 0.5, "a request after a quiet spell waited"
    finally:
        stopping.set()
        await sender
    assert [s.count("pg_notify(") for s, _ in statements] == [1, 2, 1]
    got = await asyncio.to_thread(lambda: list(listener.notifies(timeout=WAIT, stop_after=4)))
    assert [n.channel for n in got] == [
        OUTBOX_CHANNEL,
        OUTBOX_CHANNEL,
        TICKET_CHANNEL,
        TICKET_CHANNEL,
    ]
