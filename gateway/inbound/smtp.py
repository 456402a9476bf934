"""The SMTP edge: accept every message for a support domain, make it durable, answer.

Nothing else happens here (docs/design.md §1): parsing, threading and replies run later, off
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

Limits that keep one client from holding the edge's resources (docs/decisions.md D10, docs/smtp.md):
- message bytes in memory across all sessions are bounded by `smtp.inflight_budget`; a
  message over 1 MiB, or one that does not fit the budget, is streamed to a file in
  `<spool_dir>/tmp` and from there into the spool in pieces. If even that fails (disk),
  the answer after DATA is `452 4.3.1`: the sender retries, nothing is lost. Each DATA
  also reserves an allowance for its socket buffers; with no room left a `DATA` command
  waits for another session to finish (at most 60 s, then `452 4.3.1`).
- a session lasts at most `smtp.max_session_time` (`421 4.4.2`), however busy it keeps
  itself, and at most `smtp.max_idle_commands` NOOP/RSET/HELP/... between two messages.
- an envelope address with a control character (C0 or DEL) is a syntax error:
  `501 5.1.7` at MAIL, `501 5.1.3` at RCPT (RFC 5321 §4.1.2 allows none; we never
  accept what we could not later answer).
- the greeting names our host name and no software or version.

`GatewaySMTP` subclasses aiosmtpd's `SMTP` for three reasons: lines up to 64 KiB (real mail
has long lines; stock answers `500 Line too long`), DATA read in large chunks instead of one
line at a time (the stock loop is ~40% of a server's CPU), and SMTP addresses parsed with a
fast path before falling back to the stdlib header parser.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import ssl
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.clock import Clock
from gateway.logs import kv
from gateway.spool import Envelope as SpoolEnvelope
from gateway.spool import Spool, SpoolFull

log = logging.getLogger("gateway.smtp")

_SIMPLE_ADDR = re.compile(r"^<([^<>\s\"()\\,;:@]+@[^<>\s\"()\\,;:@]+|)>(.*)$", re.DOTALL)
_TERMINATOR = b"\r\n.\r\n"
# RFC 5321 §4.1.2: neither atext nor qtextSMTP nor quoted-pairSMTP admits a C0 control or
# DEL, so no valid mailbox contains one. NUL, CR and LF in particular break every later use
# of the address (headers, SQL text, the SMTP command we would send it in).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Past this size a message goes to a file even when the budget has room: one large message
# should not take the memory that hundreds of ordinary ones need.
SPILL_OVER = 1024 * 1024
# Bytes asyncio reads from a client socket at once (its default is 256 KiB).
READ_SIZE = 64 * 1024
# What a session in DATA holds besides the message it keeps: socket reads and the reader's
# buffer (it pauses the socket beyond 2 x the line limit), the piece being unstuffed, and
# allocator slack (bench/memory.py: ~0.6 MiB a session with 200 in DATA at once). It comes
# out of the budget for the whole DATA, so the budget bounds these too, whatever the
# number of sessions.
DATA_ALLOWANCE = 512 * 1024
# How long a DATA waits for room in the budget before answering 452 4.3.1 (temporary).
BUDGET_WAIT = 60.0
# Commands that do not move a message forward; a session may send only so many of them
# between two accepted messages (`smtp.max_idle_commands`).
_IDLE_COMMANDS = ("NOOP", "RSET", "HELP", "VRFY", "EXPN", "HELO", "EHLO")
# What the greeting says after our host name: no software name, no version (docs/decisions.md
# D10.11).
IDENT = "ESMTP"


def control_character(address: str) -> str | None:
    """The first control character (C0 or DEL) in `address`, or None if it has none."""
    m = _CONTROL.search(address)
    return m.group(0) if m else None


def unstuff(piece: bytes, tail: bytes) -> bytes:
    """Dot-unstuff one piece of DATA (RFC 5321 §4.5.2: drop a "." that begins a line).

    `tail` is the last two raw bytes before `piece` (b"\r\n" at the start of DATA), so a
    line start split across two pieces is seen as well as one inside a piece.
    """
    if tail == b"\r\n" and piece.startswith(b"."):
        piece = piece[1:]
    elif tail.endswith(b"\r") and piece.startswith(b"\n."):
        piece = b"\n" + piece[2:]
    if b"\r\n." in piece:
        piece = piece.replace(b"\r\n.", b"\r\n")
    return piece


class InflightBudget:
    """Bytes of message data that all SMTP sessions together hold in memory.

    One event loop serves every session, so plain counters suffice (no lock).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self.spilled = 0  # messages that went to a file instead
        self.waited = 0  # DATA commands that had to wait for room
        self.refused = 0  # ... and got 452 because none came
        self._freed = asyncio.Event()

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    async def acquire(self, n: int, timeout: float) -> bool:
        """`take`, waiting up to `timeout` seconds for another session to give room back."""
        if self.take(n):
            return True
        self.waited += 1
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.take(n):
            remaining = deadline - asyncio.get_running_loop().time()
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), max(remaining, 0))
            except TimeoutError:
                self.refused += 1
                return False
        return True

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()


class DataSink:
    """Where one message's DATA goes: memory while small and within the budget, else a file.

    The file is created 0600 in the spool's tmp folder; it is only a buffer (nothing was
    promised for it: `250` comes after the spool commit), so it is never fsynced.
    """

    def __init__(self, budget: InflightBudget, limit: int, spill_dir: Path | None) -> None:
        self.budget = budget
        self.limit = limit
        self.spill_dir = spill_dir
        self.spill_over = min(SPILL_OVER, budget.total)
        self.parts: list[bytes] = []
        self.held = 0  # bytes reserved in the budget
        self.kept = 0
        self.dropped = 0
        self.file: Any = None
        self.path: Path | None = None
        self.error: OSError | None = None

    def write(self, piece: bytes) -> None:
        room = max(self.limit - self.kept, 0)
        if len(piece) > room:  # over max_receive_size: read on, keep nothing more, count it
            self.dropped += len(piece) - room
            piece = piece[:room]
        if not piece:
            return
        self.kept += len(piece)
        if self.error is not None:
            return
        if self.file is None:
            if self.kept <= self.spill_over and self.budget.take(len(piece)):
                self.parts.append(piece)
                self.held += len(piece)
                return
            self._spill()
            if self.error is not None:
                return
        try:
            self.file.write(piece)
        except OSError as exc:
            self._fail(exc)

    def _spill(self) -> None:
        parts, self.parts = self.parts, []
        try:
            if self.spill_dir is None:
                raise OSError("no folder to stream large messages to")
            fd, name = tempfile.mkstemp(prefix="data-", dir=self.spill_dir)  # mode 0600
            self.path = Path(name)
            self.file = os.fdopen(fd, "wb")
            for part in parts:
                self.file.write(part)
            self.budget.spilled += 1
        except OSError as exc:
            self._fail(exc)
        finally:
            self.budget.give(self.held)
            self.held = 0

    def _fail(self, exc: OSError) -> None:
        log.error("cannot stream a large message to disk: %r", exc)
        self.error = exc
        self._close_file()

    def _close_file(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                if self.error is None:
                    self.error = exc
            self.file = None

    def finish(self) -> bytes | Path:
        """The message: its bytes, or the path of the file that holds them."""
        if self.path is None:
            data = b"".join(self.parts)
            self.parts = [data]
            return data
        self._close_file()
        return self.path

    def take_path(self) -> Path | None:
        """Hand the file over (the spool removes it); `release` then leaves it alone."""
        path, self.path = self.path, None
        return path

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0
        self.parts = []
        self._close_file()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


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
        max_session_time: float = 1800.0,
        max_idle_commands: int = 50,
        **kwargs: Any,
    ) -> None:
        # data_size_limit=None: no SIZE advertised and no stock 552; our DATA keeps what fits.
        super().__init__(handler, data_size_limit=None, **kwargs)
        self.limits = limits
        self.receive_limit = receive_limit
        self.budget = handler.budget
        self.spill_dir = handler.spill_dir
        self.max_session_time = max_session_time
        self.max_idle_commands = max_idle_commands
        self._peer_ip = ""
        self._admitted = False
        self.truncated_bytes = 0
        self.messages_in_session = 0
        self.idle_commands = 0
        self.sink: DataSink | None = None
        self._in_data = False
        self._expired = False
        self._lifetime: list[asyncio.TimerHandle] = []
        for name in _IDLE_COMMANDS:
            method = self._smtp_methods.get(name)
            if method is not None:
                self._smtp_methods[name] = self._counted(method)

    # Session bounds -------------------------------------------------------------------

    def _counted(self, method: Callable[[str | None], Awaitable[None]]) -> Any:
        """`method`, refused with 421 once the session has sent too many idle commands.

        aiosmtpd resets the idle timer on every valid command, so NOOP/RSET alone would
        keep a slot for ever; its per-command call limits count a whole session instead.
        """

        @functools.wraps(method)  # keeps aiosmtpd's HELP syntax attributes
        async def counted(arg: str | None) -> None:
            self.idle_commands += 1
            if self.idle_commands > self.max_idle_commands:
                log.warning("%s: too many commands without a message, closing", self._peer_ip)
                await self.push(f"421 4.7.0 {self.hostname} too many commands without mail")
                self._close()
                return
            await method(arg)

        return counted

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _session_expired(self) -> None:
        if self.transport is None:
            return
        self._expired = True
        if self._in_data:
            # Let the message in progress finish (its sender would only send it again);
            # a DATA that is itself endless is cut at twice the lifetime, without a reply.
            self._lifetime.append(self.loop.call_later(self.max_session_time, self._close))
            return
        self._say_expired()

    def _say_expired(self) -> None:
        # RFC 5321 §3.8: a server may end a session with 421 at any time; 4.4.2 = "bad
        # connection" (RFC 3463), the client reconnects for its next message.
        log.info("%s: session reached smtp.max_session_time, closing", self._peer_ip)
        transport = self.transport
        if transport is not None:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"421 4.4.2 {self.hostname} session too long, closing\r\n".encode())
            transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            # asyncio reads up to 256 KiB per recv() into the reader's buffer, which pauses
            # only beyond 2 x the line limit: with hundreds of sessions in DATA that is most
            # of the edge's memory outside the budget. 64 KiB reads cost nothing measurable.
            if hasattr(transport, "max_size"):
                transport.max_size = READ_SIZE
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
            self._lifetime.append(
                self.loop.call_later(self.max_session_time, self._session_expired)
            )
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        for timer in self._lifetime:
            timer.cancel()
        self._lifetime.clear()
        if self._admitted:
            self._admitted = False
            self.limits.release(self._peer_ip)
        if self.session is None or self._handler_coroutine is None:
            return  # refused in connection_made: aiosmtpd never started the session
        task = self._handler_coroutine
        super().connection_lost(error)
        task.add_done_callback(self._forget)

    #: What refers back to this object once its session is over: aiosmtpd's tables of bound
    #: methods (``_auth_methods``, ``_smtp_methods``), asyncio's StreamReaderProtocol
    #: callback (a bound method too), the streams, the task, the session.
    _CYCLES = (
        "_auth_methods", "_smtp_methods", "_handle_hooks", "_reader", "_writer",
        "_handler_coroutine", "_timeout_handle", "session", "envelope", "transport",
        "_original_transport", "_tls_protocol", "_client_connected_cb",
    )  # fmt: skip

    def _forget(self, _task: asyncio.Task[None]) -> None:
        """The session is over: break the reference cycles through this object so that
        reference counting frees it and its ~130 objects at once. Left to the cyclic
        collector, every connection's garbage was walked by a collection on the event loop:
        those walks were the loop's longest stalls (docs/performance.md, bench/loop_stall.py)."""
        for name in self._CYCLES:
            if name in self.__dict__:
                setattr(self, name, None)

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
        allowance = min(DATA_ALLOWANCE, self.budget.total // 8)
        if not await self.budget.acquire(allowance, BUDGET_WAIT):
            # 452 is a reply RFC 5321 §4.3.2 lists for DATA: temporary, the sender retries.
            await self.push("452 4.3.1 Insufficient system storage, try again later")
            return
        try:
            await self._data()
        finally:
            self.budget.give(allowance)

    async def _data(self) -> None:  # noqa: C901  (one state machine over DATA; splitting hides the order)
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")

        # Read until CRLF.CRLF (RFC 5321 §4.1.1.4). Only that exact sequence ends DATA, so
        # `\n.\r\n` or `\r\n.\n` inside a message cannot smuggle a second one
        # (CVE-2024-27305). Nothing is read past the terminator.
        reader = self._reader
        sink = DataSink(self.budget, self.receive_limit, self.spill_dir)
        tail = b"\r\n"  # the last two raw bytes fed, for dot-unstuffing across pieces

        def feed(raw: bytes) -> None:
            nonlocal tail
            if raw:
                sink.write(unstuff(raw, tail))
                tail = (tail + raw)[-2:]

        self._in_data = True
        self.sink = sink
        try:
            try:
                # The stream starts at a line boundary, so a terminator may begin at once
                # (an empty message). Read byte by byte only while what we have could still
                # be the start of a terminator (usually one byte); then no kept data ends in
                # a partial terminator and `readuntil` below sees every terminator whole.
                head = bytearray(b"\r\n")
                ended = False
                while head.endswith((b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")):
                    head += await reader.readexactly(1)
                    if head.endswith(_TERMINATOR):
                        ended = True
                        break
                feed(bytes(head[2:-3] if ended else head[2:]))
                last_reset = self.loop.time()
                while not ended:
                    try:
                        chunk = await reader.readuntil(_TERMINATOR)
                        ended = True
                        chunk = chunk[:-3]  # drop ".\r\n"; the CRLF before it ends the last line
                    except asyncio.LimitOverrunError as exc:
                        chunk = await reader.read(exc.consumed)
                    feed(chunk)
                    now = self.loop.time()
                    if now - last_reset > 1.0:  # a slow large transfer is progress, not idleness
                        self._reset_timeout()
                        last_reset = now
            except asyncio.IncompleteReadError:  # connection closed mid-DATA: nothing said 250
                return

            self.truncated_bytes = sink.dropped
            message = sink.finish()
            if sink.error is not None:
                # Neither memory nor disk could hold it: temporary, the sender retries.
                self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd's, untyped
                status = "452 4.3.1 Insufficient system storage, try again later"
            else:
                data = message if isinstance(message, bytes) else b""
                self.envelope.original_content = data
                self.envelope.content = data
                try:
                    status = await self._call_handler_hook("DATA")
                finally:
                    self._set_post_data_state()  # type: ignore[no-untyped-call]  # untyped
        finally:
            self.sink = None
            sink.release()
            self._in_data = False
        await self.push(status)
        if status.startswith("250"):
            self.idle_commands = 0
        if self._expired:
            self._say_expired()


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
        inflight_budget: int = 256 * 1024 * 1024,
    ) -> None:
        self.spool = spool
        self.budget = InflightBudget(inflight_budget)
        self.spill_dir: Path | None = spool.tmp_dir
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
        if control_character(address) is not None:
            # Permanent and correct: the address is malformed, not the customer refused
            # (RFC 3463 5.1.7 "bad sender's mailbox address syntax"). Accepting it would
            # only fail later, when we answer it (docs/decisions.md D10.9).
            return "501 5.1.7 Bad sender address syntax: control character"
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
        if control_character(address) is not None:
            return "501 5.1.3 Bad recipient address syntax: control character"
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
        path = server.sink.take_path() if server.sink is not None else None
        self.inflight += 1
        self.idle.clear()
        try:
            if path is not None:  # streamed to disk: the spool copies it in and removes it
                entry_id = await self.spool.submit_file(spool_env, path)
            else:
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
        # Must be async: aiosmtpd 1.4.6 awaits it (docs/design.md §1). Our trouble is
        # never the sender's fault, so the answer is temporary and the sender retries.
        log.error("SMTP session error: %r", error, exc_info=error)
        self.tally[("smtp_messages_deferred", "451")] += 1
        return "451 4.3.0 Temporary local problem, please try again later"


#: The only names aiosmtpd.smtp looks for with `dir()`/`getmembers` (it filters by prefix).
_HOOK_PREFIXES = ("auth_", "smtp_", "handle_")


class _PerTypeIntrospection:
    """Stands in for `inspect` (and `dir`) inside `aiosmtpd.smtp` so that a new connection
    no longer pays for introspection whose answer is the same for every connection.

    aiosmtpd 1.4.6 `SMTP.__init__` scans the protocol and the handler with
    `inspect.getmembers` (for `auth_*` methods) and `dir()` (for `smtp_*` and `handle_*`),
    and reads the EHLO hook's signature: about 0.2 ms per connection, the largest
    per-connection cost with a new connection per message (docs/performance.md, problem
    2). For our own types (`GatewaySMTP`, `InboundHandler`, whose methods are all defined
    on the class) the member *names* are computed once per class and the bound members
    fetched from the instance; anything else, such as stock `SMTP` in bench/ingest.py's
    `bare` server, gets the real functions.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self._names: dict[tuple[type, tuple[str, ...]], list[str]] = {}
        self._signatures: dict[Any, Any] = {}

    def _ours(self, obj: Any) -> bool:
        return isinstance(obj, GatewaySMTP | InboundHandler)

    def _class_names(self, obj: Any, prefixes: tuple[str, ...] = _HOOK_PREFIXES) -> list[str]:
        key = (type(obj), prefixes)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = sorted(n for n in dir(type(obj)) if n.startswith(prefixes))
        return names

    def getmembers(self, obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        if not self._ours(obj) or predicate is not None:
            return list(self._real.getmembers(obj, predicate))
        # Only `auth_*` members are ever asked for (the one use in aiosmtpd.smtp).
        return [(n, getattr(obj, n)) for n in self._class_names(obj, ("auth_",))]

    def dir(self, obj: Any) -> list[str]:
        # aiosmtpd.smtp only calls dir(self) and dir(handler); a bare dir() (the caller's
        # scope) cannot be answered from here, so it is not offered.
        if not self._ours(obj):
            return dir(obj)
        return self._class_names(obj)

    def signature(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        key = getattr(obj, "__func__", None)
        if key is None or args or kwargs:
            return self._real.signature(obj, *args, **kwargs)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._real.signature(obj)
        return sig

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _install_introspection_cache() -> None:
    import inspect

    import aiosmtpd.smtp as aiosmtpd_smtp

    if isinstance(getattr(aiosmtpd_smtp, "inspect", None), _PerTypeIntrospection):
        return
    shim = _PerTypeIntrospection(inspect)
    aiosmtpd_smtp.inspect = shim  # type: ignore[assignment,attr-defined]
    aiosmtpd_smtp.dir = shim.dir  # type: ignore[attr-defined]  # shadows the builtin there


_install_introspection_cache()


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
    max_session_time: float = 1800.0,
    max_idle_commands: int = 50,
    start_serving: bool = True,
) -> asyncio.Server:
    """Listen on the running loop (not aiosmtpd's threaded Controller). With
    ``start_serving=False`` the port is bound but no connection is accepted until
    ``server.start_serving()``."""
    loop = asyncio.get_running_loop()

    def factory() -> GatewaySMTP:
        return GatewaySMTP(
            handler,
            limits=limits,
            receive_limit=receive_limit,
            max_session_time=max_session_time,
            max_idle_commands=max_idle_commands,
            hostname=hostname,
            ident=IDENT,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            timeout=timeout,
            command_call_limit={"NOOP": 100, "RSET": 2000, "VRFY": 20, "HELP": 20, "*": 100000},
            loop=loop,
        )

    return await loop.create_server(
        factory, host=host, port=port, reuse_address=True, start_serving=start_serving
    )
