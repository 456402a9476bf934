"""Hand one outbound message to SMTP: to the configured smarthost, or straight to the MX.

`deliver()` never raises (except on cancellation): every outcome is a `DeliveryResult`
whose `outcome` tells the outbox worker what to do next (docs/design.md §6):

- "sent": the server took responsibility (250 after DATA). If it refused only some
  recipients, they are in `refused` with their reply; classify each with
  `classify_reply()` and retry or report them separately.
- "temporary": try again later (4xx, 552, refused connection, timeout, TLS failure, DNS
  trouble); `gateway.outbound.retry.next_attempt` says when.
- "permanent": do not retry (5xx except 552, null MX, nonexistent domain); tell the
  ticket's owner, never the customer.

The envelope sender may be "" (the null reverse-path `<>`, RFC 5321 §4.5.5), which
automatic replies must use (RFC 3834 §3.3). aiosmtplib's `send(sender="")` raises, so this
module drives `SMTP.sendmail()` directly (docs/design.md §6).

TLS, `starttls=`:
- "opportunistic" (default): STARTTLS when the server offers it, *without* certificate
  verification. This is RFC 7435 opportunistic security, what Postfix calls
  `smtp_tls_security_level = may`: MX certificates rarely match (RFC 7672 §1.3), an
  unauthenticated encrypted channel still beats plaintext against passive eavesdroppers,
  and a server that does not offer TLS, or whose handshake fails, gets the message in
  plaintext rather than not at all.
- "required": STARTTLS with certificate and host name verification, or a temporary failure.
- "never": plaintext (loopback relays).

Connections, `pool=`: with a :class:`gateway.outbound.pool.ConnectionPool`, a connection
whose transaction ended in 250 is kept for the next mail to the same server, which then
starts with MAIL FROM (RFC 5321 §3.3). If a kept connection turns out closed, or the server
answers 421 (closing the channel, §3.8), before it took the mail, that mail goes out at once
on a fresh connection; every other outcome is what a fresh connection would have given.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from gateway.outbound.pool import ConnectionPool, ServerKey, quit_quietly

SENT = "sent"
# RFC 5321 §4.1.2: no C0 control or DEL is valid in a mailbox (the SMTP edge refuses them
# at MAIL/RCPT; this catches addresses that came from anywhere else, e.g. a header).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TEMPORARY = "temporary"
PERMANENT = "permanent"
STARTTLS_MODES = ("opportunistic", "required", "never")


@dataclass(frozen=True)
class DeliveryResult:
    """What happened to one delivery attempt (see the module docstring)."""

    outcome: str  # "sent" | "temporary" | "permanent"
    code: int | None  # the deciding SMTP reply code; None when no server answered
    detail: str  # the server's text, or the exception's
    # Recipients refused while others were accepted (or, with several MX domains, those
    # of a domain that failed): address -> (code, text).
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == SENT


def classify_reply(code: int) -> str:
    """Map an SMTP reply code to "sent", "temporary" or "permanent".

    2xx is success. 5xx is permanent except 552, which RFC 5321 §4.5.3.1.10 says clients
    should treat as temporary (old servers used it for "mailbox full"). 4xx is temporary,
    and so is anything unexpected (1xx/3xx as a final reply, garbage): retrying is safer
    than bouncing.
    """
    if 200 <= code <= 299:
        return SENT
    if code == 552:
        return TEMPORARY
    if 500 <= code <= 599:
        return PERMANENT
    return TEMPORARY


class MxLookupError(Exception):
    """DNS could not produce mail hosts for a domain; `permanent` says if that is final."""

    def __init__(self, message: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class MxResolver(Protocol):
    """Mail exchangers for a domain as (preference, host); may raise MxLookupError."""

    async def mx(self, domain: str) -> list[tuple[int, str]]: ...


class DnsMxResolver:
    """MX lookup with dnspython's async resolver (RFC 5321 §5.1).

    - MX records sorted by preference;
    - no MX records but an A or AAAA record: the domain itself (implicit MX, §5.1);
    - null MX "0 ." (RFC 7505), NXDOMAIN, or no address at all: permanent MxLookupError;
    - timeouts, SERVFAIL, unreachable servers: temporary MxLookupError.

    The MX host names it returns are turned into addresses by the system resolver when
    aiosmtplib connects (getaddrinfo tries every A/AAAA address in turn).
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self._resolver = resolver or dns.asyncresolver.Resolver()

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        try:
            name = dns.name.from_text(domain)
        except dns.exception.DNSException as exc:
            raise MxLookupError(f"{domain}: invalid domain ({exc})", permanent=True) from None
        try:
            answer = await self._resolver.resolve(name, "MX")
        except dns.resolver.NXDOMAIN:
            raise MxLookupError(
                f"5.1.2 {domain}: domain does not exist", permanent=True, code=550
            ) from None
        except dns.resolver.NoAnswer:
            return await self._implicit_mx(domain, name)
        except dns.exception.DNSException as exc:
            raise MxLookupError(
                f"4.4.3 {domain}: MX lookup failed: {exc}", permanent=False
            ) from None
        hosts = []
        for rr in answer:
            if rr.exchange == dns.name.root:
                # RFC 7505 §3: "0 ." says the domain accepts no mail at all.
                raise MxLookupError(
                    f"5.1.10 {domain}: recipient domain has a null MX (RFC 7505)",
                    permanent=True,
                    code=556,
                )
            hosts.append((int(rr.preference), rr.exchange.to_text(omit_final_dot=True)))
        return sorted(hosts)

    async def _implicit_mx(self, domain: str, name: dns.name.Name) -> list[tuple[int, str]]:
        for rdtype in ("A", "AAAA"):
            try:
                await self._resolver.resolve(name, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise MxLookupError(
                    f"4.4.3 {domain}: address lookup failed: {exc}", permanent=False
                ) from None
            return [(0, domain)]
        raise MxLookupError(
            f"5.1.2 {domain}: no MX and no address records", permanent=True, code=550
        )


async def deliver(
    message: bytes,
    mail_from: str,
    recipients: Sequence[str],
    *,
    relay: tuple[str, int] | None,
    helo: str,
    timeout: float = 60.0,
    resolver: MxResolver | None = None,
    starttls: str = "opportunistic",
    port: int = 25,
    pool: ConnectionPool | None = None,
) -> DeliveryResult:
    """Send `message` from `mail_from` ("" = null sender) to `recipients`.

    With `relay=(host, port)` everything goes to that smarthost in one transaction.
    With `relay=None`, recipients are grouped by domain and each group is sent to its
    domain's MX hosts in preference order, on `port` (25; tests point it elsewhere).
    With `pool`, connections are taken from it and given back (module docstring).
    """
    try:
        if starttls not in STARTTLS_MODES:
            # A configuration mistake: keep the message queued until someone fixes it.
            return DeliveryResult(
                TEMPORARY, None, f"invalid starttls mode {starttls!r}; use {STARTTLS_MODES}"
            )
        if not recipients:
            return DeliveryResult(PERMANENT, None, "no recipients")
        bad = next((a for a in (mail_from, *recipients) if _CONTROL.search(a)), None)
        if bad is not None:
            # No SMTP server can take it and no retry changes it (aiosmtplib refuses the
            # command with ValueError): permanent, not five days of retries (docs/decisions.md
            # D10.9).
            return DeliveryResult(
                PERMANENT, 553, f"5.1.3 {bad!r}: control character in an envelope address"
            )
        session = _Session(message, mail_from, helo, timeout, starttls, pool)
        if relay is not None:
            return await session.attempt(relay[0], relay[1], list(recipients))
        return await _deliver_mx(session, recipients, resolver or DnsMxResolver(), port)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the promise: every failure becomes a result
        return DeliveryResult(TEMPORARY, None, f"unexpected {type(exc).__name__}: {exc}")


async def _deliver_mx(
    session: _Session, recipients: Sequence[str], resolver: MxResolver, port: int
) -> DeliveryResult:
    by_domain: dict[str, list[str]] = {}
    results: list[tuple[list[str], DeliveryResult]] = []
    for rcpt in recipients:
        local, at, domain = rcpt.rpartition("@")
        if not at or not local or not domain:
            bad = DeliveryResult(PERMANENT, 553, f"5.1.3 {rcpt!r} has no domain")
            results.append(([rcpt], bad))
            continue
        by_domain.setdefault(domain.lower().rstrip("."), []).append(rcpt)
    for domain, rcpts in by_domain.items():
        results.append((rcpts, await _deliver_domain(session, domain, rcpts, resolver, port)))
    if len(results) == 1:
        return results[0][1]
    return _merge(results)


async def _deliver_domain(
    session: _Session, domain: str, rcpts: list[str], resolver: MxResolver, port: int
) -> DeliveryResult:
    try:
        records = await resolver.mx(domain)
    except MxLookupError as exc:
        return DeliveryResult(PERMANENT if exc.permanent else TEMPORARY, exc.code, str(exc))
    except Exception as exc:
        return DeliveryResult(TEMPORARY, None, f"4.4.3 {domain}: MX lookup failed: {exc!r}")
    if any(host.rstrip(".") == "" for _, host in records):
        return DeliveryResult(
            PERMANENT, 556, f"5.1.10 {domain}: recipient domain has a null MX (RFC 7505)"
        )
    if not records:
        return DeliveryResult(PERMANENT, 550, f"5.1.2 {domain}: no mail exchanger")
    tried: list[str] = []
    result = DeliveryResult(TEMPORARY, None, "no host tried")
    for host in _order_hosts(records):
        result = await session.attempt(host, port, rcpts)
        if result.outcome != TEMPORARY:
            return result
        # RFC 5321 §5.1: on a temporary failure go on to the next MX host.
        tried.append(f"{host}: {result.detail}")
    if len(tried) > 1:
        return DeliveryResult(result.outcome, result.code, "; ".join(tried), result.refused)
    return result


def _order_hosts(records: Sequence[tuple[int, str]]) -> list[str]:
    """Hosts by ascending preference; equal preferences shuffled (RFC 5321 §5.1)."""
    shuffled = list(records)
    random.shuffle(shuffled)
    ordered = sorted(shuffled, key=lambda r: r[0])  # stable: keeps the shuffle within ties
    hosts: list[str] = []
    for _, name in ordered:
        host = name.rstrip(".")
        if host not in hosts:
            hosts.append(host)
    return hosts


def _merge(results: list[tuple[list[str], DeliveryResult]]) -> DeliveryResult:
    """Combine per-domain results: "sent" if anyone accepted, the rest in `refused`."""
    refused: dict[str, tuple[int, str]] = {}
    accepted = False
    failures: list[DeliveryResult] = []
    for rcpts, result in results:
        refused.update(result.refused)
        if result.outcome == SENT:
            accepted = True
            continue
        failures.append(result)
        # Synthetic code when no server answered (connection or DNS trouble), as Postfix
        # does in its DSNs: 451 for "try later", 550 for "never".
        code = result.code or (451 if result.outcome == TEMPORARY else 550)
        for rcpt in rcpts:
            refused.setdefault(rcpt, (code, result.detail))
    if accepted:
        return DeliveryResult(SENT, 250, "accepted for some recipients", refused)
    outcome = TEMPORARY if any(r.outcome == TEMPORARY for r in failures) else PERMANENT
    first = next(r for r in failures if r.outcome == outcome)
    return DeliveryResult(outcome, first.code, "; ".join(r.detail for r in failures), refused)


class _Session:
    """The parameters of one delivery, applied to each host tried."""

    def __init__(
        self,
        message: bytes,
        mail_from: str,
        helo: str,
        timeout: float,
        starttls: str,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.message = message
        self.mail_from = mail_from
        self.helo = helo
        self.timeout = timeout
        self.starttls = starttls
        self.pool = pool

    async def attempt(self, host: str, port: int, rcpts: list[str]) -> DeliveryResult:
        """One SMTP session with host:port. Opportunistic TLS falls back to plaintext."""
        key: ServerKey = (host, port, self.helo, self.starttls, self.timeout)
        if self.pool is not None:
            smtp = self.pool.take(key)
            if smtp is not None:
                result = await self._reuse(key, smtp, rcpts)
                if result is not None:
                    return result
                # The kept connection was gone (or closing): this mail on a fresh one.
        result, tls_failed = await self._attempt(
            host, port, rcpts, use_tls=self.starttls != "never", key=key
        )
        if tls_failed and self.starttls == "opportunistic":
            # Postfix "may" level: a failed handshake is retried in plaintext. Such a
            # connection is not kept: the next mail tries TLS again.
            result, _ = await self._attempt(host, port, rcpts, use_tls=False)
        return result

    async def _reuse(
        self, key: ServerKey, smtp: aiosmtplib.SMTP, rcpts: list[str]
    ) -> DeliveryResult | None:
        """The transaction on a kept connection; None when the connection was found closed
        or closing (421) before the server took the mail: then nothing was delivered."""
        assert self.pool is not None
        keep = False
        try:
            result = await self._transaction(smtp, rcpts)
            closing = result.refused and {c for c, _ in result.refused.values()} == {421}
            if result.outcome != SENT and closing:
                return None  # every recipient refused with 421: the server is closing
            keep = result.outcome == SENT
            return result
        except aiosmtplib.SMTPResponseException as exc:
            return None if exc.code == 421 else _reply_result(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            return None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return DeliveryResult(TEMPORARY, None, _describe(key[0], key[1], exc))
        finally:
            if keep:
                self.pool.give_back(key, smtp)
            else:
                await quit_quietly(smtp)

    async def _attempt(
        self,
        host: str,
        port: int,
        rcpts: list[str],
        *,
        use_tls: bool,
        key: ServerKey | None = None,
    ) -> tuple[DeliveryResult, bool]:
        """A fresh connection; with ``key`` (and a pool) it is kept after a 250."""
        keep = False
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self.helo,
            timeout=self.timeout,
            start_tls=False,  # STARTTLS is decided below, after EHLO
            validate_certs=False,
        )
        try:
            try:
                await smtp.connect()
                if self.pool is not None:
                    self.pool.note_opened()
                await self._ehlo(smtp)
            except aiosmtplib.SMTPResponseException as exc:
                return _reply_result(exc.code, exc.message), False
            if use_tls:
                tls_error = await self._starttls(smtp)
                if tls_error is not None:
                    return tls_error, True
            result = await self._transaction(smtp, rcpts)
            keep = key is not None and result.outcome == SENT
            return result, False
        except aiosmtplib.SMTPResponseException as exc:
            return _reply_result(exc.code, exc.message), False
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Connection refused, reset, timed out, TLS trouble: all "try later".
            return DeliveryResult(TEMPORARY, None, _describe(host, port, exc)), False
        finally:
            if keep and self.pool is not None and key is not None:
                self.pool.give_back(key, smtp)
            else:
                await _close(smtp)

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            # RFC 5321 §3.2: fall back to HELO for servers that do not know EHLO.
            await smtp.helo()

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> DeliveryResult | None:
        """Upgrade when offered; a result when TLS failed or is required and missing."""
        required = self.starttls == "required"
        if not smtp.supports_extension("starttls"):
            if required:
                return DeliveryResult(
                    TEMPORARY, None, "4.7.10 TLS required but the server does not offer STARTTLS"
                )
            return None  # opportunistic: plaintext it is
        try:
            context = await _tls_context(required)
            await smtp.starttls(validate_certs=required, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            return DeliveryResult(TEMPORARY, exc.code, f"STARTTLS refused: {exc.message}")
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
            return DeliveryResult(TEMPORARY, None, f"STARTTLS failed: {exc!r}")
        return None

    async def _transaction(self, smtp: aiosmtplib.SMTP, rcpts: list[str]) -> DeliveryResult:
        options: list[str] = []
        if not (self.mail_from.isascii() and all(r.isascii() for r in rcpts)):
            if not smtp.supports_extension("smtputf8"):
                # RFC 6531 §3.2: the message cannot be sent to this server as is.
                return DeliveryResult(
                    PERMANENT, None, "5.6.7 non-ASCII address but the server lacks SMTPUTF8"
                )
            options.append("SMTPUTF8")
        if not self.message.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")  # RFC 6152
        try:
            if _plain_envelope(smtp, self.mail_from, rcpts, options):
                errors, text = await _sendmail(smtp, self.mail_from, rcpts, self.message, options)
            else:
                errors, text = await smtp.sendmail(
                    self.mail_from, rcpts, self.message, mail_options=options
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # Every recipient refused: permanent only if every refusal is.
            refused = {r.recipient: (r.code, r.message) for r in exc.recipients}
            kinds = {classify_reply(code) for code, _ in refused.values()}
            outcome = PERMANENT if kinds == {PERMANENT} else TEMPORARY
            first = exc.recipients[0]
            return DeliveryResult(outcome, first.code, first.message, refused)
        refused = {rcpt: (resp.code, resp.message) for rcpt, resp in errors.items()}
        return DeliveryResult(SENT, 250, text, refused)


# An address that aiosmtplib's `quote_address` turns into exactly "<address>"
# (`email.utils.parseaddr` returns it unchanged, nothing to validate away): dot-atoms of
# plain ASCII letters, digits and _+=- on both sides (tests/integration/test_deliver.py).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9_+=-]+(?:\.[A-Za-z0-9_+=-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def _plain_envelope(
    smtp: aiosmtplib.SMTP, mail_from: str, rcpts: list[str], options: list[str]
) -> bool:
    """Whether `_sendmail` may stand in for ``smtp.sendmail`` (same commands, same replies
    checked): plain ASCII addresses, no SMTPUTF8, after an EHLO."""
    return (
        smtp.last_ehlo_response is not None
        and "SMTPUTF8" not in options
        and (not mail_from or _PLAIN_ADDRESS.fullmatch(mail_from) is not None)
        and all(_PLAIN_ADDRESS.fullmatch(r) is not None for r in rcpts)
    )


async def _sendmail(
    smtp: aiosmtplib.SMTP, mail_from: str, rcpts: list[str], message: bytes, options: list[str]
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """``smtp.sendmail(mail_from, rcpts, message, mail_options=options)`` for a
    `_plain_envelope`: the same MAIL (with SIZE when offered), RCPT per recipient, DATA,
    the same reply checks, exceptions and RSET after a refusal, through aiosmtplib's own
    ``execute_command`` and ``data`` (which close the connection on a timeout, a
    disconnection or a 421). What it leaves out is the per-mail work whose answer is known
    for such addresses: four ``email.utils.parseaddr`` calls (quoting and validating the
    sender and each recipient twice), ~0.1 ms of the daemon's CPU per mail. The pool hands
    a connection to one transaction at a time, so sendmail's lock has nothing to order."""
    if smtp.supports_extension("size"):
        # RFC 1870: octets as sent (what sendmail computes, first among the options).
        size = len(aiosmtplib.protocol.normalize_message_line_endings(message))
        options = [f"size={size}", *options]
    try:
        reply = await smtp.execute_command(
            b"MAIL", b"FROM:<%s>" % mail_from.encode("ascii"), *(o.encode() for o in options)
        )
        if reply.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for rcpt in rcpts:
            reply = await smtp.execute_command(b"RCPT", b"TO:<%s>" % rcpt.encode("ascii"))
            if reply.code not in (
                aiosmtplib.SMTPStatus.completed,
                aiosmtplib.SMTPStatus.will_forward,
            ):
                refused.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt))
        if len(refused) == len(rcpts):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        reply = await smtp.data(message)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        # As sendmail: reset the envelope, quietly, and report the refusal.
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await smtp.rset()
        raise
    errors = {e.recipient: aiosmtplib.SMTPResponse(e.code, e.message) for e in refused}
    return errors, reply.message


# TLS client contexts, built once and shared by every connection: building one loads the
# system's CA certificates (``ssl.create_default_context``, ~24 ms of CPU), which aiosmtplib
# did again for every STARTTLS (docs/performance.md §5). Rebuilt after an hour, so an updated
# CA bundle is read without a restart. Key: whether certificates are verified.
_TLS_CONTEXTS: dict[bool, tuple[float, ssl.SSLContext]] = {}
TLS_CONTEXT_MAX_AGE = 3600.0


def _build_tls_context(verify: bool) -> ssl.SSLContext:
    """What aiosmtplib builds for ``validate_certs=verify``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = verify
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return context


async def _tls_context(verify: bool) -> ssl.SSLContext:
    now = time.monotonic()
    cached = _TLS_CONTEXTS.get(verify)
    if cached is None or now - cached[0] > TLS_CONTEXT_MAX_AGE:
        # In a thread, as aiosmtplib does: reading the CA files must not stall the loop.
        cached = (now, await asyncio.to_thread(_build_tls_context, verify))
        _TLS_CONTEXTS[verify] = cached
    return cached[1]


def _reply_result(code: int, text: str) -> DeliveryResult:
    return DeliveryResult(classify_reply(code), code, text)


def _describe(host: str, port: int, exc: BaseException) -> str:
    return f"{host}:{port}: {type(exc).__name__}: {exc}".rstrip(": ")


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """QUIT politely when possible; always release the socket."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit()
    smtp.close()
