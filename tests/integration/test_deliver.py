"""deliver() against a real aiosmtpd capture relay on loopback (and a loopback DNS server).

No SMTP mocks: every test speaks SMTP over a socket to `CaptureRelay`, whose injected
failures stand in for a smarthost's or an MX's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import dkim
import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from gateway.outbound.deliver import (
    PERMANENT,
    SENT,
    TEMPORARY,
    DeliveryResult,
    DnsMxResolver,
    MxLookupError,
    classify_reply,
    deliver,
)
from gateway.outbound.dkim import ED25519_SHA256, keygen, load_key, public_txt_record, sign
from tests.support.relay import CaptureRelay
from tests.support.tls import self_signed

HELO = "gw.example.com"


def make_message(subject: str = "Re: [#42] printer", body: str = "Hello.\r\n") -> bytes:
    return (
        "From: Example Support <support@example.com>\r\n"
        "To: customer@example.org\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
        "Message-ID: <t42.2@example.com>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + body
    ).encode()


# `relay` (a fresh CaptureRelay per test) comes from tests/conftest.py.


async def send(
    relay: CaptureRelay, *rcpts: str, mail_from: str = "", **kw: object
) -> DeliveryResult:
    return await deliver(
        make_message(),
        mail_from,
        list(rcpts) or ["customer@example.org"],
        relay=relay.address,
        helo=HELO,
        timeout=5,
        **kw,  # type: ignore[arg-type]
    )


# -- classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, SENT),
        (251, SENT),
        (421, TEMPORARY),
        (450, TEMPORARY),
        (451, TEMPORARY),
        (452, TEMPORARY),
        (550, PERMANENT),
        (551, PERMANENT),
        (552, TEMPORARY),
        (553, PERMANENT),
        (554, PERMANENT),
        (556, PERMANENT),
        (354, TEMPORARY),
        (0, TEMPORARY),
    ],
)
def test_classify_reply(code: int, outcome: str) -> None:
    assert classify_reply(code) == outcome


# -- through a smarthost ----------------------------------------------------------------


async def test_sent_with_null_sender(relay: CaptureRelay) -> None:
    result = await send(relay, mail_from="")
    assert (result.outcome, result.code, dict(result.refused)) == (SENT, 250, {})
    [got] = await relay.wait_for(1)
    assert got.mail_from == ""
    assert got.null_sender
    assert got.rcpt_tos == ["customer@example.org"]
    assert got.helo == HELO
    assert got.message()["Subject"] == "Re: [#42] printer"
    assert got.message()["Auto-Submitted"] == "auto-replied"


async def test_sent_with_sender(relay: CaptureRelay) -> None:
    result = await send(relay, "a@example.org", "B@Example.org", mail_from="support@example.com")
    assert result.ok
    [got] = await relay.wait_for(1)
    assert got.mail_from == "support@example.com"
    assert relay.to("b@example.org") == relay.to("a@EXAMPLE.org") == [got]
    assert relay.to("nobody@example.org") == []


async def test_550_is_permanent(relay: CaptureRelay) -> None:
    relay.fail_next(550, "5.7.1 Message rejected as spam")
    result = await send(relay)
    assert (result.outcome, result.code) == (PERMANENT, 550)
    assert "rejected as spam" in result.detail
    assert relay.messages == []
    assert relay.rejected[0].code == 550
    # fail_next is one-shot: the next transaction goes through.
    assert (await send(relay)).ok
    await relay.wait_for(1)


async def test_552_is_temporary(relay: CaptureRelay) -> None:
    relay.fail_next(552, "5.2.2 Mailbox full")
    result = await send(relay)
    assert (result.outcome, result.code) == (TEMPORARY, 552)


async def test_451_is_temporary(relay: CaptureRelay) -> None:
    relay.fail_next(451)
    result = await send(relay)
    assert (result.outcome, result.code) == (TEMPORARY, 451)
    assert result.detail.startswith("4.3.0")


async def test_fail_next_times_and_fail_always_then_heal(relay: CaptureRelay) -> None:
    relay.fail_next(451, times=2)
    assert [(await send(relay)).outcome for _ in range(3)] == [TEMPORARY, TEMPORARY, SENT]
    relay.fail_always(554, "5.7.0 Go away")
    assert [(await send(relay)).code for _ in range(2)] == [554, 554]
    relay.heal()
    assert (await send(relay)).ok
    assert len(await relay.wait_for(2)) == 2


async def test_sender_refused_at_mail(relay: CaptureRelay) -> None:
    relay.fail_next(421, "4.7.0 Try again later", at="MAIL")
    result = await send(relay, mail_from="support@example.com")
    assert (result.outcome, result.code) == (TEMPORARY, 421)
    assert relay.rejected[0].stage == "MAIL"


async def test_all_recipients_refused(relay: CaptureRelay) -> None:
    relay.fail_next(550, "5.1.1 Unknown user", at="RCPT")
    result = await send(relay, "a@example.org", "b@example.org")
    assert (result.outcome, result.code) == (PERMANENT, 550)
    assert set(result.refused) == {"a@example.org", "b@example.org"}
    relay.fail_next(450, "4.2.0 Greylisted", at="RCPT")
    result = await send(relay, "a@example.org")
    assert (result.outcome, result.code) == (TEMPORARY, 450)


async def test_mixed_refusals_are_temporary(relay: CaptureRelay) -> None:
    relay.refuse_recipient("gone@example.org", 550, "5.1.1 No such user")
    relay.refuse_recipient("full@example.org", 452, "4.2.2 Over quota")
    result = await send(relay, "gone@example.org", "full@example.org")
    assert result.outcome == TEMPORARY  # one of them may still work later
    assert result.refused == {
        "gone@example.org": (550, "5.1.1 No such user"),
        "full@example.org": (452, "4.2.2 Over quota"),
    }


async def test_partial_recipient_refusal_is_reported(relay: CaptureRelay) -> None:
    relay.refuse_recipient("Gone@example.org")
    result = await send(relay, "ok@example.org", "gone@example.org", "also@example.org")
    assert (result.outcome, result.code) == (SENT, 250)
    assert result.refused == {"gone@example.org": (550, "5.1.1 No such user here")}
    [got] = await relay.wait_for(1)
    assert got.rcpt_tos == ["ok@example.org", "also@example.org"]


async def test_relay_down_is_temporary_then_back_on_same_port(relay: CaptureRelay) -> None:
    port = relay.port
    await relay.stop()
    result = await send(relay)
    assert (result.outcome, result.code) == (TEMPORARY, None)
    assert str(port) in result.detail
    await relay.start()
    assert relay.port == port
    assert (await send(relay)).ok
    await relay.wait_for(1)


async def test_server_that_never_greets_times_out() -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # say nothing until the client gives up
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            hung_up.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await deliver(
            make_message(),
            "",
            ["c@example.org"],
            relay=("127.0.0.1", port),
            helo=HELO,
            timeout=0.3,
        )
        assert (result.outcome, result.code) == (TEMPORARY, None)
        assert "Timeout" in result.detail or "timed out" in result.detail.lower()
        async with asyncio.timeout(5):
            await hung_up.wait()  # the client closed its end; let the server close too
    finally:
        server.close()
        await server.wait_closed()


async def test_long_lines_utf8_and_8bit_body(relay: CaptureRelay) -> None:
    long_line = "x" * 20_000 + "\r\n"
    body = "Grüße aus Köln.\r\n" + long_line
    message = make_message(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=", body=body)
    result = await deliver(
        message, "", ["kundé@exämple.org"], relay=relay.address, helo=HELO, timeout=5
    )
    assert result.ok, result
    [got] = await relay.wait_for(1)
    assert got.rcpt_tos == ["kundé@exämple.org"]
    assert "SMTPUTF8" in got.mail_options
    assert "BODY=8BITMIME" in got.mail_options
    assert long_line.encode() in got.data
    assert got.message().get_content().replace("\r\n", "\n") == body.replace("\r\n", "\n")


async def test_dkim_signature_survives_the_trip(relay: CaptureRelay, tmp_path: Path) -> None:
    keygen(tmp_path / "rsa.key", domain="example.com", selector="gw1")
    keygen(tmp_path / "ed.key", domain="example.com", selector="gw2", algorithm=ED25519_SHA256)
    keys = [
        load_key(tmp_path / "rsa.key", "example.com", "gw1"),
        load_key(tmp_path / "ed.key", "example.com", "gw2"),
    ]
    txt = {f"{k.selector}._domainkey.example.com.".encode(): public_txt_record(k) for k in keys}
    signed = sign(make_message(body="Line one.\r\n.Leading dot.\r\n"), keys)
    assert (await send_bytes(relay, signed)).ok
    [got] = await relay.wait_for(1)
    assert got.data == signed  # dot-stuffing undone, nothing rewritten

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return txt[name].encode()

    for idx in (0, 1):
        assert dkim.DKIM(got.data).verify(idx=idx, dnsfunc=dnsfunc)


async def send_bytes(relay: CaptureRelay, message: bytes) -> DeliveryResult:
    return await deliver(message, "", ["c@example.org"], relay=relay.address, helo=HELO)


async def test_bad_arguments_never_raise(relay: CaptureRelay) -> None:
    r = await send(relay, starttls="sometimes")
    assert r.outcome == TEMPORARY
    assert "starttls" in r.detail
    r = await deliver(make_message(), "", [], relay=relay.address, helo=HELO)
    assert r.outcome == PERMANENT
    r = await deliver(make_message(), "", ["x@example.org"], relay=("127.0.0.1", 70000), helo=HELO)
    assert r.outcome == TEMPORARY


async def test_wait_for_reports_what_arrived(relay: CaptureRelay) -> None:
    await send(relay)
    relay.fail_next(550)
    await send(relay)
    with pytest.raises(AssertionError) as info:
        await relay.wait_for(2, timeout=0.05)
    text = str(info.value)
    assert "expected 2" in text
    assert "got 1" in text
    assert "customer@example.org" in text
    assert "550" in text


# -- STARTTLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1: encrypts, but no public CA vouches for it."""
    pytest.importorskip("cryptography.x509")
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "relay.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_opportunistic_tls_is_used_when_offered(server_tls: ssl.SSLContext) -> None:
    async with CaptureRelay(tls_context=server_tls) as relay:
        assert (await send(relay)).ok
        assert (await send(relay, starttls="never")).ok
        first, second = await relay.wait_for(2)
        assert first.tls is True  # upgraded, although the certificate is self-signed
        assert second.tls is False


async def test_required_tls_verifies_the_certificate(server_tls: ssl.SSLContext) -> None:
    async with CaptureRelay(tls_context=server_tls) as relay:
        result = await send(relay, starttls="required")
        assert result.outcome == TEMPORARY
        assert "STARTTLS failed" in result.detail
        assert relay.messages == []


async def test_required_tls_not_offered_is_temporary(relay: CaptureRelay) -> None:
    result = await send(relay, starttls="required")
    assert result.outcome == TEMPORARY
    assert "4.7.10" in result.detail
    # Opportunistic mode never fails for lack of TLS.
    assert (await send(relay)).ok
    [got] = await relay.wait_for(1)
    assert got.tls is False


# -- direct to MX -----------------------------------------------------------------------


class FakeMx:
    """An MxResolver answering from a dict (the DNS side is tested with DnsMxResolver below)."""

    def __init__(self, table: dict[str, list[tuple[int, str]] | Exception]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        self.asked.append(domain)
        answer = self.table[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def mx_send(relay: CaptureRelay, resolver: FakeMx, *rcpts: str) -> DeliveryResult:
    return await deliver(
        make_message(),
        "",
        list(rcpts),
        relay=None,
        helo=HELO,
        timeout=5,
        resolver=resolver,
        port=relay.port,
    )


async def test_mx_hosts_tried_in_preference_order(relay: CaptureRelay) -> None:
    # 127.0.0.2 is loopback too, but nothing listens there: connection refused.
    resolver = FakeMx({"example.org": [(20, "127.0.0.1"), (10, "127.0.0.2")]})
    result = await mx_send(relay, resolver, "c@Example.ORG")
    assert result.ok, result
    [got] = await relay.wait_for(1)
    assert got.rcpt_tos == ["c@Example.ORG"]
    assert got.null_sender
    assert resolver.asked == ["example.org"]


async def test_mx_all_hosts_down_is_temporary(relay: CaptureRelay) -> None:
    resolver = FakeMx({"example.org": [(10, "127.0.0.2"), (20, "127.0.0.3")]})
    result = await mx_send(relay, resolver, "c@example.org")
    assert (result.outcome, result.code) == (TEMPORARY, None)
    assert "127.0.0.2" in result.detail
    assert "127.0.0.3" in result.detail


async def test_mx_permanent_answer_stops_at_first_host(relay: CaptureRelay) -> None:
    relay.fail_next(550, "5.1.1 No such user")
    resolver = FakeMx({"example.org": [(10, "127.0.0.1"), (20, "localhost")]})
    result = await mx_send(relay, resolver, "c@example.org")
    assert (result.outcome, result.code) == (PERMANENT, 550)
    assert relay.connections_seen == 1


async def test_mx_temporary_answer_tries_next_host(relay: CaptureRelay) -> None:
    relay.fail_next(451)
    resolver = FakeMx({"example.org": [(10, "127.0.0.1"), (20, "localhost")]})
    assert (await mx_send(relay, resolver, "c@example.org")).ok
    assert len(relay.rejected) == 1
    assert len(await relay.wait_for(1)) == 1


async def test_null_mx_and_lookup_failures(relay: CaptureRelay) -> None:
    resolver = FakeMx(
        {
            "null.test": [(0, ".")],
            "gone.test": MxLookupError("5.1.2 gone.test: no such domain", permanent=True, code=550),
            "flaky.test": MxLookupError("4.4.3 SERVFAIL", permanent=False),
            "broken.test": RuntimeError("resolver bug"),
        }
    )
    r = await mx_send(relay, resolver, "a@null.test")
    assert (r.outcome, r.code) == (PERMANENT, 556)
    r = await mx_send(relay, resolver, "a@gone.test")
    assert (r.outcome, r.code) == (PERMANENT, 550)
    r = await mx_send(relay, resolver, "a@flaky.test")
    assert r.outcome == TEMPORARY
    r = await mx_send(relay, resolver, "a@broken.test")
    assert r.outcome == TEMPORARY
    assert "resolver bug" in r.detail
    r = await mx_send(relay, resolver, "no-domain")
    assert (r.outcome, r.code) == (PERMANENT, 553)


async def test_mx_groups_recipients_by_domain(relay: CaptureRelay) -> None:
    resolver = FakeMx(
        {
            "a.test": [(10, "127.0.0.1")],
            "b.test": [(10, "localhost")],
            "null.test": [(0, ".")],
        }
    )
    result = await mx_send(relay, resolver, "x@a.test", "y@b.test", "z@A.test", "n@null.test")
    assert result.outcome == SENT
    assert result.refused == {
        "n@null.test": (556, "5.1.10 null.test: recipient domain has a null MX (RFC 7505)")
    }
    got = await relay.wait_for(2)
    assert sorted(m.rcpt_tos for m in got) == [["x@a.test", "z@A.test"], ["y@b.test"]]

    # Nobody accepted: the outcome is temporary while any domain may still work.
    relay.fail_always(451)
    result = await mx_send(relay, resolver, "x@a.test", "n@null.test")
    assert (result.outcome, result.code) == (TEMPORARY, 451)
    assert result.refused["x@a.test"][0] == 451
    assert result.refused["n@null.test"][0] == 556


# -- DnsMxResolver against a DNS server on loopback ------------------------------------


class TinyDns(asyncio.DatagramProtocol):
    """Answers UDP queries from a {(name, type): [rdata text]} table; no network beyond lo."""

    def __init__(
        self, zone: dict[tuple[str, str], list[str]], rcodes: dict[str, dns.rcode.Rcode]
    ) -> None:
        self.zone = zone
        self.rcodes = rcodes
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        if name in self.rcodes:
            response.set_rcode(self.rcodes[name])
        elif (name, rdtype) in self.zone:
            response.answer.append(
                dns.rrset.from_text_list(q.name, 60, "IN", rdtype, self.zone[(name, rdtype)])
            )
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def dns_resolver() -> AsyncIterator[DnsMxResolver]:
    zone = {
        ("example.org.", "MX"): [
            "20 mx2.example.org.",
            "10 mx1.example.org.",
            "30 mx3.example.org.",
        ],
        ("implicit.test.", "A"): ["127.0.0.1"],
        ("v6only.test.", "AAAA"): ["::1"],
        ("null.test.", "MX"): ["0 ."],
        ("viamx.test.", "MX"): ["10 localhost."],
    }
    rcodes = {"nxdomain.test.": dns.rcode.NXDOMAIN, "servfail.test.": dns.rcode.SERVFAIL}
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: TinyDns(zone, rcodes), local_addr=("127.0.0.1", 0)
    )
    try:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = transport.get_extra_info("sockname")[1]
        resolver.lifetime = 2.0
        yield DnsMxResolver(resolver)
    finally:
        transport.close()


async def test_dns_mx_sorted(dns_resolver: DnsMxResolver) -> None:
    assert await dns_resolver.mx("example.org") == [
        (10, "mx1.example.org"),
        (20, "mx2.example.org"),
        (30, "mx3.example.org"),
    ]


async def test_dns_implicit_mx(dns_resolver: DnsMxResolver) -> None:
    assert await dns_resolver.mx("implicit.test") == [(0, "implicit.test")]
    assert await dns_resolver.mx("v6only.test") == [(0, "v6only.test")]


@pytest.mark.parametrize(
    ("domain", "permanent", "code"),
    [
        ("null.test", True, 556),
        ("nxdomain.test", True, 550),
        ("nothing.test", True, 550),
        ("servfail.test", False, None),
    ],
)
async def test_dns_failures(
    dns_resolver: DnsMxResolver, domain: str, permanent: bool, code: int | None
) -> None:
    with pytest.raises(MxLookupError) as info:
        await dns_resolver.mx(domain)
    assert (info.value.permanent, info.value.code) == (permanent, code)


async def test_deliver_via_dns(dns_resolver: DnsMxResolver, relay: CaptureRelay) -> None:
    result = await deliver(
        make_message(),
        "",
        ["a@null.test"],
        relay=None,
        helo=HELO,
        resolver=dns_resolver,
        port=relay.port,
    )
    assert (result.outcome, result.code) == (PERMANENT, 556)
    # MX host names are resolved to addresses by the system resolver when connecting.
    r = await deliver(
        make_message(),
        "",
        ["a@viamx.test"],
        relay=None,
        helo=HELO,
        resolver=dns_resolver,
        port=relay.port,
    )
    assert r.ok, r
    await relay.wait_for(1)


async def test_relay_stop_drops_open_sessions(relay: CaptureRelay) -> None:
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    try:
        assert (await reader.readline()).startswith(b"220 relay.test")
        writer.write(b"EHLO client.test\r\n")
        await writer.drain()
        ehlo = await reader.readuntil(b"250 HELP\r\n")
        assert b"SMTPUTF8" in ehlo
        assert b"8BITMIME" in ehlo
        await relay.stop()  # must not hang on the idle session
        assert await reader.read() == b""  # the client sees the connection drop
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    await relay.start()
    assert (await send(relay)).ok


# -- the plain-envelope transaction (deliver._sendmail) -------------------------------------


def test_plain_addresses_quote_as_aiosmtplib_quotes_them() -> None:
    """`_sendmail` writes "<address>" where sendmail writes `quote_address(address)`: the
    same for every address `_PLAIN_ADDRESS` admits; the rest go through sendmail."""
    from aiosmtplib.email import quote_address

    from gateway.outbound.deliver import _PLAIN_ADDRESS

    plain = [
        "customer@example.org",
        "First.Last+tag@sub.Example-Shop.co.uk",
        "a_b=c-d@x",
        "x@localhost",
        "1@2.3",
        "o'brien@example.org",  # not admitted: goes through sendmail
        "a..b@example.org",
        ".a@example.org",
        "a@example.org.",
        "Name <a@example.org>",
        "a@[127.0.0.1]",
        '"quoted local"@example.org',
        "émile@example.org",
    ]
    for address in plain:
        if _PLAIN_ADDRESS.fullmatch(address):
            assert quote_address(address) == f"<{address}>", address
    admitted = [a for a in plain if _PLAIN_ADDRESS.fullmatch(a)]
    assert admitted == plain[:5]


async def _both_ways(
    relay: CaptureRelay, mail_from: str, rcpts: list[str], options: list[str]
) -> list[str]:
    """The same transaction through `_sendmail` and through aiosmtplib's sendmail, each on
    a connection of its own: what each returned or raised."""
    import aiosmtplib

    from gateway.outbound.deliver import _plain_envelope, _sendmail

    outcomes: list[object] = []
    for lean in (True, False):
        smtp = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, local_hostname=HELO, start_tls=False
        )
        await smtp.connect()
        await smtp.ehlo()
        assert _plain_envelope(smtp, mail_from, rcpts, options)
        message = make_message()
        try:
            if lean:
                got: object = await _sendmail(smtp, mail_from, rcpts, message, options)
            else:
                got = await smtp.sendmail(mail_from, rcpts, message, mail_options=options)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            got = (type(exc), exc.args)
        # The relay numbers what it captures ("captured #1"): the rest must be equal.
        outcomes.append(re.sub(r"#\d+", "#", repr(got)))
        await smtp.quit()
    return outcomes


async def test_plain_transaction_is_sendmails(relay: CaptureRelay) -> None:
    """Same commands (SIZE first, then the options), same message on the relay, same
    result; a refused recipient, every recipient refused and a refused sender come back
    exactly as aiosmtplib reports them (and the envelope is reset: the next one works)."""
    rcpts = ["one@example.org", "two@example.org"]
    lean, stock = await _both_ways(relay, "", rcpts, ["BODY=8BITMIME"])
    assert lean == stock, (lean, stock)
    first, second = relay.messages
    assert (first.mail_from, first.rcpt_tos, first.data, first.mail_options) == (
        second.mail_from,
        second.rcpt_tos,
        second.data,
        second.mail_options,
    )
    assert first.mail_options[0].lower().startswith("size=")

    relay.refuse_recipient("two@example.org")
    lean, stock = await _both_ways(relay, "bounce@example.com", rcpts, [])
    assert lean == stock, (lean, stock)
    assert "'two@example.org': SMTPResponse(code=550" in str(lean)

    relay.refuse_recipient("one@example.org", 450, "4.2.1 Try later")
    lean, stock = await _both_ways(relay, "", rcpts, [])
    assert lean == stock, (lean, stock)
    assert "SMTPRecipientsRefused" in str(lean)
    relay.heal()

    relay.fail_next(553, "5.1.8 Bad sender", times=2, at="MAIL")
    lean, stock = await _both_ways(relay, "x@example.com", rcpts, [])
    assert lean == stock, (lean, stock)
    assert "SMTPSenderRefused" in str(lean)

    relay.fail_next(451, "4.3.0 Try later", times=2)
    lean, stock = await _both_ways(relay, "", rcpts, [])
    assert lean == stock, (lean, stock)
    assert "SMTPDataError" in str(lean)
    assert len(relay.messages) == 4  # the two of the first, the two of the second round
