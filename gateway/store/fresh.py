"""What this transaction inserted and nobody else can see yet: reads that could only find
such rows are answered from memory instead of by a round trip to the database.

Why (docs/performance.md §10): a new customer's first mail ran seven reads whose answer was
already known. A customer row this transaction inserted is invisible to every other
transaction until it commits, so no other transaction can have given it a ticket, merged a
customer into it, queued mail about its tickets or filed a bundle item for it (a foreign key
to an uncommitted row waits for, or fails with, that row's transaction). Whatever exists about
it, this transaction wrote, and noted here as it wrote it. The same holds for the tickets this
transaction created.

The facts, per transaction (`Session.info`, dropped when the outermost transaction ends):

- the tickets this transaction inserted (`ticket_created`, read by `tickets_made_here`):
  a new ticket has no stored escalation moment ("to be planned"), and nothing else can plan
  it before the commit, so a promise on it needs no UPDATE to say so again
  (gateway/store/plan_marks.py);
- the customers this transaction inserted, with the tickets it created for each
  (`customer_created`, `ticket_created`, read by `tickets_of`); a customer merge forgets
  them (`forget_customers`, gateway.store.queries.merge_customers): tickets move between
  customers, and every question goes to the database again;
- the kinds of mail it queued per ticket (`queued`, read by `queued_about`);
- the customers it filed bundle items for (noted at each flush, read by `bundled_for`).

Each reader falls back to the database whenever the memory cannot answer for certain: a
customer or ticket not inserted here, or rows of the asked kind written here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from gateway.store.models import BundleItem

#: `Session.info` keys: the tickets this transaction inserted, the customers it inserted
#: (id -> their ticket ids, oldest first), the (ticket id, kind) pairs of mail it queued, the
#: customer ids it filed bundle items for.
_TICKETS = "gateway_fresh_tickets"
_NEW = "gateway_fresh_customers"
_QUEUED = "gateway_fresh_queued"
_BUNDLED = "gateway_fresh_bundled"


def customer_created(session: Session, customer_id: int) -> None:
    """`customer_id` was inserted by this transaction (gateway.store.queries.ensure_customer)."""
    _customers(session)[customer_id] = []


def _customers(session: Session) -> dict[int | None, list[int]]:
    customers: dict[int | None, list[int]] = session.info.setdefault(_NEW, {})
    return customers


def forget_customers(session: Session) -> None:
    """Forget the customers inserted so far (a merge moves tickets between customers)."""
    session.info.pop(_NEW, None)


def ticket_created(session: Session, customer_id: int | None, ticket_id: int) -> None:
    """This transaction created `ticket_id` for `customer_id` (gateway.pipeline.record)."""
    session.info.setdefault(_TICKETS, set()).add(ticket_id)
    tickets = _customers(session).get(customer_id)
    if tickets is not None:
        tickets.append(ticket_id)


def tickets_made_here(session: Session) -> set[int]:
    """The tickets this transaction inserted."""
    made: set[int] = session.info.get(_TICKETS, set())
    return made


def tickets_of(session: Session, customer_ids: Iterable[int]) -> list[int] | None:
    """Every ticket of `customer_ids`, oldest first, when this transaction inserted all of
    those customers (the tickets it created for them are all there are); None when any of
    them is older: ask the database."""
    new = _customers(session)
    out: list[int] = []
    for customer_id in customer_ids:
        tickets = new.get(customer_id)
        if tickets is None:
            return None
        out.extend(tickets)
    return sorted(out)


def is_new_customer(session: Session, customer_id: int) -> bool:
    """Whether this transaction inserted `customer_id` (and no merge has happened since)."""
    return customer_id in _customers(session)


def queued(session: Session, ticket_id: int | None, kind: str) -> None:
    """Mail of `kind` about `ticket_id` was queued by this transaction (outbound.enqueue)."""
    if ticket_id is not None:
        session.info.setdefault(_QUEUED, set()).add((ticket_id, kind))


def queued_about(session: Session, ticket_ids: Iterable[int], kind: str) -> bool:
    """Whether this transaction queued mail of `kind` about any of `ticket_ids`."""
    done: set[tuple[int, str]] = session.info.get(_QUEUED, set())
    return any((t, kind) in done for t in ticket_ids)


def bundled_for(session: Session, customer_id: int) -> bool:
    """Whether this transaction filed a bundle item for `customer_id` (pending ones are
    flushed first, as a read would)."""
    session.flush()
    return customer_id in session.info.get(_BUNDLED, set())


@event.listens_for(Session, "after_flush")
def _note_bundles(session: Session, _ctx: Any) -> None:
    for obj in session.new:
        if isinstance(obj, BundleItem) and obj.customer_id is not None:
            session.info.setdefault(_BUNDLED, set()).add(obj.customer_id)


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction: committed or rolled back
        for key in (_TICKETS, _NEW, _QUEUED, _BUNDLED):
            session.info.pop(key, None)
