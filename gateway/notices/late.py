"""Late processing: a ticket whose own deadlines passed before it was processed.

docs/decisions.md D11.8: a message that waited in a stopped node's spool got its acknowledgement
("Alice will answer by …", already past) and the whole ladder within half a second, all
steps with one `fired_at`. Here the steps whose moments are already past at processing are
*collapsed* into the current state of the plan (`gateway.sla.plan`): each is recorded done
(action "late-collapsed", so the escalator never fires it), the ticket goes to whoever the
ladder would hold it by now, and the customer gets ONE message that says when it arrived,
that it was processed late, who owns it now and the plan's real next commitment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from gateway.letters.brands import identity
from gateway.notices.customer import (
    Broken,
    late_text,
    promised,
    queue_customer_mail,
    responsible,
    ticket_letter,
)
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.deadlines import isoz
from gateway.sla.plan import BREACH_STEP, Commitment, Fire, fires, plan_ticket
from gateway.store import promises
from gateway.store.models import EscalationStep, Message, Ticket
from gateway.store.queries import add_event

__all__ = ["Late", "collapse", "send_late"]


@dataclass(frozen=True)
class Late:
    """What a late ticket missed before it was processed, and what the plan says now."""

    received_at: datetime
    processed_at: datetime
    missed: list[Broken]
    commitment: Commitment
    clock: str


def _first_missed(past: list[Fire]) -> Fire:
    breaches = [f for f in past if f.step == BREACH_STEP] or past
    return min(breaches, key=lambda f: (f.due_at, f.clock))


def collapse(
    session: Session, ticket: Ticket, rules: Rules, received_at: datetime, now: datetime
) -> Late | None:
    """Mark every moment of the plan already past at `now` done, put the ticket with whoever
    the ladder holds it by now; None when nothing is past (the ticket is on time)."""
    assert ticket.id is not None
    past = [f for f in fires(ticket, ticket.sla, rules) if f.moment <= now]
    if not past:
        return None
    before = plan_ticket(ticket, ticket.owner, ticket.sla, rules, now)
    acting = before.acting.person
    holder = ticket.owner
    for step in before.steps:
        if step.moment <= now:
            holder, acting = step.holder.id, step.acting
    previous = ticket.owner
    ticket.owner = holder
    session.add(ticket)
    for fire in past:
        session.add(
            EscalationStep(
                ticket_id=ticket.id,
                clock=fire.clock,
                due_at=fire.due_at,
                step=fire.step,
                person=acting.id if fire.step >= 0 else "",
                action="late-collapsed",
                fired_at=now,
            )
        )
    done = [(f.clock, f.due_at, f.step) for f in past if f.step >= 0]
    after = plan_ticket(ticket, ticket.owner, ticket.sla, rules, now, done)
    missed = sorted({(f.clock, f.due_at) for f in past if f.step == BREACH_STEP})
    first = _first_missed(past)
    commitment = after.commitment(first.clock, first.due_at, acting)
    add_event(
        session,
        ticket.id,
        "late",
        f"received {isoz(received_at)}, processed {isoz(now)} after "
        + (", ".join(f"{c} due {isoz(d)}" for c, d in missed) or "a warning moment")
        + f"; {len(past)} step(s) already past collapsed into the plan: {acting.name} acts now"
        + (f" (owner was {previous})" if previous != holder else ""),
        now,
        data={"collapsed": len(past), "owner": holder, "acting": acting.id},
    )
    return Late(received_at, now, [Broken(c, d) for c, d in missed], commitment, first.clock)


def send_late(
    session: Session,
    settings: Settings,
    signer: Signer,
    ticket: Ticket,
    rules: Rules,
    late: Late,
    *,
    to: str,
    last: Message | None,
    message_row: int | None = None,
) -> str:
    """Queue the one late-processing message and record the promise it makes."""
    assert ticket.id is not None
    calendar = rules.calendar_for_policy(ticket.sla)
    me = identity(settings, rules, ticket.brand)
    commitment = late.commitment
    missed = late.missed or [Broken(late.clock, late.processed_at)]
    text = late_text(
        ticket.ref,
        late.received_at,
        late.processed_at,
        missed,
        commitment,
        calendar,
        me.signature,
        ticket_letter(settings, ticket, "late"),
        me.business_name,
    )
    message_id = queue_customer_mail(
        session,
        settings,
        signer,
        ticket,
        text,
        late.processed_at,
        last,
        kind="ack",
        tag="late",
        to=to,
        rules=rules,
    )
    ticket.acknowledged = True
    session.add(ticket)
    promises.record(
        session,
        ticket_id=ticket.id,
        made_at=late.processed_at,
        to=to,
        person=commitment.person.id,
        message_id=message_id,
        what=promised(commitment),
        clock=late.clock,
        due=commitment.by,
    )
    add_event(
        session,
        ticket.id,
        "ack-sent",
        f"late-processing message {message_id} queued to {to} instead of an acknowledgement;"
        f" {responsible(commitment)}",
        late.processed_at,
        message_id=message_row,
    )
    return message_id
