"""Acknowledgements end to end: SMTP in, respond stage, outbox, delivery worker, DKIM, relay.

The pipeline runs its stages without the owner notification (these tests count only what
the customer gets; tests/integration/test_staff_email.py covers notifications), and a
``DeliveryWorker`` is driven by hand. Time only moves when the FrozenClock is advanced (no
sleeps).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.dkim import load_key, public_txt_record
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline.notify import notify_owner_stage
from gateway.pipeline.stages import CHAINS
from gateway.store.models import Event, Message, Outbox
from tests.conftest import make_settings
from tests.support.dkim import KeyTable
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

SELECTOR = "gw1"
DOMAIN = "example.com"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    dns: dict[str, str]

    async def process(self) -> int:
        """Run the pipeline on what arrived, then the delivery worker."""
        await self.gw.pipeline.run_once()
        return await self.worker.run_once()

    def verify(self, captured: Captured) -> bool:
        return KeyTable(self.dns).verify(captured)


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    key_file = tmp_path / "dkim.key"
    dkim_keygen(key_file, domain=DOMAIN, selector=SELECTOR, bits=1024)
    key = load_key(key_file, DOMAIN, SELECTOR)
    settings = make_settings(
        tmp_path,
        outbound={
            "relay": f"127.0.0.1:{relay.port}",
            "from_name": "Example Support",
            "dkim": {"domain": DOMAIN, "selector": SELECTOR, "key_file": str(key_file)},
        },
    )
    async with running_gateway(settings, clock) as gw:
        gw.pipeline.chains = {  # acks only
            d: tuple(s for s in chain if s is not notify_owner_stage) for d, chain in CHAINS.items()
        }
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        dns = {f"{SELECTOR}._domainkey.{DOMAIN}": public_txt_record(key)}
        yield Env(gw, worker, relay, clock, dns)


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def _events(gw: Gateway, ref: str, type_: str) -> list[str]:
    return [e["detail"] for e in ticket_json(gw, ref)["events"] if e["type"] == type_]


def _outbox(gw: Gateway) -> list[Outbox]:
    with Session(gw.engine) as s:
        return list(s.exec(select(Outbox).order_by(Outbox.id)).all())  # type: ignore[arg-type]


async def test_human_mail_gets_one_signed_honest_ack(env: Env) -> None:
    mail = make_mail(subject="Printer on fire")
    await send(env.gw, mail)
    assert await env.process() == 1
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    d = ticket_json(env.gw, t.ref)

    assert ack.null_sender  # automatic mail goes with MAIL FROM:<> (RFC 3834 §3.3)
    assert ack.rcpt_tos == ["pat@customer.example"]
    assert env.verify(ack), "DKIM signature does not verify"
    m = ack.message()
    assert m["Auto-Submitted"] == "auto-replied"
    assert m["X-Auto-Response-Suppress"] == "All"
    assert m["X-Support-Gateway-Loop"] == env.gw.signer.installation_id()
    assert "Precedence" not in m
    assert m["Subject"] == f"[{t.ref}] Printer on fire"
    assert m["In-Reply-To"] == mail["Message-ID"]
    assert mail["Message-ID"] in m["References"]
    assert env.gw.signer.ticket_from_message_id(m["Message-ID"]) == t.id
    assert env.gw.signer.parse_reply_address(m["Reply-To"]).ticket_id == t.id  # type: ignore[union-attr]
    assert m["To"] == "pat@customer.example"

    text = _text(ack)
    assert t.ref in text
    assert "Alice Martin is looking after your request." in text
    # The promise is the stored deadline, exactly (docs/design.md §0: one computation).
    stated = re.search(r"\((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\)", text)
    assert stated is not None, text
    assert stated.group(1) == d["deadlines"]["first_response"] == "2026-11-23T13:00:00Z"
    assert "Monday 23 November 2026, 14:00 CET (Europe/Berlin)" in text
    assert "as soon as possible" not in text.lower()
    assert "Subject: Printer on fire" in text
    assert "No attachments." in text
    # Too little history: no performance numbers.
    assert "median" not in text

    # The ticket shows the ack and why it went out; the outbox holds the signed bytes.
    kinds = [(x["direction"], x["kind"]) for x in d["messages"]]
    assert kinds == [("in", "customer"), ("out", "ack")]
    assert len(_events(env.gw, t.ref, "ack-sent")) == 1
    [row] = _outbox(env.gw)
    assert row.state == "sent"
    assert row.sent_at == env.clock.now()
    assert row.raw.startswith(b"DKIM-Signature")
    assert row.raw.split(b"\r\n\r\n")[1:] == (ack.data.split(b"\r\n\r\n")[1:])

    # Nothing more goes out later.
    env.clock.advance(timedelta(hours=2))
    assert await env.worker.run_once() == 0
    assert len(env.relay.messages) == 1


async def test_deadline_also_in_the_customers_offset(env: Env) -> None:
    mail = make_mail()
    del mail["Date"]
    mail["Date"] = "Mon, 23 Nov 2026 04:00:00 -0500"
    await send(env.gw, mail)
    await env.process()
    [ack] = env.relay.messages
    text = _text(ack)
    assert "Monday 23 November 2026, 14:00 CET (Europe/Berlin)" in text
    assert "Monday 23 November 2026, 08:00 UTC-05:00" in text


async def test_template_override(env: Env, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    for f in env.gw.settings.rules_path.glob("*.toml"):
        (rules / f.name).write_text(f.read_text())
    (rules / "templates").mkdir()
    (rules / "templates" / "ack.txt").write_text("Ticket $ref, owner $owner, due $deadline_utc.\n")
    env.gw.settings.rules_dir = str(rules)
    await send(env.gw, make_mail())
    await env.process()
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    assert _text(ack).strip() == f"Ticket {t.ref}, owner Alice Martin, due 2026-11-23T13:00:00Z."


async def test_attachments_and_not_kept_are_reported(env: Env) -> None:
    mail = make_mail()
    mail.add_attachment(b"x" * 3000, maintype="application", subtype="pdf", filename="a.pdf")
    mail.add_attachment(b"y" * 1000, maintype="image", subtype="png", filename="b.png")
    await send(env.gw, mail)
    await env.process()
    [ack] = env.relay.messages
    text = _text(ack)
    assert "2 attachments" in text
    assert "a.pdf" in text
    assert "b.png" in text


def _robot(kind: str) -> tuple[EmailMessage, str | None]:
    if kind == "null-sender":
        return make_mail(), ""
    if kind == "mailer-daemon":
        return make_mail(sender="mailer-daemon@customer.example"), None
    headers = {
        "auto-submitted": {"Auto-Submitted": "auto-replied"},
        "precedence-bulk": {"Precedence": "bulk"},
        "list-id": {"List-Id": "<news.customer.example>"},
        "x-auto-response-suppress": {"X-Auto-Response-Suppress": "OOF"},
    }[kind]
    return make_mail(headers=headers), None


@pytest.mark.parametrize(
    "kind",
    [
        "auto-submitted",
        "precedence-bulk",
        "list-id",
        "null-sender",
        "x-auto-response-suppress",
        "mailer-daemon",
    ],
)
async def test_robots_get_no_ack_but_are_recorded(env: Env, kind: str) -> None:
    mail, envelope_sender = _robot(kind)
    await send(env.gw, mail, sender=envelope_sender)
    assert await env.process() == 0
    assert env.relay.messages == []
    assert _outbox(env.gw) == []
    with Session(env.gw.engine) as s:
        [msg] = s.exec(select(Message)).all()
        assert msg.message_id == mail["Message-ID"]
        suppressed = s.exec(select(Event).where(Event.type == "ack-suppressed")).all()
        assert len(suppressed) == 1, [e.detail for e in s.exec(select(Event)).all()]
        assert suppressed[0].message_id == msg.id
        assert suppressed[0].detail  # the reason is written down


async def test_auto_submitted_no_is_a_human(env: Env) -> None:
    await send(env.gw, make_mail(headers={"Auto-Submitted": "no"}))
    await env.process()
    assert len(env.relay.messages) == 1


async def test_headerless_autoresponder_replying_to_our_ack_gets_nothing(env: Env) -> None:
    await send(env.gw, make_mail())
    await env.process()
    [ack] = env.relay.messages
    ack_id = ack.message()["Message-ID"]
    # A naive vacation responder: no Auto-Submitted, no Precedence, but it answers our ack.
    reply = make_mail(
        subject=f"Re: {ack.message()['Subject']}",
        in_reply_to=ack_id,
        references=[ack_id],
        body="I am out of the office until Monday.\n",
    )
    await send(env.gw, reply)
    await env.process()
    assert len(env.relay.messages) == 1
    [t] = all_tickets(env.gw)
    assert len(_events(env.gw, t.ref, "ack-sent")) == 1
    assert [m["direction"] for m in ticket_json(env.gw, t.ref)["messages"]] == ["in", "out", "in"]


async def test_relay_down_then_up_delivers_exactly_once(env: Env) -> None:
    await env.relay.stop()
    await send(env.gw, make_mail())
    assert await env.process() == 1  # one attempt, deferred
    [row] = _outbox(env.gw)
    assert row.state == "queued"
    assert row.attempts == 1
    assert row.last_error
    assert row.next_attempt_at > env.clock.now()
    # Not due yet: nothing is tried.
    assert await env.worker.run_once() == 0
    await env.relay.start()
    assert await env.worker.run_once() == 0
    env.clock.set(row.next_attempt_at + timedelta(seconds=1))
    assert await env.worker.run_once() == 1
    [ack] = await env.relay.wait_for(1)
    assert env.verify(ack)
    env.clock.advance(timedelta(hours=3))
    assert await env.worker.run_once() == 0
    assert len(env.relay.messages) == 1
    [row] = _outbox(env.gw)
    assert row.state == "sent"
    assert row.attempts == 2


async def test_permanent_failure_tells_the_owner_not_the_customer(env: Env) -> None:
    env.relay.fail_next(550)
    await send(env.gw, make_mail())
    await env.process()
    [note] = await env.relay.wait_for(1)
    assert note.rcpt_tos == ["alice@example.com"]
    m = note.message()
    assert m["Auto-Submitted"] == "auto-generated"
    assert "Delivery failed" in m["Subject"]
    assert env.verify(note)
    rows = _outbox(env.gw)
    assert [(r.kind, r.state) for r in rows] == [("ack", "failed"), ("notification", "sent")]
    [t] = all_tickets(env.gw)
    assert len(_events(env.gw, t.ref, "delivery-failed")) == 1
    env.clock.advance(timedelta(days=1))
    assert await env.worker.run_once() == 0
    assert env.relay.to("pat@customer.example") == []
    assert len(env.relay.messages) == 1


async def test_failed_notification_is_not_notified(env: Env) -> None:
    env.relay.fail_next(550, times=2)
    await send(env.gw, make_mail())
    await env.process()
    rows = _outbox(env.gw)
    assert [(r.kind, r.state) for r in rows] == [("ack", "failed"), ("notification", "failed")]
    assert env.relay.messages == []


async def test_daily_cap_stops_acks_and_tells_the_owner_once(env: Env) -> None:
    cap = env.gw.settings.outbound.daily_ack_cap
    # One ack per mail, as fast as they come: no bundling window (docs/decisions.md D12 bundles
    # them; tests/integration/test_conversation.py covers that).
    env.gw.settings.outbound.ack_window = "0s"

    for i in range(cap + 3):
        await send(env.gw, make_mail(subject=f"question {i}"))
    await env.process()
    to_pat = env.relay.to("pat@customer.example")
    to_alice = env.relay.to("alice@example.com")
    assert len(to_pat) == cap
    assert len(to_alice) == 1
    assert len(all_tickets(env.gw)) == cap + 3  # nothing dropped
    with Session(env.gw.engine) as s:
        caps = s.exec(select(Event).where(Event.type == "ack-cap-reached")).all()
        assert len(caps) == 1
        suppressed = s.exec(select(Event).where(Event.type == "ack-suppressed")).all()
        assert len(suppressed) == 3
    # A day later the sender may be acknowledged again.
    env.clock.advance(timedelta(hours=25))
    await send(env.gw, make_mail(subject="next day"))
    await env.process()
    assert len(env.relay.to("pat@customer.example")) == cap + 1


async def test_stuck_sending_row_is_reclaimed(env: Env) -> None:
    await env.relay.stop()
    await send(env.gw, make_mail())
    await env.gw.pipeline.run_once()
    # A node claims the row and dies mid-send.
    claimed = await asyncio.to_thread(env.worker._claim)
    assert len(claimed) == 1
    await env.relay.start()
    assert await env.worker.run_once() == 0  # still leased
    env.clock.advance(timedelta(minutes=11))
    assert await env.worker.run_once() == 1
    assert len(await env.relay.wait_for(1)) == 1


async def test_outside_business_hours_says_when_the_team_is_back(env: Env) -> None:
    env.clock.set(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))  # a Saturday
    mail = make_mail()
    del mail["Date"]
    mail["Date"] = "Sat, 28 Nov 2026 13:00:00 +0100"
    await send(env.gw, mail)
    await env.process()
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    text = _text(ack)
    assert "the team is back on Monday 30 November 2026, 09:00 CET (Europe/Berlin)" in text
    assert f"({ticket_json(env.gw, t.ref)['deadlines']['first_response']})" in text
