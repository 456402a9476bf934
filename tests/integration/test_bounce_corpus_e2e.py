"""docs/decisions.md D5: the whole sisimai `bsd` bounce corpus, sent with a null sender over SMTP.

Zero acknowledgements, zero new tickets, every message recorded; and DSNs that report on one
of OUR outbound messages (its Message-ID rewritten into real DSNs) attach to that ticket.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import aiosmtplib
import pytest
from sqlmodel import Session, col, func, select

from gateway.clock import FrozenClock
from gateway.pipeline.bounce import parse_bounce
from gateway.settings import Settings
from gateway.store.models import Event, Message, Outbox
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parents[1] / "data" / "bounces-sisimai" / "maildir" / "bsd"


def corpus() -> list[Path]:
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) == 629, f"corpus not found at {CORPUS}"
    return files


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def test_bounce_corpus_gets_no_ack_and_no_ticket(
    settings: Settings, clock: FrozenClock
) -> None:
    files = corpus()
    async with running_gateway(settings, clock) as gw:
        # One real ticket whose acknowledgement some bounces will report on.
        await send(gw, make_mail(sender="pat@customer.example", subject="Printer on fire"))
        await gw.pipeline.run_once()
        [ticket] = all_tickets(gw)
        with Session(gw.engine) as s:
            [ack] = s.exec(select(Outbox).where(Outbox.kind == "ack")).all()
        ours = ack.message_id

        # Real DSNs naming an original Message-ID: rewrite it to our acknowledgement's.
        rewritten = []
        for path in files:
            raw = path.read_bytes()
            info = parse_bounce(email.message_from_bytes(raw, policy=email.policy.default), "")
            if info and info.original_message_ids and info.kind == "dsn":
                raw = raw.replace(info.original_message_ids[0].encode(), ours.encode())
                # A new Message-ID of its own, else it is (rightly) a duplicate of the original.
                rewritten.append(f"Message-ID: <rewritten-{len(rewritten)}@test>\n".encode() + raw)
            if len(rewritten) == 3:
                break
        assert len(rewritten) == 3

        async def sender(batch: list[bytes]) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=60) as smtp:
                for raw in batch:
                    errors, _ = await smtp.sendmail("", ["support@example.com"], crlf(raw))
                    assert not errors

        raws = [p.read_bytes() for p in files] + rewritten
        await asyncio.gather(*(sender(raws[i::4]) for i in range(4)))
        await gw.pipeline.run_once()

        with Session(gw.engine) as s:
            acks = s.exec(
                select(func.count()).select_from(Outbox).where(Outbox.kind == "ack")
            ).one()
            duplicates = s.exec(
                select(func.count()).select_from(Event).where(Event.type == "duplicate")
            ).one()
            recorded = s.exec(
                select(func.count())
                .select_from(Message)
                .where(Message.direction == "in", col(Message.spool_id).is_not(None))
            ).one()
            kinds = dict(
                s.exec(
                    select(Message.kind, func.count())
                    .where(Message.direction == "in")
                    .group_by(Message.kind)
                ).all()
            )
        attached = [m for m in ticket_json(gw, ticket.ref)["messages"] if m["kind"] == "bounce"]
        bounce_events = [e for e in ticket_json(gw, ticket.ref)["events"] if e["type"] == "bounce"]
        print(
            f"sisimai bsd corpus: {len(files)} sent with a null sender; acknowledgements: "
            f"{acks - 1}; new tickets: {len(all_tickets(gw)) - 1}; recorded: {recorded - 1} "
            f"(+{duplicates} as duplicates of an identical Message-ID; "
            f"{len(raws) - len({crlf(r) for r in raws})} byte-identical copies collapsed); "
            f"kinds: {kinds}; DSNs about our own mail attached to {ticket.ref}: {len(attached)}"
        )
        assert acks == 1  # only the human's
        assert len(all_tickets(gw)) == 1  # no ticket from any bounce
        # Nothing lost: every distinct message is stored or recorded as a duplicate (copies
        # identical in envelope and bytes collapse in the spool, docs/design.md §2).
        distinct = len({crlf(r) for r in raws})
        assert recorded + duplicates == 1 + distinct
        assert len(attached) == 3
        assert len(bounce_events) == 3
        # The rewritten DSNs report failures for other addresses; pat stays deliverable
        # unless named, and every named failed recipient is now marked.
        marked = [e for e in ticket_json(gw, ticket.ref)["events"] if e["type"] == "undeliverable"]
        assert marked
        assert gw.spool.counts() == {}
