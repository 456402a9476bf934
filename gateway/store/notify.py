"""Wakeups across nodes: PostgreSQL LISTEN/NOTIFY (docs/decisions.md D13, docs/decisions.md D11.3).

On one node the pipeline and the escalator wake the delivery worker through an
`asyncio.Event`. With several nodes on one PostgreSQL, mail one node queued may be sent by
another (its own worker is busy, or it died and its claims moved on): that node must not
wait for its next poll (up to 60 s). So after committing new outbox rows a node sends
`NOTIFY gateway_outbox, '<node name>'`, and every node LISTENs on the channel and sets its
events when another node spoke. New tickets and customer messages (they move deadlines)
go on a second channel, `gateway_ticket`, which wakes the other nodes' escalators.

PostgreSQL delivers a notification only after the sending transaction commits, and our
`NOTIFY` runs in its own statement (autocommit) after the rows were committed, so a woken
node always sees the rows. Notifications are coalesced: while one is being sent, and for
`SPACING` seconds after, further requests fold into one more: every committed pipeline batch
asks for one, and each costs a statement and a wake of every listening backend, our own
listener's included; at most ten a second, for at most 0.1 s more before another node looks
(docs/performance.md §10). SQLite has a single node, so there is nothing to do there.
A lost notification (listener reconnecting) costs one poll interval, never mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Engine

from gateway.store.db import is_postgres

log = logging.getLogger("gateway.notify")

#: The channel for "new outbox rows".
OUTBOX_CHANNEL = "gateway_outbox"
#: The channel for "new tickets or customer messages": deadlines changed, escalators look
#: again (docs/decisions.md D13: an escalation never waits for another node's poll).
TICKET_CHANNEL = "gateway_ticket"
#: Seconds between two NOTIFYs of one node: requests in between fold into the next.
SPACING = 0.1


class ClusterNotifier:
    """Send and receive outbox wakeups between the nodes of one PostgreSQL database."""

    def __init__(
        self,
        engine: Engine,
        node: str,
        on_wake: Callable[[], None],
        on_ticket: Callable[[], None] | None = None,
        spacing: float = SPACING,
    ) -> None:
        self.engine = engine
        self.spacing = spacing
        self.node = node
        self.on_wake = on_wake
        self.on_ticket = on_ticket
        self.enabled = is_postgres(engine)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._wanted = asyncio.Event()
        self._outbox = False
        self._ticket = False
        self.received = 0
        self.received_tickets = 0
        self.sent = 0

    def notify(self) -> None:
        """Tell the other nodes that outbox rows were committed (call on the event loop)."""
        if self.enabled:
            self._outbox = True
            self._wanted.set()

    def notify_ticket(self) -> None:
        """Tell the other nodes' escalators that tickets changed (call on the event loop)."""
        if self.enabled and self.on_ticket is not None:
            self._ticket = True
            self._wanted.set()

    def _send(self, channels: list[str]) -> None:
        if not channels:
            return
        # One statement in autocommit: the notifications go out as it ends, one round trip
        # where BEGIN, a statement per channel and COMMIT were four (docs/performance.md §9).
        calls = ", ".join(f"pg_notify(:ch{i}, :node)" for i in range(len(channels)))
        params: dict[str, str] = {f"ch{i}": ch for i, ch in enumerate(channels)}
        params["node"] = self.node
        with self._autocommit.connect() as conn:
            conn.execute(text(f"SELECT {calls}"), params)

    async def _sender(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            waiter = asyncio.ensure_future(self._wanted.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            if stopping.is_set():
                return
            self._wanted.clear()  # requests from now on fold into the next NOTIFY
            channels = [OUTBOX_CHANNEL] if self._outbox else []
            channels += [TICKET_CHANNEL] if self._ticket else []
            self._outbox = self._ticket = False
            pause = self.spacing
            try:
                await asyncio.to_thread(self._send, channels)
                self.sent += 1
            except Exception as exc:  # the database is away; the poll is the fallback
                log.warning("NOTIFY %s failed: %r", OUTBOX_CHANNEL, exc)
                pause = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)

    async def _listener(self, stopping: asyncio.Event) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    await conn.execute(f"LISTEN {TICKET_CHANNEL}")
                    # Rows may have been queued while we were not listening: look once.
                    self.on_wake()
                    if self.on_ticket is not None:
                        self.on_ticket()
                    async for note in conn.notifies():
                        if note.payload == self.node:
                            continue
                        if note.channel == TICKET_CHANNEL:
                            self.received_tickets += 1
                            if self.on_ticket is not None:
                                self.on_ticket()
                        else:
                            self.received += 1
                            self.on_wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s lost (%r); reconnecting", OUTBOX_CHANNEL, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 2.0)

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: listen for other nodes and send our own notifications."""
        if not self.enabled:
            return
        listener = asyncio.create_task(self._listener(stopping), name="notify-listen")
        try:
            await self._sender(stopping)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
