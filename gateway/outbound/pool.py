"""Relay connections kept open between mails (docs/performance.md §5, docs/design.md §6).

Every delivered mail used to open its own SMTP connection: TCP, greeting, EHLO, STARTTLS and
a second EHLO, the transaction, QUIT; two mails per new ticket, all on the daemon's event
loop. A :class:`ConnectionPool` keeps the connections of successful transactions open and
hands them to the next mail for the same server (host, port, HELO name, TLS mode and
timeout): RFC 5321 §4.1.1.4 ends a transaction with the reply to the final dot, so the next
``MAIL FROM`` starts a fresh one on the same session (§3.3: one session, several
transactions).

- At most ``per_server`` idle connections per server and ``max_idle`` in all; the oldest
  goes first.
- An idle connection is closed (QUIT) after ``idle_timeout`` seconds; a relay that closes
  it sooner is noticed when the connection is next used, and :mod:`gateway.outbound.deliver`
  then sends that mail on a fresh connection.
- :meth:`ConnectionPool.close` QUITs every idle connection (the daemon's shutdown).

Only connections whose last transaction ended in ``250`` come back; the pool never holds a
connection in use, so one connection carries one transaction at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict

import aiosmtplib

__all__ = ["IDLE_TIMEOUT", "ConnectionPool", "ServerKey"]

#: How long an unused connection stays open: well below the 5 minutes a server waits for a
#: command (RFC 5321 §4.5.3.2.7), long enough to carry a steady trickle of mail.
IDLE_TIMEOUT = 30.0
#: The QUIT of an idle connection waits at most this long for the server's 221.
QUIT_TIMEOUT = 5.0

#: (host, port, HELO name, STARTTLS mode, command timeout): connections are interchangeable
#: only within one.
ServerKey = tuple[str, int, str, str, float]


class ConnectionPool:
    """Idle SMTP connections by server; see the module docstring."""

    def __init__(
        self,
        *,
        per_server: int = 8,
        max_idle: int = 32,
        idle_timeout: float = IDLE_TIMEOUT,
        tally: Counter[tuple[str, ...]] | None = None,
    ) -> None:
        self.per_server = per_server
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # Oldest first, across servers: (key, connection) -> when it went idle (loop time).
        self._idle: OrderedDict[tuple[ServerKey, aiosmtplib.SMTP], float] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        #: Connections opened and connections reused (tests, benches); also counted in
        #: ``tally`` as ``("relay_connections", "opened" | "reused")`` (gateway/metrics.py).
        self.opened = 0
        self.reused = 0
        self.tally = tally

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: ServerKey) -> aiosmtplib.SMTP | None:
        """The most recently used idle connection to ``key``'s server, or None."""
        now = asyncio.get_running_loop().time()
        for entry in reversed(list(self._idle)):
            if entry[0] != key:
                continue
            since = self._idle.pop(entry)
            smtp = entry[1]
            if smtp.is_connected and now - since < self.idle_timeout:
                self.reused += 1
                if self.tally is not None:
                    self.tally[("relay_connections", "reused")] += 1
                return smtp
            self._retire(smtp)
        return None

    def note_opened(self) -> None:
        """Count a connection opened for a mail (none was kept, or the kept one failed)."""
        self.opened += 1
        if self.tally is not None:
            self.tally[("relay_connections", "opened")] += 1

    def give_back(self, key: ServerKey, smtp: aiosmtplib.SMTP) -> None:
        """Keep ``smtp`` (after a transaction that ended in 250) for the next mail."""
        if self._closed or not smtp.is_connected:
            self._retire(smtp)
            return
        self._idle[(key, smtp)] = asyncio.get_running_loop().time()
        same = [e for e in self._idle if e[0] == key]
        for entry in same[: max(0, len(same) - self.per_server)]:
            del self._idle[entry]
            self._retire(entry[1])
        while len(self._idle) > self.max_idle:
            self._retire(self._idle.popitem(last=False)[0][1])
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="relay-connection-reaper")

    async def close(self) -> None:
        """QUIT every idle connection and wait for the QUITs; the pool keeps nothing after."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        while self._idle:
            self._retire(self._idle.popitem(last=False)[0][1])
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _retire(self, smtp: aiosmtplib.SMTP) -> None:
        """Close ``smtp`` in the background (QUIT when still connected)."""
        task = asyncio.create_task(quit_quietly(smtp), name="relay-connection-quit")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _reap(self) -> None:
        """Close connections idle for ``idle_timeout``; ends when none is left."""
        loop = asyncio.get_running_loop()
        while self._idle:
            oldest = min(self._idle.values())
            await asyncio.sleep(max(0.0, oldest + self.idle_timeout - loop.time()))
            now = loop.time()
            for entry, since in list(self._idle.items()):
                if now - since >= self.idle_timeout or not entry[1].is_connected:
                    del self._idle[entry]
                    self._retire(entry[1])


async def quit_quietly(smtp: aiosmtplib.SMTP) -> None:
    """QUIT (briefly) when still connected; always release the socket."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=QUIT_TIMEOUT)
    smtp.close()
