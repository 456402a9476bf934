"""A capture SMTP relay on loopback: where every outbound message lands in integration tests.

`CaptureRelay` is an aiosmtpd server on 127.0.0.1 with a free port, served on the running
event loop (docs/design.md §1: `loop.create_server`, not the threaded `Controller`), so tests
stay single-threaded and deterministic. It records each accepted message as a `Captured`,
and can be told to fail:

    async with CaptureRelay() as relay:
        relay.fail_next(451)                 # next DATA gets "451 4.3.0 ..."
        relay.fail_next(550, at="RCPT")      # next transaction's RCPTs get 550
        relay.refuse_recipient("x@b.test")   # that RCPT always refused (partial refusal)
        relay.fail_always(421); relay.heal()
        relay.data_delay = 0.5               # a slow relay: each 250 to DATA comes 0.5 s
                                             # after the message was captured
        relay.rcpt_delay = 3.0               # ... or each RCPT is answered 3 s late
        await relay.stop(); await relay.start()   # relay down / up, same port
        await relay.drop_connections()       # close every open session, keep listening
        relay.hang_up_at_mail = 1            # the next MAIL gets no reply: the session closes
        [msg] = await relay.wait_for(1)
        relay.connections_seen, relay.quits  # sessions opened, QUITs answered

Like a real MTA it accepts the null reverse-path `MAIL FROM:<>` (RFC 5321 §4.5.5), long
lines (up to 1 MiB, beyond the RFC's 1000 because real mail has them) and SMTPUTF8
(RFC 6531). Waiting is done on an `asyncio.Condition`, never by polling with sleeps.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session

Stage = Literal["MAIL", "RCPT", "DATA"]


@dataclass
class Captured:
    """One message the relay accepted (answered 250 to DATA).

    `mail_from` is the envelope sender, "" for the null sender `<>`; `data` is the message
    exactly as received after dot-unstuffing (CRLF line endings).
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    helo: str | None = None
    tls: bool = False
    mail_options: list[str] = field(default_factory=list)
    #: Wall-clock moment the relay had the whole message (UTC).
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def null_sender(self) -> bool:
        return self.mail_from == ""

    def message(self) -> EmailMessage:
        """The message parsed with `email.policy.default`."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    def __str__(self) -> str:
        subject = self.message().get("Subject", "")
        return f"<{self.mail_from}> -> {self.rcpt_tos} subject={subject!r} ({len(self.data)} B)"


@dataclass
class Rejected:
    """One command the relay refused because a failure was injected."""

    stage: Stage
    code: int
    text: str
    mail_from: str | None
    rcpt_tos: list[str]


@dataclass
class _Rule:
    stage: Stage
    code: int
    text: str
    remaining: int | None  # None: until heal()

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def _default_text(code: int) -> str:
    if 400 <= code < 500:
        return "4.3.0 Temporary failure injected by CaptureRelay"
    return "5.7.1 Rejected by CaptureRelay (injected failure)"


class _CaptureSMTP(SMTP):
    """aiosmtpd's protocol with a generous line limit, tracked by its relay."""

    # docs/design.md §1: stock aiosmtpd answers "500 Line too long" past 1001 octets; read
    # before __init__ builds its StreamReader, so a class attribute is the way to set it.
    line_length_limit = 1024 * 1024

    def __init__(self, relay: CaptureRelay, **kwargs: Any) -> None:
        super().__init__(relay._handler, **kwargs)
        self._relay = relay
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:  # not the STARTTLS re-entry on the same protocol
            self._relay._connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._relay._connections.discard(self)
        self.lost.set()

    @property
    def tls_handshake_failed(self) -> bool:
        """STARTTLS began but never completed: asyncio will not call connection_lost."""
        return self._original_transport is not None and (
            self.session is None or self.session.ssl is None
        )


class _Handler:
    """aiosmtpd hooks: capture accepted messages and apply injected failures."""

    def __init__(self, relay: CaptureRelay) -> None:
        self._relay = relay
        # Which RCPT rule (or None) each open transaction drew, so all its RCPTs agree.
        self._rcpt_rule: weakref.WeakKeyDictionary[Envelope, _Rule | None] = (
            weakref.WeakKeyDictionary()
        )

    async def handle_exception(self, error: Exception) -> str:
        # docs/design.md §1: without this hook aiosmtpd answers 500 (permanent).
        return f"451 4.3.0 CaptureRelay internal error: {error!r}"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._relay.hang_up_at_mail > 0:
            # Close the session without a reply, as a relay restarting under a client does.
            self._relay.hang_up_at_mail -= 1
            if server.transport is not None:
                server.transport.close()
            return "421 4.3.2 (never sent: the connection is closed)"
        rule = self._relay._take("MAIL")
        if rule is not None:
            self._relay._reject(rule, address, [])
            return rule.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._relay.rcpt_delay > 0:
            await asyncio.sleep(self._relay.rcpt_delay)
        if envelope not in self._rcpt_rule:
            self._rcpt_rule[envelope] = self._relay._take("RCPT")
        rule = self._rcpt_rule[envelope]
        if rule is None:
            rule = self._relay._refusals.get(address.lower())
        if rule is not None:
            self._relay._reject(rule, envelope.mail_from, [address])
            return rule.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._relay.quits += 1
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rule = self._relay._take("DATA")
        if rule is not None:
            self._relay._reject(rule, envelope.mail_from, list(envelope.rcpt_tos))
            return rule.reply
        mail_from = envelope.mail_from or ""
        peer = session.peer
        captured = Captured(
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            helo=session.host_name,
            tls=session.ssl is not None,
            mail_options=list(envelope.mail_options),
        )
        await self._relay._record(captured)
        number = len(self._relay.messages)
        if self._relay.data_delay > 0:
            # Captured but not yet confirmed: a sender that dies now has delivered a message
            # it cannot know about (the "in flight at a crash" case of at-least-once).
            await asyncio.sleep(self._relay.data_delay)
        return f"250 2.0.0 OK captured #{number}"


class CaptureRelay:
    """A loopback SMTP server that records what it accepts; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        hostname: str = "relay.test",
        tls_context: ssl.SSLContext | None = None,
        data_size_limit: int | None = 32 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = 0
        self.hostname = hostname
        self.messages: list[Captured] = []
        self.rejected: list[Rejected] = []
        self.connections_seen = 0
        self.quits = 0
        #: Sessions still to be closed, without a reply, at their next MAIL.
        self.hang_up_at_mail = 0
        #: Seconds between capturing a message and answering 250 (a slow relay).
        self.data_delay = 0.0
        #: Seconds before each RCPT is answered (a relay stalling before DATA).
        self.rcpt_delay = 0.0
        self._tls_context = tls_context
        self._data_size_limit = data_size_limit
        self._handler = _Handler(self)
        self._server: asyncio.Server | None = None
        self._connections: set[_CaptureSMTP] = set()
        self._changed = asyncio.Condition()
        self._once: list[_Rule] = []
        self._always: list[_Rule] = []
        self._refusals: dict[str, _Rule] = {}

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> CaptureRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def start(self) -> None:
        """Listen (again). The first start picks a free port; later starts reuse it."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()

        def factory() -> _CaptureSMTP:
            self.connections_seen += 1
            return _CaptureSMTP(
                self,
                hostname=self.hostname,
                enable_SMTPUTF8=True,
                decode_data=False,
                data_size_limit=self._data_size_limit,
                tls_context=self._tls_context,
                loop=loop,
            )

        # Port 0 asks the kernel for a free port; reuse_address lets a restart bind the
        # same port while old connections sit in TIME_WAIT.
        self._server = await loop.create_server(
            factory, host=self.host, port=self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open session (a relay crash, as clients see it)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        protos = list(self._connections)
        tasks = [t for p in protos if (t := p._handler_coroutine) is not None]
        for proto in protos:
            # _original_transport is the plain socket under a STARTTLS session; after a
            # failed handshake asyncio never calls connection_lost, so close it ourselves.
            for transport in (proto.transport, proto._original_transport):
                if transport is not None:
                    transport.close()
        await server.wait_closed()
        # Wait until every session's connection_lost ran and its task ended, so no
        # transport or task outlives the relay (pytest runs with filterwarnings=error).
        waits = [p.lost.wait() for p in protos if not p.tls_handshake_failed]
        if waits:
            async with asyncio.timeout(10.0):
                await asyncio.gather(*waits)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for proto in protos:
            if proto._timeout_handle is not None:
                proto._timeout_handle.cancel()
            self._connections.discard(proto)

    async def drop_connections(self) -> None:
        """Close every open client connection, still listening: what a relay's idle timeout
        (or a restart behind a load balancer) does to a client's kept connection."""
        protos = list(self._connections)
        for proto in protos:
            if proto.transport is not None:
                proto.transport.close()
        async with asyncio.timeout(10.0):
            await asyncio.gather(*(p.lost.wait() for p in protos))

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    # -- failure injection ------------------------------------------------------------

    def fail_next(
        self, code: int, text: str | None = None, times: int = 1, *, at: Stage = "DATA"
    ) -> None:
        """Answer `at` (DATA by default) with `code` for the next `times` transactions.

        A RCPT failure applies to every RCPT of the transaction that drew it.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        self._once.append(_Rule(at, code, text or _default_text(code), times))

    def fail_always(self, code: int, text: str | None = None, *, at: Stage = "DATA") -> None:
        """Answer `at` with `code` for every transaction until `heal()`."""
        self._always.append(_Rule(at, code, text or _default_text(code), None))

    def refuse_recipient(
        self, address: str, code: int = 550, text: str = "5.1.1 No such user here"
    ) -> None:
        """Refuse RCPT TO this address (case-insensitive) until `heal()`."""
        self._refusals[address.lower()] = _Rule("RCPT", code, text, None)

    def heal(self) -> None:
        """Forget every injected failure and refusal."""
        self._once.clear()
        self._always.clear()
        self._refusals.clear()

    def _take(self, stage: Stage) -> _Rule | None:
        for rule in self._once:
            if rule.stage == stage:
                assert rule.remaining is not None
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._once.remove(rule)
                return rule
        for rule in self._always:
            if rule.stage == stage:
                return rule
        return None

    def _reject(self, rule: _Rule, mail_from: str | None, rcpt_tos: list[str]) -> None:
        self.rejected.append(Rejected(rule.stage, rule.code, rule.text, mail_from, rcpt_tos))

    # -- observing --------------------------------------------------------------------

    async def _record(self, captured: Captured) -> None:
        async with self._changed:
            self.messages.append(captured)
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Captured]:
        """Wait until at least `count` messages arrived; return all captured so far.

        On timeout raise AssertionError listing what did arrive (and what was refused).
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.messages) >= count)
        except TimeoutError:
            arrived = "\n".join(f"  {m}" for m in self.messages) or "  (nothing)"
            refused = "\n".join(f"  {r}" for r in self.rejected) or "  (nothing)"
            raise AssertionError(
                f"CaptureRelay: expected {count} message(s) within {timeout}s, "
                f"got {len(self.messages)}:\n{arrived}\nrefused:\n{refused}"
            ) from None
        return list(self.messages)

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until every client connection has closed: what a killed sender had already
        written into its socket is captured by then (it may have several in flight)."""
        async with asyncio.timeout(timeout):
            for conn in list(self._connections):
                await conn.lost.wait()

    def to(self, address: str) -> list[Captured]:
        """Messages whose envelope recipients include `address` (case-insensitive)."""
        wanted = address.lower()
        return [m for m in self.messages if any(r.lower() == wanted for r in m.rcpt_tos)]

    def clear(self) -> None:
        self.messages.clear()
        self.rejected.clear()
