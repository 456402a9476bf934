"""The SMTP edge: accept every message for a support domain, make it durable, answer.

Nothing else happens here (FIELD-NOTES §1): parsing, threading and replies run later, off
the SMTP path, so DATA plus the handler always fit in one timeout.

Answers, and why:
- `250` only after the spool commit is fsynced (RFC 5321 §4.2.5).
- any local part at a support domain is accepted (typos, no-reply@, retired addresses);
  another domain gets `550 5.7.1` (we are not an open relay).
- our own trouble is always temporary: `451 4.3.0` (error), `452 4.3.1` (disk),
  `421 4.7.0` (too many connections); the sending server retries. Never a `5xx`.
- too many recipients: `452 4.5.3` (RFC 5321 §4.5.3.1.10: the client sends the rest later).
- an oversize message is never refused: we read it all, keep the first
  `smtp.max_receive_size` bytes and record how much we did not keep, so the acknowledgement
  can say so honestly (docs/oversize.md).

`GatewaySMTP` subclasses aiosmtpd's `SMTP` for three reasons: lines up to 64 KiB (real mail
has long lines; stock answers `500 Line too long`), DATA read in large chunks instead of one
line at a time (the stock loop is ~40% of a server's CPU), and SMTP addresses parsed with a
fast path before falling back to the stdlib header parser.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.clock import Clock
from gateway.logs import kv
from gateway.spool import Envelope as SpoolEnvelope
from gateway.spool import Spool, SpoolFull

log = logging.getLogger("gateway.smtp")

_SIMPLE_ADDR = re.compile(r"^<([^<>\s\"()\\,;:@]+@[^<>\s\"()\\,;:@]+|)>(.*)$", re.DOTALL)
_TERMINATOR = b"\r\n.\r\n"


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,500}>)", re.IGNORECASE | re.MULTILINE)


def _message_id(raw: bytes) -> str | None:
    """The Message-ID for the log line, from the header block only (no full parse here)."""
    end = raw.find(b"\r\n\r\n")
    m = _MESSAGE_ID.search(raw[: end if end >= 0 else 65536])
    return m.group(1).decode("utf-8", "replace") if m else None


class ConnectionLimits:
    """Counts open connections, overall and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> str | None:
        """Return a refusal reason, or None and count the connection."""
        if self.total and self.open >= self.total:
            return "too many connections"
        if self.per_ip and self.by_ip[ip] >= self.per_ip:
            return f"too many connections from {ip}"
        self.open += 1
        self.by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with long lines, chunked DATA, fast address parsing and limits."""

    line_length_limit = 64 * 1024

    def __init__(
        self,
        handler: InboundHandler,
        *,
        limits: ConnectionLimits,
        receive_limit: int,
        **kwargs: Any,
    ) -> None:
        # data_size_limit=None: no SIZE advertised and no stock 552; our DATA keeps what fits.
        super().__init__(handler, data_size_limit=None, **kwargs)
        self.limits = limits
        self.receive_limit = receive_limit
        self._peer_ip = ""
        self._admitted = False
        self.truncated_bytes = 0
        self.messages_in_session = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self._peer_ip = peer[0] if peer else ""
            refusal = self.limits.admit(self._peer_ip)
            if refusal is not None:
                log.warning("refusing connection from %s: %s", self._peer_ip, refusal)
                self.event_handler.tally[("smtp_messages_deferred", "421")] += 1
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"421 4.7.0 {self.hostname} {refusal}, try later\r\n".encode())
                transport.close()
                self.transport = None
                return
            self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.limits.release(self._peer_ip)
        if self.session is None or self._handler_coroutine is None:
            return  # refused in connection_made: aiosmtpd never started the session
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._handler_coroutine is None:
            return False
        return super().eof_received()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Fast path for the overwhelmingly common `<local@domain> PARAMS`; anything with
        # quotes, comments or source routes goes through the stdlib parser as before.
        m = _SIMPLE_ADDR.match(arg.lstrip())
        if m is not None:
            # The null reverse-path is "<>" in aiosmtpd (as its stdlib parser returns it).
            return m.group(1) or "<>", m.group(2)
        return super()._getaddr(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")

        # Read until CRLF.CRLF (RFC 5321 §4.1.1.4). Only that exact sequence ends DATA, so
        # `\n.\r\n` or `\r\n.\n` inside a message cannot smuggle a second one
        # (CVE-2024-27305). Nothing is read past the terminator.
        reader = self._reader
        parts: list[bytes] = []
        kept = 0
        dropped = 0

        def keep(chunk: bytes) -> None:
            nonlocal kept, dropped
            room = max(self.receive_limit - kept, 0)
            if len(chunk) <= room:
                parts.append(chunk)
                kept += len(chunk)
            else:  # over max_receive_size: read on, keep nothing more, count it
                if room:
                    parts.append(chunk[:room])
                    kept += room
                dropped += len(chunk) - room

        try:
            # The stream starts at a line boundary, so a terminator may begin at once (an
            # empty message). Read byte by byte only while what we have could still be the
            # start of a terminator (usually one byte); then no kept data ends in a partial
            # terminator and `readuntil` below sees every terminator whole.
            head = bytearray(b"\r\n")
            ended = False
            while head.endswith((b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")):
                head += await reader.readexactly(1)
                if head.endswith(_TERMINATOR):
                    ended = True
                    break
            keep(bytes(head[2:-3] if ended else head[2:]))
            last_reset = self.loop.time()
            while not ended:
                try:
                    chunk = await reader.readuntil(_TERMINATOR)
                    ended = True
                    chunk = chunk[:-3]  # drop ".\r\n"; the CRLF before it ends the last line
                except asyncio.LimitOverrunError as exc:
                    chunk = await reader.read(exc.consumed)
                keep(chunk)
                now = self.loop.time()
                if now - last_reset > 1.0:  # a slow large transfer is progress, not idleness
                    self._reset_timeout()
                    last_reset = now
        except asyncio.IncompleteReadError:  # connection closed mid-DATA: nothing said 250
            return

        data = b"".join(parts)
        # Dot-unstuffing (RFC 5321 §4.5.2): a leading "." on any line is removed.
        if b"\r\n." in data or data.startswith(b"."):
            data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
        self.truncated_bytes = dropped
        self.envelope.original_content = data
        self.envelope.content = data
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._set_post_data_state()
        await self.push(status)


class InboundHandler:
    """aiosmtpd handler: recipient policy, the durable write, and the answers."""

    def __init__(
        self,
        *,
        spool: Spool,
        domains: list[str],
        hostname: str,
        clock: Clock,
        max_recipients: int = 100,
        max_messages_per_connection: int = 1000,
        on_accepted: Callable[[int], None] | None = None,
    ) -> None:
        self.spool = spool
        self.domains = {d.lower() for d in domains}
        self.hostname = hostname
        self.clock = clock
        self.max_recipients = max_recipients
        self.max_messages_per_connection = max_messages_per_connection
        self.on_accepted = on_accepted
        self.accepted = 0
        # Prometheus tallies (gateway/metrics.py): accepted, deferred by reply code.
        self.tally: Counter[tuple[str, ...]] = Counter()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def is_support_address(self, address: str) -> bool:
        local, at, domain = address.rpartition("@")
        if not at:
            # RFC 5321 §4.5.1: <postmaster> without a domain must be accepted.
            return address.lower() == "postmaster"
        return domain.lower().rstrip(".") in self.domains and bool(local)

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if server.messages_in_session >= self.max_messages_per_connection:
            self.tally[("smtp_messages_deferred", "421")] += 1
            return "421 4.7.0 Too many messages in one session, please reconnect"
        try:
            self.spool.check_disk()
        except SpoolFull:
            self.tally[("smtp_messages_deferred", "452")] += 1
            log.warning("spool disk nearly full: answering 452 4.3.1 to MAIL FROM %s", address)
            return "452 4.3.1 Insufficient system storage, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.is_support_address(address):
            return "550 5.7.1 Relaying denied: not a support address here"
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients, send the rest in another transaction"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: GatewaySMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        peer = session.peer
        mail_from = envelope.mail_from or ""
        spool_env = SpoolEnvelope(
            mail_from="" if mail_from == "<>" else mail_from,  # null sender (bounces)
            rcpt_tos=list(envelope.rcpt_tos),
            peer=peer[0] if isinstance(peer, tuple) else str(peer or ""),
            helo=session.host_name or "",
            # Whole seconds, like a Date header: deadlines then read "…T13:12:00Z".
            received_at=self.clock.now().replace(microsecond=0).isoformat(),
            smtputf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options],
            truncated_bytes=server.truncated_bytes,
        )
        self.inflight += 1
        self.idle.clear()
        try:
            entry_id = await self.spool.submit(spool_env, raw)
        except SpoolFull:
            self.tally[("smtp_messages_deferred", "452")] += 1
            log.warning("spool disk nearly full: answering 452 4.3.1 after DATA")
            return "452 4.3.1 Insufficient system storage, try again later"
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()
        server.messages_in_session += 1
        self.accepted += 1
        self.tally[("smtp_messages_accepted",)] += 1
        fields = {
            "spool": entry_id,
            "message_id": _message_id(raw),
            "size": len(raw),
            "from": spool_env.mail_from or "<>",
            "to": spool_env.rcpt_tos,
            "client": spool_env.peer,
        }
        log.info("accepted %s", kv(fields), extra={"fields": {"event": "accepted", **fields}})
        if self.on_accepted is not None:
            self.on_accepted(entry_id)
        return f"250 2.0.0 OK queued as {entry_id}"

    async def handle_exception(self, error: Exception) -> str:
        # Must be async: aiosmtpd 1.4.6 awaits it (FIELD-NOTES §1). Our trouble is
        # never the sender's fault, so the answer is temporary and the sender retries.
        log.error("SMTP session error: %r", error, exc_info=error)
        self.tally[("smtp_messages_deferred", "451")] += 1
        return "451 4.3.0 Temporary local problem, please try again later"


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def start_server(
    handler: InboundHandler,
    *,
    host: str,
    port: int,
    hostname: str,
    receive_limit: int,
    limits: ConnectionLimits,
    timeout: float = 300.0,
    tls_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen on the running loop (not aiosmtpd's threaded Controller)."""
    loop = asyncio.get_running_loop()

    def factory() -> GatewaySMTP:
        return GatewaySMTP(
            handler,
            limits=limits,
            receive_limit=receive_limit,
            hostname=hostname,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            timeout=timeout,
            command_call_limit={"NOOP": 100, "RSET": 2000, "VRFY": 20, "HELP": 20, "*": 100000},
            loop=loop,
        )

    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
