"""One customer, one conversation: figures for docs/decisions.md D12.

Part 1, the night of 8 mails: two customers, mixed replies and fresh mails, 2 subjects,
sent over SMTP to the real gateway (in-process, FrozenClock; the bundle and delivery
workers run after every mail, the clock moves between mails). Printed for two
configurations:

* ``one-by-one``    ``tickets.known_customer = "separate"`` and ``outbound.ack_window =
                    "0s"``: every fresh mail is a ticket with its own ack and owner page
                    (what the code did before docs/decisions.md D12);
* ``conversation``  the defaults: same subject joins the open ticket, one acknowledgement
                    and one owner notification per ``ack_window`` burst.

Figures: tickets created, acknowledgements sent to the customers, notifications sent to
the owners (from the capture relay: what really left).

Part 2, merge redirect: Pat has ACME-1000 (Alice) and ACME-1001 (Bob, billing); Bob
replies ``#merge ACME-1000`` to his notification. Then 10 replies to ACME-1001: 4 to its
customer reply token, 3 with In-Reply-To its acknowledgement's Message-ID, 3 naming
``[ACME-1001]`` in the subject only. Printed: landed in the target / reopened the merged
ticket (goal 10 / 0).

Usage::

    python bench/night_of_mails.py
    python bench/night_of_mails.py --show    # also print every message that left
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAT = "pat@customer.example"
JO = "jo@other.example"
S1 = "My refund is still missing"
S2 = "Order 4711 not delivered"

#: (minutes after 23:00, sender, subject, "fresh" or "reply" to the sender's first ack)
NIGHT: list[tuple[float, str, str, str]] = [
    (0.0, PAT, S1, "fresh"),
    (0.7, PAT, S1 + "!!", "fresh"),
    (1.2, PAT, "Re: " + S1, "reply"),
    (1.5, PAT, "Fwd: " + S1, "fresh"),
    (20.0, PAT, S1 + "???", "fresh"),
    (30.0, JO, S2, "fresh"),
    (31.0, JO, S2.lower(), "fresh"),
    (45.0, JO, "Re: " + S2, "reply"),
]


def _settings(tmp: Path, relay_port: int, **extra: Any) -> Any:
    from tests.conftest import make_settings

    outbound = {"relay": f"127.0.0.1:{relay_port}", **extra.pop("outbound", {})}
    return make_settings(
        tmp,
        outbound=outbound,
        security={
            "secret_key": "bench-secret-key-0123456789abcdef",
            "staff_token_only_domains": ["example.com"],
        },
        **extra,
    )


async def _run(gw: Any, worker: Any) -> None:
    await gw.pipeline.run_once()
    await gw.bundler.run_once()
    await worker.run_once()


async def _until(gw: Any, worker: Any, clock: Any, when: datetime) -> None:
    """Move the clock to `when`, waking the workers at each window close on the way, as
    the daemon's bundle worker does (it sleeps until the next bundle is due)."""
    while (nxt := gw.bundler.next_due()) is not None and nxt <= when:
        clock.set(max(nxt, clock.now()))
        await _run(gw, worker)
    clock.set(when)
    await _run(gw, worker)


async def night(label: str, show: bool = False, **extra: Any) -> dict[str, int]:
    from gateway.clock import FrozenClock
    from gateway.outbound.worker import DeliveryWorker
    from tests.support.gateway import all_tickets, make_mail, running_gateway, send
    from tests.support.relay import CaptureRelay

    start = datetime(2026, 11, 23, 23, 0, tzinfo=UTC)
    with tempfile.TemporaryDirectory(prefix="gw-night-") as d:
        async with CaptureRelay() as relay:
            settings = _settings(Path(d), relay.port, **extra)
            clock = FrozenClock(start)
            async with running_gateway(settings, clock) as gw:
                worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
                first_ack: dict[str, Any] = {}
                for minutes, sender, subject, how in NIGHT:
                    await _until(gw, worker, clock, start + timedelta(minutes=minutes))
                    kw: dict[str, Any] = {"sender": sender, "subject": subject}
                    if how == "reply" and sender in first_ack:
                        ack = first_ack[sender]
                        kw.update(
                            to=str(ack["Reply-To"]),
                            in_reply_to=str(ack["Message-ID"]),
                            references=[str(ack["Message-ID"])],
                        )
                    kw["body"] = f"{subject}\n(sent {minutes:g} min after 23:00)\n"
                    mail = make_mail(**kw)
                    await send(gw, mail, recipients=[kw.get("to", "support@example.com")])
                    await _run(gw, worker)
                    for m in relay.messages:
                        if sender in m.rcpt_tos and sender not in first_ack:
                            first_ack[sender] = m.message()
                await _until(gw, worker, clock, start + timedelta(hours=6))
                customers = {PAT, JO}
                acks = sum(1 for m in relay.messages if set(m.rcpt_tos) & customers)
                notes = sum(1 for m in relay.messages if not set(m.rcpt_tos) & customers)
                if show:  # what Pat and Alice read: every message, plain text part
                    for m in relay.messages:
                        body = m.message().get_body(preferencelist=("plain",))
                        text = body.get_content() if body is not None else ""
                        print(f"\n===== to {', '.join(m.rcpt_tos)}: {m.message()['Subject']}")
                        print(text.rstrip())
                    print()
                result = {
                    "tickets": len(all_tickets(gw)),
                    "acks": acks,
                    "owner_notifications": notes,
                }
    print(
        f"{label:<14} mails {len(NIGHT)}: tickets created {result['tickets']}, "
        f"acknowledgements sent {result['acks']}, "
        f"owner notifications {result['owner_notifications']}"
    )
    return result


async def merge_redirect() -> tuple[int, int, int]:
    from sqlmodel import Session, select

    from gateway.clock import FrozenClock
    from gateway.outbound.worker import DeliveryWorker
    from gateway.store.models import Event, Message, Ticket
    from tests.support.gateway import make_mail, running_gateway, send
    from tests.support.relay import CaptureRelay

    with tempfile.TemporaryDirectory(prefix="gw-merge-") as d:
        async with CaptureRelay() as relay:
            settings = _settings(Path(d), relay.port)
            clock = FrozenClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))
            async with running_gateway(settings, clock) as gw:
                worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
                await send(gw, make_mail(sender=PAT, subject="Printer on fire"))
                await _run(gw, worker)
                clock.advance(timedelta(minutes=10))
                bill = make_mail(sender=PAT, to="billing@example.com", subject="Invoice wrong")
                await send(gw, bill)
                await _run(gw, worker)
                ack = [m for m in relay.messages if PAT in m.rcpt_tos][-1].message()
                note = [m for m in relay.messages if "bob@example.com" in m.rcpt_tos][-1]
                staff = make_mail(
                    sender="bob@example.com",
                    to=str(note.message()["Reply-To"]),
                    subject="Re: [ACME-1001] Invoice wrong",
                    body="#merge ACME-1000\n",
                )
                await send(gw, staff, recipients=[str(note.message()["Reply-To"])])
                await _run(gw, worker)
                for i in range(10):
                    clock.advance(timedelta(minutes=30))
                    kw: dict[str, Any] = {"sender": PAT, "body": f"Reply {i}\n"}
                    if i < 4:
                        kw.update(to=str(ack["Reply-To"]), subject=f"Re: {ack['Subject']}")
                    elif i < 7:
                        mid = str(ack["Message-ID"])
                        kw.update(subject="Re: the invoice", in_reply_to=mid, references=[mid])
                    else:
                        kw.update(subject="Re: [ACME-1001] Invoice wrong")
                    await send(
                        gw, make_mail(**kw), recipients=[kw.get("to", "support@example.com")]
                    )
                    await _run(gw, worker)
                with Session(gw.engine) as s:
                    a = s.exec(select(Ticket).where(Ticket.ref == "ACME-1000")).one()
                    b = s.exec(select(Ticket).where(Ticket.ref == "ACME-1001")).one()
                    replies = [
                        m.ticket_id
                        for m in s.exec(select(Message).where(Message.direction == "in")).all()
                        if m.text.startswith("Reply ")
                    ]
                    landed = sum(1 for t in replies if t == a.id)
                    in_merged = sum(1 for t in replies if t == b.id)
                    reopened = len(
                        s.exec(
                            select(Event.id).where(
                                Event.ticket_id == b.id, Event.type == "reopened"
                            )
                        ).all()
                    )
    print(
        f"merge redirect: 10 replies to the merged ticket's token, Message-ID and [REF]: "
        f"landed in the target {landed} / reopened the merged ticket {reopened} "
        f"(landed in the merged ticket {in_merged}); goal 10 / 0"
    )
    return landed, reopened, in_merged


async def main() -> None:
    print("The night of 8 mails (2 customers, 6 fresh + 2 replies, 2 subjects):")
    for minutes, sender, subject, how in NIGHT:
        print(f"  23:00 + {minutes:>4g} min  {sender:<22} {how:<5}  {subject}")
    await night("one-by-one", tickets={"known_customer": "separate"}, outbound={"ack_window": "0s"})
    await night("conversation", show="--show" in sys.argv)
    await merge_redirect()


if __name__ == "__main__":
    asyncio.run(main())
