"""Helpers for the SLA clock and escalation tests: tickets written straight into the database
(with deadlines from the same `initial_deadlines` the pipeline uses) and the escalator built
around a frozen clock and the rules in tests/support/rules_sla/."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.escalation.escalator import Escalator
from gateway.routing.loader import load_rules
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.deadlines import initial_deadlines
from gateway.store.models import Event, Message, Outbox, Ticket

SLA_RULES = Path(__file__).parent / "rules_sla"


def sla_rules() -> Rules:
    return load_rules(SLA_RULES)


def new_ticket(
    session: Session,
    rules: Rules,
    *,
    at: datetime,
    sla: str = "standard",
    owner: str = "alice",
    requester: str = "pat@customer.example",
    robot: str = "",
    number: int | None = None,
    text: str = "My printer is on fire.",
) -> Ticket:
    """A ticket created at `at` with its first inbound message, like the pipeline makes."""
    policy = rules.policy(sla)
    deadlines = initial_deadlines(policy, rules.calendar_for_policy(sla), at)
    ticket = Ticket(
        ref="new",
        status="open",
        subject="Printer on fire",
        requester=requester,
        owner=owner,
        queue="support",
        sla=sla,
        created_at=at,
        updated_at=at,
        first_response_due=deadlines.first_response,
        next_response_due=deadlines.next_response,
        resolution_due=deadlines.resolution,
        last_customer_at=at,
    )
    session.add(ticket)
    session.flush()
    assert ticket.id is not None
    ticket.ref = f"ACME-{1000 + ticket.id if number is None else number}"
    session.add(ticket)
    add_customer_message(session, ticket, at, text=text, robot=robot)
    return ticket


def add_customer_message(
    session: Session, ticket: Ticket, at: datetime, *, text: str, robot: str = ""
) -> Message:
    n = session.exec(select(Message.id).where(Message.ticket_id == ticket.id)).all()
    mid = f"<m{ticket.id}.{len(n)}@customer.example>"
    msg = Message(
        ticket_id=ticket.id,
        direction="in",
        kind="customer",
        message_id=mid,
        dedupe_key=f"test:{ticket.id}:{len(n)}:{at.isoformat()}",
        raw_sha256="0" * 64,
        mail_from=ticket.requester,
        from_address=ticket.requester,
        to=json.dumps(["support@example.com"]),
        subject=ticket.subject,
        at=at,
        raw=b"Subject: x\r\n\r\n" + text.encode(),
        text=text,
        robot=robot,
    )
    session.add(msg)
    session.flush()
    return msg


def make_escalator(
    engine: Engine, settings: Settings, clock: FrozenClock, rules: Rules | None = None
) -> Escalator:
    current = rules or sla_rules()
    return Escalator(engine, settings, clock, lambda: current, Signer(settings.secret()))


def outbox(session: Session, kind: str | None = None) -> list[Outbox]:
    query = select(Outbox).order_by(Outbox.id)  # type: ignore[arg-type]
    if kind is not None:
        query = query.where(Outbox.kind == kind)
    return list(session.exec(query).all())


def events(session: Session, ticket_id: int, type_: str | None = None) -> list[Event]:
    query = select(Event).where(Event.ticket_id == ticket_id).order_by(Event.id)  # type: ignore[arg-type]
    if type_ is not None:
        query = query.where(Event.type == type_)
    return list(session.exec(query).all())
