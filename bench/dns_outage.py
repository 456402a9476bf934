"""DNS outage benchmark and abuse check (docs/decisions.md D10.1 and 2).

Part 1, throughput: the real ``PipelineWorker`` (every stage: parse, classify, authenticate,
thread, route, record, staff, respond, notify, in one transaction per message) runs over N
messages already in a spool, twice:

* ``dns working``      a static resolver that answers at once (SPF and DMARC records for the
                       senders' domains: the checks complete, acks go out);
* ``dns unreachable``  the real dnspython resolver pointed at 127.0.0.2, where nothing
                       listens, with the default ``security.dns_budget`` (2 s per message).

It prints messages per second for both (ticket stored and owner notification queued, which
is what must not wait for DNS) and the ratio; acknowledgements are deferred, not waited for.

Part 2, abuse with DNS unreachable: the real gateway (SMTP on loopback, FrozenClock) gets K
customer tickets, then K forged staff replies (``MAIL FROM:<alice@example.com>``, ``From:
Alice Martin``, sent to the owner's real staff reply address taken from the notification's
Reply-To, with ``#priority urgent``) and K forged customers (``victim<i>@innocent<i>.example``
with a spam subject).  The clock then moves past ``security.recheck_window`` with the
re-check worker run at every step, DNS still down.  Prints
``forged staff replies relayed: X, acks to forged senders: Y`` (from the outbox: what
would be sent) and how many forged ``#priority`` commands were applied.

Usage::

    python bench/dns_outage.py                 # N=500, K=5
    python bench/dns_outage.py --messages 1000 --forged 10
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RULES = REPO / "tests" / "support" / "rules"
PEER = "192.0.2.10"  # the "customer MTA" every message comes from
DOMAINS = 20  # sender domains cycled through


def settings_for(tmp: Path, security: dict[str, Any]) -> Any:
    from gateway.settings import load_settings

    config = tmp / "config.toml"
    config.write_text("# dns outage benchmark: everything comes from overrides\n")
    return load_settings(
        str(config),
        rules_dir=str(RULES),
        smtp={
            "listen": "127.0.0.1:0",
            "hostname": "mx.example.com",
            "domains": ["example.com"],
            "min_free_disk": 0,
            "max_connections_per_ip": 0,
        },
        storage={"database_url": f"sqlite:///{tmp}/gateway.db", "spool_dir": str(tmp / "spool")},
        outbound={"relay": "127.0.0.1:9", "from_address": "support@example.com"},
        security={"secret_key": "bench-secret-key-0123456789abcdef", **security},
    )


def message(i: int) -> tuple[str, bytes]:
    sender = f"c{i}@d{i % DOMAINS}.customer.example"
    raw = (
        f"From: Customer {i} <{sender}>\r\nTo: Support <support@example.com>\r\n"
        f"Subject: Request {i}: the printer is on fire\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
        f"Message-ID: <dns.{i}.{time.time_ns()}@customer.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello support,\r\nthe printer on floor three is on fire again, please help.\r\n"
    ).encode()
    return sender, raw


def working_resolver() -> Any:
    from gateway.security.dns import StaticResolver

    records: dict[tuple[str, str], list[str]] = {}
    for d in range(DOMAINS):
        domain = f"d{d}.customer.example"
        records[(domain, "TXT")] = [f"v=spf1 ip4:{PEER} -all"]
        records[(f"_dmarc.{domain}", "TXT")] = ["v=DMARC1; p=reject"]
    return StaticResolver(records)


def throughput(n: int, mode: str) -> tuple[float, dict[str, int]]:
    """Process n spooled messages; return (messages per second, counts)."""
    from sqlmodel import Session, func, select

    from gateway.clock import SystemClock
    from gateway.factories import build_resolver, build_spool
    from gateway.pipeline.context import Services
    from gateway.pipeline.worker import PipelineWorker
    from gateway.routing.holder import RulesHolder
    from gateway.security.tokens import Signer
    from gateway.spool import Envelope
    from gateway.store.db import open_database
    from gateway.store.models import Event, Outbox, Ticket

    with tempfile.TemporaryDirectory(prefix="gw-dns-bench-") as d:
        tmp = Path(d)
        security: dict[str, Any] = {"verify_senders": True}
        if mode == "unreachable":
            security["nameservers"] = ["127.0.0.2"]
        settings = settings_for(tmp, security)
        resolver = working_resolver() if mode == "working" else build_resolver(settings)
        engine = open_database(settings.storage.database_url)
        spool = build_spool(settings)
        clock = SystemClock()
        services = Services(
            settings=settings,
            clock=clock,
            signer=Signer(settings.secret()),
            rules=RulesHolder(settings.rules_path).current,
            resolver=resolver,
        )
        worker = PipelineWorker(engine=engine, spool=spool, services=services)
        now = datetime.now(UTC).isoformat()
        for i in range(n):
            sender, raw = message(i)
            env = Envelope(mail_from=sender, rcpt_tos=["support@example.com"], peer=PEER,
                           helo="mx.customer.example", received_at=now)  # fmt: skip
            spool.submit_sync(env, raw)
        started = time.perf_counter()
        done = 0
        while done < n:
            done += worker.run_once_sync()
        elapsed = time.perf_counter() - started
        with Session(engine) as s:

            def count(model: Any, *where: Any) -> int:
                return int(s.exec(select(func.count()).select_from(model).where(*where)).one())

            counts = {
                "tickets": count(Ticket),
                "notifications": count(Outbox, Outbox.kind == "notification"),
                "acks": count(Outbox, Outbox.kind == "ack"),
                "ack-deferred": count(Event, Event.type == "ack-deferred"),
                "dns-budget-cut": count(Event, Event.type == "dns-budget-cut"),
                "failures": worker.failures,
            }
        spool.close()
        engine.dispose()
        close = getattr(resolver, "close", None)
        if callable(close):
            close()
        return n / elapsed, counts


# ------------------------------------------------------------------------------- part 2


async def _smtp(port: int, sender: str, rcpt: str, raw: bytes) -> None:
    import aiosmtplib

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
        await smtp.sendmail(sender, [rcpt], raw)


async def abuse(k: int) -> dict[str, int]:
    from sqlmodel import Session, select

    from gateway.app import Gateway
    from gateway.clock import FrozenClock
    from gateway.store.models import Outbox, Ticket

    with tempfile.TemporaryDirectory(prefix="gw-dns-abuse-") as d:
        tmp = Path(d)
        settings = settings_for(tmp, {"verify_senders": True, "nameservers": ["127.0.0.2"]})
        clock = FrozenClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))
        gw = Gateway(settings, clock=clock)  # the real resolver, at 127.0.0.2
        await gw.start(workers=False)
        assert gw.port is not None
        try:
            for i in range(k):
                _, raw = message(i)
                await _smtp(gw.port, f"c{i}@d{i % DOMAINS}.customer.example",
                            "support@example.com", raw)  # fmt: skip
            await gw.pipeline.run_once()
            with Session(gw.engine) as s:
                notes = s.exec(select(Outbox).where(Outbox.kind == "notification")).all()
                tokens = []
                for note in notes:
                    m = email.message_from_bytes(note.raw, policy=email.policy.default)
                    tokens.append((str(m["Reply-To"]), str(m["Subject"])))
            victims = [f"victim{i}@innocent{i}.example" for i in range(k)]
            for token, subject in tokens:
                forged = (
                    f"From: Alice Martin <alice@example.com>\r\nTo: {token}\r\n"
                    f"Subject: Re: {subject}\r\nMessage-ID: <{time.time_ns()}@example.com>\r\n"
                    "\r\n#priority urgent\r\nHi, please confirm your password at "
                    "https://evil.example\r\n"
                ).encode()
                await _smtp(gw.port, "alice@example.com", token, forged)
            for i, victim in enumerate(victims):
                spam = (
                    f"From: {victim}\r\nTo: support@example.com\r\n"
                    f"Subject: CHEAP PILLS {i} visit spam.example\r\n"
                    f"Message-ID: <{time.time_ns()}@innocent.example>\r\n\r\nbuy now\r\n"
                ).encode()
                await _smtp(gw.port, victim, "support@example.com", spam)
            await gw.pipeline.run_once()
            window = settings.security.recheck_window
            elapsed = 0.0
            step = 60.0
            while elapsed <= window + 60:
                clock.advance(timedelta(seconds=step))
                elapsed += step
                await gw.rechecker.run_once()
            with Session(gw.engine) as s:
                relayed = len(s.exec(select(Outbox).where(Outbox.kind == "staff_reply")).all())
                acks = s.exec(select(Outbox).where(Outbox.kind == "ack")).all()
                backscatter = sum(
                    1 for a in acks if any(v in json.loads(a.rcpt_tos) for v in victims)
                )
                urgent = len(s.exec(select(Ticket).where(Ticket.priority == "urgent")).all())
            return {"relayed": relayed, "backscatter": backscatter, "urgent": urgent,
                    "staff_replies": len(tokens), "forged_senders": len(victims)}  # fmt: skip
        finally:
            await gw.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=500, help="N messages per throughput run")
    ap.add_argument("--forged", type=int, default=5, help="K forged staff replies and senders")
    args = ap.parse_args()

    ok_rate, ok_counts = throughput(args.messages, "working")
    print(f"dns working:     {ok_rate:8.1f} msg/s  {ok_counts}")
    down_rate, down_counts = throughput(args.messages, "unreachable")
    print(f"dns unreachable: {down_rate:8.1f} msg/s  {down_counts}")
    print(
        f"ratio unreachable/working: {down_rate / ok_rate:.2f}  (tickets stored and owners "
        f"notified; with DNS working the acks are composed inline, with DNS unreachable they "
        f"are deferred to the re-check worker)"
    )

    r = asyncio.run(abuse(args.forged))
    print(
        f"forged staff replies relayed: {r['relayed']}, acks to forged senders: "
        f"{r['backscatter']}  (of {r['staff_replies']} forged staff replies and "
        f"{r['forged_senders']} forged senders; forged #priority applied: {r['urgent']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
