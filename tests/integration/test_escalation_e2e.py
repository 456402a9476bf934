"""Escalation end to end: a customer mail over SMTP opens a ticket, the deadline passes on a
frozen clock, the escalator writes the outbox, the delivery worker hands the mail to the
capture relay, and the customer's reply to the notice lands back in the same ticket.

The last test needs `on_customer_message` wired into gateway/pipeline/record.py (the patch in
the escalation report); it is skipped until then.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.escalation.escalator import Escalator
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline import record as record_stage
from tests.conftest import make_settings
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json
from tests.support.relay import CaptureRelay

WIRED = "on_customer_message" in inspect.getsource(record_stage)


@dataclass
class Env:
    gw: Gateway
    escalator: Escalator
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        self.escalator.run_once()
        await self.worker.run_once()


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    async with running_gateway(settings, clock) as gw:
        escalator = Escalator(gw.engine, settings, clock, lambda: gw.rules.current, gw.signer)
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, escalator, worker, relay, clock)


def _by_rcpt(relay: CaptureRelay, address: str) -> list[str]:
    """Headers and decoded plain-text body of every mail the relay got for `address`."""
    out = []
    for m in relay.messages:
        if address in m.rcpt_tos:
            parsed = m.message()
            body = parsed.get_body(preferencelist=("plain",))
            assert body is not None
            head = m.data.split(b"\r\n\r\n", 1)[0].decode()
            out.append(head + "\n\n" + str(body.get_content()))
    return out


async def test_missed_first_response_reaches_owner_and_customer(env: Env) -> None:
    await send(env.gw, make_mail(body="The printer is on fire.\nPat\n"))
    await env.process()
    (ticket,) = all_tickets(env.gw)
    promised = ticket_json(env.gw, ticket.ref)["deadlines"]["first_response"]
    assert promised == "2026-11-23T13:00:00Z"  # 4 Berlin business hours after 09:00Z
    acks = len(env.relay.messages)

    env.clock.set(env.clock.now().replace(hour=12, minute=59))
    await env.process()
    assert len(env.relay.messages) == acks  # nothing before the deadline

    env.clock.set(env.clock.now().replace(hour=13, minute=0))
    await env.process()
    # (Alice may also have had a "new ticket" notification: pick the escalation.)
    (to_alice,) = [m for m in _by_rcpt(env.relay, "alice@example.com") if "escalation:" in m]
    assert "The printer is on fire." in to_alice  # the whole message, never "log in"
    assert "Auto-Submitted: auto-generated" in to_alice
    notices = [m for m in _by_rcpt(env.relay, "pat@customer.example") if "did not keep" in m]
    assert len(notices) == 1
    assert "Alice Martin is now responsible for your request" in notices[0]

    events = [e["type"] for e in ticket_json(env.gw, ticket.ref)["events"]]
    assert events.count("breach") == 1
    assert events.count("customer-notice") == 1

    # An hour later the backup takes over; the notice said "Alice by then", so that promise
    # is broken too and the customer is told once more, with Bob named.
    env.clock.advance(timedelta(hours=1))
    await env.process()
    (to_bob,) = [m for m in _by_rcpt(env.relay, "bob@example.com") if "escalated to you" in m]
    assert "is now yours" in to_bob
    assert ticket_json(env.gw, ticket.ref)["owner"]["id"] == "bob"
    notices = [m for m in _by_rcpt(env.relay, "pat@customer.example") if "did not keep" in m]
    assert len(notices) == 2
    assert "Bob Stone is now responsible for your request" in notices[1]


async def test_reply_to_the_notice_lands_in_the_ticket(env: Env) -> None:
    await send(env.gw, make_mail())
    await env.process()
    (ticket,) = all_tickets(env.gw)
    env.clock.set(env.clock.now().replace(hour=13))
    await env.process()
    notice = next(
        m
        for m in env.relay.messages
        if m.rcpt_tos == ["pat@customer.example"]
        and m.message()["Auto-Submitted"] == "auto-generated"
    )
    parsed = notice.message()
    reply = make_mail(
        subject="Re: " + str(parsed["Subject"]),
        to=str(parsed["Reply-To"]),
        in_reply_to=str(parsed["Message-ID"]),
        body="Thanks, still burning.\n",
    )
    await send(env.gw, reply)
    await env.process()
    assert len(all_tickets(env.gw)) == 1
    inbound = [m for m in ticket_json(env.gw, ticket.ref)["messages"] if m["direction"] == "in"]
    assert len(inbound) == 2


@pytest.mark.skipif(not WIRED, reason="on_customer_message not wired into record.py yet")
async def test_customer_follow_up_rearms_next_response_through_the_pipeline(env: Env) -> None:
    from sqlmodel import Session

    from gateway.sla import clocks
    from gateway.store.models import Ticket

    await send(env.gw, make_mail())
    await env.process()
    (ticket,) = all_tickets(env.gw)
    with Session(env.gw.engine) as s:
        t = s.get(Ticket, ticket.id)
        assert t is not None
        clocks.on_staff_reply(t, env.clock.now())  # as the staff-reply stage does
        s.add(t)
        s.commit()
    env.clock.advance(timedelta(minutes=30))
    await send(
        env.gw, make_mail(to=f"support+{env.gw.signer.reply_token(ticket.id or 0)}@example.com")
    )
    await env.process()
    detail = ticket_json(env.gw, ticket.ref)
    # 8 Berlin business hours after 09:30Z Monday: 6.5h Monday, 1.5h Tuesday from 08:00Z.
    assert detail["deadlines"]["next_response"] == "2026-11-24T09:30:00Z"


async def test_seconds_policy_owner_told_then_manager_takes_over(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """docs/decisions.md D6: a 24x7 policy of a few seconds, moved forward by the clock (no
    sleeping)."""
    rules = Path(__file__).parents[1] / "support" / "rules_blink"
    settings = make_settings(
        tmp_path, rules_dir=str(rules), outbound={"relay": f"127.0.0.1:{relay.port}"}
    )
    async with running_gateway(settings, clock) as gw:
        escalator = Escalator(gw.engine, settings, clock, lambda: gw.rules.current, gw.signer)
        env = Env(
            gw,
            escalator,
            DeliveryWorker(gw.engine, settings, clock, signer=gw.signer),
            relay,
            clock,
        )
        await send(gw, make_mail(body="Nothing works.\nPat\n"))
        await env.process()
        (ticket,) = all_tickets(gw)
        due = ticket_json(gw, ticket.ref)["deadlines"]["first_response"]
        assert due == "2026-11-23T09:00:05Z"
        # The worker sleeps until exactly the breach, not a coarse poll.
        assert escalator.next_due() == clock.now() + timedelta(seconds=5)

        clock.advance(timedelta(seconds=5))
        await env.process()
        (breach,) = [m for m in _by_rcpt(relay, "alice@example.com") if "escalation:" in m]
        assert "Nothing works." in breach

        clock.advance(timedelta(seconds=3))
        await env.process()
        assert ticket_json(gw, ticket.ref)["owner"]["id"] == "carol"
        (to_carol,) = [m for m in _by_rcpt(relay, "carol@example.com") if "escalated to you" in m]
        assert "Nothing works." in to_carol
        # One notice for the breach, sent at once; it names the owner and the manager the
        # ladder hands the request to, as it then did; then one for that broken promise.
        notice, second = [m for m in _by_rcpt(relay, "pat@customer.example") if "did not keep" in m]
        assert "Alice Martin is now responsible for your request" in notice
        assert "Carol Diaz takes over" in notice
        assert "Carol Diaz is responsible for your request" in second
