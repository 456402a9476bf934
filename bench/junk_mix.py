"""Junk never costs a human (docs/decisions.md D18): a mixed stream of mail through the real
gateway.

The real gateway (SMTP on loopback, every pipeline stage, the delivery worker to a capture
relay) gets N messages over SMTP, in this mix (shares adjustable):

* ``ham``    customers handed over by the front host (127.0.0.1, listed in
             ``security.trusted_relays``) with the filter's ``X-Spam-Flag: NO``;
* ``spam``   mail the front filter flagged (SpamAssassin ``X-Spam-Flag: YES`` /
             ``X-Spam-Status: Yes, score=...`` or rspamd ``X-Spamd-Result`` /
             ``X-Rspamd-Action``), handed over by the front host;
* ``forged`` customers connecting directly (127.0.0.2, not a trusted relay) whose mail
             *claims* ``X-Spam-Flag: YES``: untrusted, so they must get a normal ticket.

The rules are the shipped example (``rules/``: its first route sends ``spam = true`` to the
junk folder). The figures come from what a user sees: tickets in the database, the mail that
reached the capture relay (acknowledgements to senders, notifications to staff), the junk
folder. Goals: spam tickets, acks to spammers and owner notifications for spam all 0; junk
folder = spam sent; every ham and forged message has a ticket and an acknowledgement.

Usage::

    python bench/junk_mix.py                  # N=1000, 30% spam, 5% forged
    python bench/junk_mix.py --messages 200 --spam 0.5 --forged 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPAM_HEADERS = [
    "X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score={score:.1f} required=5.0 tests=BAYES_99\r\n",
    "X-Spamd-Result: default: True [{score:.2f} / 15.00]; BAYES_SPAM(5.1)\r\n"
    "X-Rspamd-Action: add header\r\n",
]


def message(i: int, kind: str) -> tuple[str, bytes]:
    if kind == "spam":
        sender = f"spammer{i}@bulk{i % 17}.example"
        subject = f"Cheap pills {i}"
        headers = random.choice(SPAM_HEADERS).format(score=random.uniform(6, 30))
    elif kind == "forged":
        sender = f"direct{i}@c{i % 23}.customer.example"
        subject = f"Question {i} about my order"
        headers = "X-Spam-Flag: YES\r\n"  # written by the sender: not believed
    else:
        sender = f"customer{i}@c{i % 31}.customer.example"
        subject = f"Question {i} about my order"
        headers = "X-Spam-Flag: NO\r\nX-Spam-Status: No, score=0.3 required=5.0\r\n"
    raw = (
        f"{headers}From: <{sender}>\r\nTo: Support <support@example.com>\r\n"
        f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
        f"Message-ID: <mix.{i}.{time.time_ns()}@{sender.rpartition('@')[2]}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello,\r\nplease have a look.\r\n"
    ).encode()
    return sender, raw


async def _send_all(port: int, items: list[tuple[str, str, bytes]], source: str) -> None:
    import aiosmtplib

    async def one_connection(chunk: list[tuple[str, str, bytes]]) -> None:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, timeout=60, source_address=(source, 0)
        ) as smtp:
            for _kind, sender, raw in chunk:
                await smtp.sendmail(sender, ["support@example.com"], raw)

    chunks = [items[i::4] for i in range(4)]
    await asyncio.gather(*(one_connection(c) for c in chunks if c))


async def run(n: int, spam_share: float, forged_share: float) -> dict[str, Any]:
    from sqlmodel import Session, col, func, select

    from gateway.app import Gateway
    from gateway.clock import FrozenClock
    from gateway.outbound.worker import DeliveryWorker
    from gateway.security.dns import StaticResolver
    from gateway.settings import load_settings
    from gateway.store.models import Junk, Ticket
    from tests.support.relay import CaptureRelay

    random.seed(18)
    kinds = ["spam"] * round(n * spam_share) + ["forged"] * round(n * forged_share)
    kinds += ["ham"] * (n - len(kinds))
    random.shuffle(kinds)
    mail = [(k, *message(i, k)) for i, k in enumerate(kinds)]

    with tempfile.TemporaryDirectory(prefix="gw-junk-mix-") as d:
        tmp = Path(d)
        (tmp / "config.toml").write_text("# junk mix benchmark: everything from overrides\n")
        async with CaptureRelay() as relay:
            settings = load_settings(
                str(tmp / "config.toml"),
                rules_dir=str(REPO / "rules"),
                smtp={
                    "listen": "127.0.0.1:0",
                    "hostname": "mx.example.com",
                    "domains": ["example.com"],
                    "min_free_disk": 0,
                    "max_messages_per_connection": 100000,
                },
                storage={
                    "database_url": f"sqlite:///{tmp}/gateway.db",
                    "spool_dir": str(tmp / "spool"),
                },
                outbound={"relay": f"127.0.0.1:{relay.port}", "daily_ack_cap": 1000},
                security={
                    "secret_key": "bench-secret-key-0123456789abcdef",
                    "trusted_relays": ["127.0.0.1/32"],
                    # Far above the stream: this run measures the junk path, not the alert.
                },
                junk={"alert_threshold": 100000},
            )
            clock = FrozenClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))
            gw = Gateway(settings, clock=clock, resolver=StaticResolver({}))
            await gw.start(workers=False)
            try:
                assert gw.port is not None
                started = time.perf_counter()
                front = [m for m in mail if m[0] != "forged"]
                direct = [m for m in mail if m[0] == "forged"]
                await _send_all(gw.port, front, "127.0.0.1")
                await _send_all(gw.port, direct, "127.0.0.2")
                sent_at = time.perf_counter()
                processed = 0
                while processed < n:
                    done = await gw.pipeline.run_once()
                    if not done:
                        break
                    processed += done
                piped_at = time.perf_counter()
                worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
                await worker.run_once()
                delivered_at = time.perf_counter()
                with Session(gw.engine) as s:
                    tickets = s.exec(select(Ticket.requester)).all()
                    junk = int(s.exec(select(func.count()).select_from(Junk)).one())
                    junk_from = set(s.exec(select(Junk.from_address)).all())
                    spam_tickets = int(
                        s.exec(
                            select(func.count())
                            .select_from(Ticket)
                            .where(col(Ticket.requester).startswith("spammer"))
                        ).one()
                    )
            finally:
                await gw.stop()
            senders = {k: {m[1] for m in mail if m[0] == k} for k in ("ham", "spam", "forged")}
            staff = {"alice@example.com", "bob@example.com", "carol@example.com"}
            acks = [m for m in relay.messages if m.null_sender and not set(m.rcpt_tos) & staff]
            notes = [m for m in relay.messages if set(m.rcpt_tos) & staff]

            def acked(group: str) -> int:
                return sum(1 for m in acks if set(m.rcpt_tos) & senders[group])

            return {
                "messages": n,
                "ham (front host)": len(senders["ham"]),
                "spam (flagged by the trusted front filter)": len(senders["spam"]),
                "forged (direct client writing X-Spam-Flag: YES)": len(senders["forged"]),
                "tickets created": len(tickets),
                "tickets for spam (goal 0)": spam_tickets,
                "tickets for forged-header mail (goal = forged)": sum(
                    1 for t in tickets if t in senders["forged"]
                ),
                "acknowledgements sent": len(acks),
                "acknowledgements to spam senders (goal 0)": acked("spam"),
                "acknowledgements to ham + forged (goal = ham + forged)": acked("ham")
                + acked("forged"),
                "owner notifications": len(notes),
                "owner notifications for spam (goal 0)": sum(
                    1 for m in notes if "Cheap pills" in str(m.message()["Subject"])
                ),
                "in the junk folder (goal = spam)": junk,
                "junk that was not spam (goal 0)": len(junk_from - senders["spam"]),
                "smtp seconds": round(sent_at - started, 1),
                "pipeline seconds": round(piped_at - sent_at, 1),
                "delivery seconds": round(delivered_at - piped_at, 1),
            }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--spam", type=float, default=0.30, help="share flagged spam (0.30)")
    ap.add_argument("--forged", type=float, default=0.05, help="share with forged headers")
    args = ap.parse_args()
    figures = asyncio.run(run(args.messages, args.spam, args.forged))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    ok = (
        figures["tickets for spam (goal 0)"] == 0
        and figures["acknowledgements to spam senders (goal 0)"] == 0
        and figures["owner notifications for spam (goal 0)"] == 0
        and figures["in the junk folder (goal = spam)"]
        == figures["spam (flagged by the trusted front filter)"]
    )
    print("goals met" if ok else "GOALS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
