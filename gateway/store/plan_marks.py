"""Keeps `Ticket.escalate_at` honest: a change to anything the escalation plan depends on
marks the ticket "to be planned" (NULL) in the same transaction.

The escalator reads only tickets whose next moment is due (an indexed column) instead of
every open ticket on every pass (docs/decisions.md D16.4). That is only right if every write
that can move a ticket's next moment also clears the stored one; doing it in one ORM hook
covers every writer (pipeline stages, staff commands, CLI, HTTP) without each having to
remember, and it commits or rolls back with the change itself.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, event, inspect, update
from sqlalchemy.orm import Session

from gateway.store import core
from gateway.store.models import Promise, Ticket

#: The ticket columns `gateway.sla.plan.fires` reads (the escalator's `_SCAN_COLUMNS`).
PLAN_COLUMNS = (
    "sla",
    "status",
    "created_at",
    "closed_at",
    "first_response_due",
    "next_response_due",
    "resolution_due",
    "first_responded_at",
    "last_customer_at",
    "last_staff_at",
    "waiting_since",
    "snoozed_until",
)


_ticket = core.table(Ticket)
#: Tickets to be planned again (prebuilt: gateway/store/core.py).
UNPLAN = (
    update(_ticket)
    .where(_ticket.c.id.in_(bindparam("ids", expanding=True)))
    .values(escalate_at=None)
)


@event.listens_for(Session, "before_flush")
def _mark_tickets(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.dirty:
        if not isinstance(obj, Ticket):
            continue
        state = inspect(obj)
        if state.attrs.escalate_at.history.has_changes():
            continue  # the escalator has just planned it from the current columns
        if any(state.attrs[name].history.has_changes() for name in PLAN_COLUMNS):
            obj.escalate_at = None


@event.listens_for(Session, "after_flush")
def _mark_promises(session: Session, _ctx: Any) -> None:
    # A customer promise adds a notice to the plan when it is broken.
    ids = {
        obj.ticket_id
        for obj in [*session.new, *session.dirty]
        if isinstance(obj, Promise) and obj.ticket_id is not None
    }
    if ids:
        session.connection().execute(UNPLAN, {"ids": sorted(ids)})
