"""docs/decisions.md D2: durable SMTP ingest that never bounces a customer (real sockets, real
spool)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest

from gateway.clock import FrozenClock
from gateway.settings import Settings
from tests.conftest import make_settings
from tests.support.faults import fail_next_batch
from tests.support.gateway import (
    all_tickets,
    inbound,
    make_mail,
    running_gateway,
    send,
    ticket_json,
)


async def test_message_becomes_a_ticket(settings: Settings, clock: FrozenClock) -> None:
    async with running_gateway(settings, clock) as gw:
        code, text = await send(gw, make_mail())
        assert code == 250
        assert "queued as" in text
        assert await gw.pipeline.run_once() == 1
        [t] = all_tickets(gw)
        d = ticket_json(gw, t.ref)
        assert d["ref"] == "ACME-1000"
        assert d["requester"] == "pat@customer.example"
        assert d["owner"] == {"id": "alice", "name": "Alice Martin", "email": "alice@example.com"}
        assert d["messages"][0]["kind"] == "customer"
        assert d["created_at"] == "2026-11-23T09:00:00Z"
        # Standard SLA: 4 business hours in Berlin from Mon 10:00 local -> 14:00 local = 13:00Z.
        assert d["deadlines"]["first_response"] == "2026-11-23T13:00:00Z"
        types = [e["type"] for e in d["events"]]
        assert {"created", "routed", "deadlines"} <= set(types)


async def _session(port: int) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, timeout=30, local_hostname="client.example"
    )
    await smtp.connect()
    return smtp


@pytest.mark.slow
async def test_500_messages_from_20_concurrent_clients_all_land(
    settings: Settings, clock: FrozenClock
) -> None:
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None

        async def client(n: int) -> list[str]:
            ids = []
            smtp = await _session(gw.port)  # type: ignore[arg-type]
            try:
                for i in range(25):
                    mid = f"<c{n}-m{i}@customer.example>"
                    m = make_mail(
                        sender=f"user{n}@customer.example", subject=f"q {n}/{i}", message_id=mid
                    )
                    errors, text = await smtp.sendmail(
                        m["From"], ["support@example.com"], m.as_bytes()
                    )
                    assert not errors
                    assert "queued as" in text
                    ids.append(mid)
            finally:
                await smtp.quit()
            return ids

        sent = [mid for ids in await asyncio.gather(*(client(n) for n in range(20))) for mid in ids]
        assert len(sent) == 500
        assert gw.spool.counts() == {"pending": 500}
        # Group commit: far fewer fsynced batches than messages under concurrency.
        assert gw.spool.batches < 500
        assert await gw.pipeline.run_once() == 500
        tickets = all_tickets(gw)
        assert len(tickets) == 500
        assert gw.spool.counts() == {}  # released only after the database committed
        print(f"500 messages, 20 clients: {gw.spool.batches} group commits")


@pytest.mark.parametrize(
    "rcpt",
    [
        "support@example.com",
        "SUPPORT@Example.COM",
        "no-reply@example.com",
        "typo-suport@example.com",
        "retired.address.2019@localhost",
        "postmaster",
    ],
)
async def test_any_local_part_at_a_support_domain_is_accepted(
    settings: Settings, clock: FrozenClock, rcpt: str
) -> None:
    async with running_gateway(settings, clock) as gw:
        code, _ = await send(gw, make_mail(to=rcpt), recipients=[rcpt])
        assert code == 250
        assert gw.spool.counts() == {"pending": 1}


async def test_foreign_domain_is_refused_as_relay(settings: Settings, clock: FrozenClock) -> None:
    async with running_gateway(settings, clock) as gw:
        smtp = await _session(gw.port)  # type: ignore[arg-type]
        try:
            await smtp.mail("pat@customer.example")
            code, text = await smtp.execute_command(b"RCPT", b"TO:<victim@elsewhere.example>")
            assert code == 550
            assert text.startswith("5.7.1")
            # A support address in the same transaction is still accepted.
            code, _ = await smtp.execute_command(b"RCPT", b"TO:<support@example.com>")
            assert code == 250
        finally:
            await smtp.quit()


async def test_long_lines_smtputf8_and_8bit_are_accepted(
    settings: Settings, clock: FrozenClock
) -> None:
    long_line = "x" * 3000
    raw_8bit = (
        "From: José <josé@exämple.org>\r\nTo: support@example.com\r\n"
        "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        f"Sehr geehrte Damen und Herren, Bestellung ü€.\r\n{long_line}\r\n"
    ).encode()
    async with running_gateway(settings, clock) as gw:
        smtp = await _session(gw.port)  # type: ignore[arg-type]
        try:
            assert smtp.supports_extension("smtputf8")
            assert smtp.supports_extension("8bitmime")
            errors, text = await smtp.sendmail(
                "josé@exämple.org",
                ["support@example.com"],
                raw_8bit,
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )
            assert not errors
            assert "queued as" in text
        finally:
            await smtp.quit()
        await gw.pipeline.run_once()
        [t] = all_tickets(gw)
        d = ticket_json(gw, t.ref)
        assert d["subject"] == "Grüße"
        assert d["requester"] == "josé@exämple.org"
        from sqlmodel import Session, select

        from gateway.store.models import Message

        with Session(gw.engine) as s:
            m = s.exec(select(Message).where(Message.direction == "in")).one()
            assert long_line.encode() in m.raw
            assert "ü€" in m.text


async def test_forced_internal_failure_answers_451_and_the_retry_lands(
    settings: Settings, clock: FrozenClock
) -> None:
    async with running_gateway(settings, clock) as gw:
        fail_next_batch(gw.spool, OSError("disk controller on fire"))
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw, make_mail())
        assert exc.value.code == 451
        assert exc.value.message.startswith("4.3.0")
        assert gw.spool.counts() == {}
        code, _ = await send(gw, make_mail())  # the sender retries
        assert code == 250
        assert gw.spool.counts() == {"pending": 1}


async def test_low_disk_answers_452(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, smtp={"min_free_disk": "100000TiB"})
    async with running_gateway(settings, clock) as gw:
        smtp = await _session(gw.port)  # type: ignore[arg-type]
        try:
            code, text = await smtp.execute_command(b"MAIL", b"FROM:<pat@customer.example>")
            assert code == 452
            assert text.startswith("4.3.1")
        finally:
            await smtp.quit()


async def test_smuggling_with_bare_lf_dot_never_yields_two_messages(
    settings: Settings, clock: FrozenClock
) -> None:
    smuggled = (
        b"From: a@customer.example\r\nTo: support@example.com\r\nSubject: one\r\n\r\n"
        b"first part\n.\r\nMAIL FROM:<evil@customer.example>\r\nRCPT TO:<support@example.com>\r\n"
        b"DATA\r\nFrom: evil@customer.example\r\nSubject: smuggled\r\n\r\nhidden\r\n"
        b"\r\n.\n\r\nstill the same message\r\n"
    )
    async with running_gateway(settings, clock) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)

        async def cmd(line: bytes) -> bytes:
            writer.write(line)
            await writer.drain()
            return await reader.readline()

        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO client.example\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        assert (await cmd(b"MAIL FROM:<a@customer.example>\r\n")).startswith(b"250")
        assert (await cmd(b"RCPT TO:<support@example.com>\r\n")).startswith(b"250")
        assert (await cmd(b"DATA\r\n")).startswith(b"354")
        final = await cmd(smuggled + b".\r\n")
        assert final.startswith(b"250")
        assert (await cmd(b"QUIT\r\n")).startswith(b"221")
        writer.close()
        await writer.wait_closed()
        assert gw.spool.counts() == {"pending": 1}
        await gw.pipeline.run_once()
        [t] = all_tickets(gw)
        assert t.subject == "one"


async def test_oversize_message_is_accepted_and_what_was_not_kept_is_recorded(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = make_settings(
        tmp_path, smtp={"max_message_size": "64KiB", "max_receive_size": "1MiB"}
    )
    m = make_mail(subject="Logs attached")
    m.add_attachment(
        b"\0" * 300_000, maintype="application", subtype="octet-stream", filename="huge.bin"
    )
    m.add_attachment(b"small", maintype="text", subtype="plain", filename="note.txt")
    async with running_gateway(settings, clock) as gw:
        code, _ = await send(gw, m)
        assert code == 250
        # Beyond max_receive_size: still 250, the rest is read and dropped, never a 552.
        big = make_mail(subject="Video", body="see attachment\n" + "y" * 2_000_000)
        code, _ = await send(gw, big)
        assert code == 250
        assert await gw.pipeline.run_once() == 2
        t1, t2 = all_tickets(gw)
        d1 = ticket_json(gw, t1.ref)
        not_kept = d1["messages"][0]["not_kept"]
        assert [n["what"] for n in not_kept] == ["attachment huge.bin"]
        assert not_kept[0]["size"] == 300_000
        assert any(e["type"] == "not-kept" for e in d1["events"])
        d2 = ticket_json(gw, t2.ref)
        whats = [n["what"] for n in d2["messages"][0]["not_kept"]]
        assert whats[0] == "the end of the message"
        assert d2["messages"][0]["size"] <= 1024 * 1024


async def test_client_retry_after_disconnect_is_stored_once(
    settings: Settings, clock: FrozenClock
) -> None:
    m = make_mail(message_id="<retry-1@customer.example>")
    async with running_gateway(settings, clock) as gw:
        await send(gw, m)
        await send(gw, m)  # the same envelope and bytes again: one spool entry
        assert gw.spool.counts() == {"pending": 1}
        await gw.pipeline.run_once()
        await send(gw, m)  # again after processing: the database dedupes
        await gw.pipeline.run_once()
        [t] = all_tickets(gw)
        d = ticket_json(gw, t.ref)
        assert len(inbound(d)) == 1
        assert any(e["type"] == "duplicate" for e in d["events"])


async def test_too_many_recipients_is_temporary(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, smtp={"max_recipients": 2})
    async with running_gateway(settings, clock) as gw:
        smtp = await _session(gw.port)  # type: ignore[arg-type]
        try:
            await smtp.mail("pat@customer.example")
            for r in (b"a@example.com", b"b@example.com"):
                code, _ = await smtp.execute_command(b"RCPT", b"TO:<" + r + b">")
                assert code == 250
            code, text = await smtp.execute_command(b"RCPT", b"TO:<c@example.com>")
            assert code == 452
            assert text.startswith("4.5.3")
        finally:
            await smtp.quit()


async def test_connection_limit_answers_421(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, smtp={"max_connections_per_ip": 2})
    async with running_gateway(settings, clock) as gw:
        a = await _session(gw.port)  # type: ignore[arg-type]
        b = await _session(gw.port)  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        greeting = await reader.readline()
        assert greeting.startswith(b"421 4.7.0")
        writer.close()
        await writer.wait_closed()
        await a.quit()
        await b.quit()
        c = await _session(gw.port)  # a slot is free again
        await c.quit()


async def test_quarantine_after_repeated_failures_and_replay(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = make_settings(tmp_path, storage={"max_attempts": 2})
    async with running_gateway(settings, clock) as gw:
        await send(gw, make_mail(subject="breaks the pipeline"))
        real_stages = gw.pipeline.prefix

        def broken(ctx: object) -> None:
            raise RuntimeError("stage exploded")

        gw.pipeline.prefix = (broken,)
        await gw.pipeline.run_once()  # attempt 1 -> back to pending
        assert gw.spool.counts() == {"pending": 1}
        assert await gw.pipeline.run_once() == 0  # backing off: not retried at once
        clock.advance(61)
        await gw.pipeline.run_once()  # attempt 2 -> quarantined
        assert gw.spool.counts() == {"quarantined": 1}
        [q] = gw.spool.quarantined()
        assert "stage exploded" in q["reason"]
        assert q["attempts"] == 2
        assert all_tickets(gw) == []
        gw.pipeline.prefix = real_stages
        assert gw.spool.replay(q["id"])
        await gw.pipeline.run_once()
        assert gw.spool.counts() == {}
        [t] = all_tickets(gw)
        assert t.subject == "breaks the pipeline"


async def test_null_sender_is_accepted_and_stored_as_empty(
    settings: Settings, clock: FrozenClock
) -> None:
    async with running_gateway(settings, clock) as gw:
        code, _ = await send(
            gw, make_mail(subject="a bounce"), sender="", recipients=["support@example.com"]
        )
        assert code == 250
        [entry] = gw.spool.claim()
        assert entry.envelope.mail_from == ""


async def test_a_finished_session_is_freed_without_the_cycle_collector(
    settings: Settings, clock: FrozenClock
) -> None:
    """docs/performance.md: a session's protocol object held bound methods of itself (and
    the streams held it), so every connection left ~130 objects for the cyclic collector,
    whose walks stalled the event loop. With the collector off, closed sessions must be
    freed by reference counting alone."""
    import gc

    from gateway.inbound.smtp import GatewaySMTP

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, GatewaySMTP))

    async with running_gateway(settings, clock) as gw:
        gc.collect()
        gc.disable()
        try:
            before = alive()
            for i in range(20):
                code, _ = await send(gw, make_mail(subject=f"freed {i}"))
                assert code == 250
            await asyncio.sleep(0.05)  # the closed sessions' last callbacks
            left = alive() - before
        finally:
            gc.enable()
    assert left <= 1, f"{left} of 20 closed sessions are still alive without gc"
