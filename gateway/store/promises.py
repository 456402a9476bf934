"""Promises: every statement of a person or a time the gateway makes, recorded and settled.

docs/decisions.md D11 ("One plan, said and done"): the acknowledgement promises a first answer by
the first-response deadline from the named owner; each customer notice promises the next real
commitment from the plan (`gateway.sla.plan.TicketPlan.commitment`); a staff mail that states
a time ("the customer has been told you will answer by ...") promises it to a colleague.
Each is a `Promise` row so `tickets show` can list what was said and whether it held:

- **kept**: a staff reply went out after the promise was made, by its time (or it had none);
- **broken**: its time passed with no staff reply since it was made. A broken customer
  promise gets exactly one notice (the escalator's `NOTICE_STEP` keyed by the promise's
  clock and time), and the person accountable is told;
- **withdrawn**: the ticket was closed, merged or set waiting on the customer first.

`settle_state` is the pure rule; `settle` applies it to the pending rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, or_
from sqlmodel import Session, col, select

from gateway.sla.clocks import utc
from gateway.sla.deadlines import isoz
from gateway.store import core
from gateway.store.models import Promise, Ticket
from gateway.store.plan_marks import unplan

__all__ = ["STATES", "promises_json", "record", "settle", "settle_state"]

#: The states of a promise (docs/interface.md, `tickets show --json` "promises").
STATES: tuple[str, ...] = ("pending", "kept", "broken", "withdrawn")


def record(
    session: Session,
    *,
    ticket_id: int,
    made_at: datetime,
    to: str,
    person: str,
    message_id: str,
    what: str,
    clock: str,
    due: datetime | None,
    audience: str = "customer",
) -> None:
    """Store a promise just made (in the transaction that queued its mail).

    Written by Core (gateway/store/core.py): nothing changes the row as an object in this
    transaction. The ORM's flush hook (`plan_marks`) would have marked the ticket to be
    planned again; a Core INSERT passes it by, so this does the same itself.

    What the caller just changed on the ticket (the acknowledgement's ``acknowledged``) is
    written first, as the flush before the INSERT wrote it, by `core.flush_changes`."""
    core.flush_changes(session)
    core.insert(
        session,
        Promise,
        ticket_id=ticket_id,
        made_at=made_at,
        audience=audience,
        to=to,
        person=person,
        message_id=message_id,
        what=what,
        clock=clock,
        due=due,
    )
    unplan(session, {ticket_id})


def settle_state(promise: Promise, ticket: Ticket, now: datetime) -> str | None:
    """The state a pending promise moves to at `now`, or None while it stays pending."""
    made = utc(promise.made_at)
    due = utc(promise.due)
    staff = utc(ticket.last_staff_at)
    if promise.clock == "first_response" and ticket.first_responded_at is not None:
        staff = utc(ticket.first_responded_at)
    assert made is not None
    if staff is not None and staff >= made:
        return "kept" if due is None or staff <= due else "broken"
    if ticket.status != "open":
        # Closed, merged or waiting on the customer: withdrawn if that came before its time.
        stopped = utc(ticket.closed_at) or utc(ticket.waiting_since) or now
        if due is None or stopped < due:
            return "withdrawn"
    if due is not None and now >= due:
        return "broken"
    return None


def movable(now: Any) -> tuple[ColumnElement[bool], ...]:
    """The pending promises that can move at `now` (a datetime, or a bindparam for a
    prebuilt statement): their time has come, or the ticket was answered since the promise
    or is no longer open. The rest stay pending; this runs every escalator pass, so it must
    not read every pending promise each time. `settle` and the escalator's read-only look
    before it (gateway/escalation/escalator.py) ask exactly this."""
    return (
        col(Promise.state) == "pending",
        col(Promise.ticket_id) == col(Ticket.id),
        or_(
            col(Promise.due) <= now,
            col(Ticket.status) != "open",
            col(Ticket.last_staff_at) >= col(Promise.made_at),
            col(Ticket.first_responded_at) >= col(Promise.made_at),
        ),
    )


def settle(session: Session, now: datetime, ticket_ids: set[int] | None = None) -> list[Promise]:
    """Move pending promises on (kept, broken, withdrawn); returns the changed rows."""
    query = select(Promise, Ticket).where(*movable(now))
    if ticket_ids is not None:
        query = query.where(col(Promise.ticket_id).in_(ticket_ids))
    changed: list[Promise] = []
    for promise, ticket in session.exec(query).all():
        state = settle_state(promise, ticket, now)
        if state is None:
            continue
        promise.state = state
        promise.settled_at = now
        session.add(promise)
        changed.append(promise)
    return changed


def promises_json(session: Session, ticket_id: int | None) -> list[dict[str, Any]]:
    """`tickets show --json` "promises": made_at, to, message_id, what, due, state."""
    rows = session.exec(
        select(Promise).where(Promise.ticket_id == ticket_id).order_by(col(Promise.id))
    ).all()
    return [
        {
            "made_at": isoz(utc(p.made_at)),
            "to": p.to,
            "message_id": p.message_id,
            "what": p.what,
            "due": isoz(utc(p.due)),
            "state": p.state,
        }
        for p in rows
    ]
