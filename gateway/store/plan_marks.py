"""Keeps `Ticket.escalate_at` honest: a change to anything the escalation plan depends on
marks the ticket "to be planned" (NULL) in the same transaction.

The escalator reads only tickets whose next moment is due (an indexed column) instead of
every open ticket on every pass (docs/decisions.md D16.4). That is only right if every write
that can move a ticket's next moment also clears the stored one; doing it in one ORM hook
covers every writer (pipeline stages, staff commands, CLI, HTTP) without each having to
remember, and it commits or rolls back with the change itself.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, event, inspect, update
from sqlalchemy.orm import Session
from sqlmodel import Session as SqlModelSession

from gateway.sla.clocks import utc
from gateway.store import core, fresh
from gateway.store.models import AuthRecheck, BundleItem, Promise, Ticket

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


# Changes the hooks below react to are left to the ORM by `core.update_attached`.
core.HOOKED.setdefault(Ticket, set()).update(PLAN_COLUMNS)
core.HOOKED.setdefault(Promise, set()).update(core.table(Promise).columns.keys())


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
    ids: set[int] = set()
    for obj in session.new:
        if isinstance(obj, Promise):
            if obj.ticket_id is not None:
                ids.add(obj.ticket_id)
        elif isinstance(obj, BundleItem):
            _note(session, BUNDLE, obj.due_at)
        elif isinstance(obj, AuthRecheck):
            _note(session, RECHECK, obj.next_check_at)
    for obj in session.dirty:
        if isinstance(obj, Promise) and obj.ticket_id is not None:
            ids.add(obj.ticket_id)
    # A ticket this transaction inserted is unplanned already (`fresh.tickets_made_here`).
    ids -= fresh.tickets_made_here(session)
    if ids:
        session.connection().execute(UNPLAN, {"ids": sorted(ids)})


def unplan(session: SqlModelSession, ticket_ids: set[int]) -> None:
    """Mark `ticket_ids` to be planned again (a Core write, after what the ORM holds); those
    this transaction inserted are left out: they are unplanned already, and only this
    transaction can see them (`fresh.tickets_made_here`: one round trip per new ticket)."""
    ids = ticket_ids - fresh.tickets_made_here(session)
    if ids:
        core.write(session, UNPLAN, {"ids": sorted(ids)})


# ------------------------------------------------------------------ new due rows, for wakes
#
# The bundle worker and the sender re-check worker sleep until their next due row
# (gateway/pipeline/timed.py). They used to be woken after every pipeline batch to look
# again, two queries each, although almost no batch creates a row for them. Instead every
# transaction notes the earliest due moment of the `bundle_item` and `auth_recheck` rows it
# inserts (both are only ever inserted through the ORM: `respond`, `conversation`,
# `holds`), and once it has committed that moment joins this process's `created` record.
# The pipeline process ships the record with its "batch committed" word
# (gateway/pipeline/process.py), and the daemon wakes a worker only when a new row is due
# before the moment that worker would look anyway. Only a commit publishes (a rolled-back
# transaction's rows are gone); a moment noted more than needed costs a spurious wake at
# worst, one missed would leave a row to the workers' idle poll, so every insert is noted.

#: `take_created()` keys: the earliest new `bundle_item.due_at` / `auth_recheck.next_check_at`.
BUNDLE = "bundle"
RECHECK = "recheck"
#: `Session.info` key of the moments noted by the transaction under way.
_INFO = "gateway_created_due"

_lock = threading.Lock()
_created: dict[str, datetime] = {}


#: "Due now": the moment of a row that has none, or of one that could not be read.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def earliest(into: dict[str, datetime], kind: str, moment: datetime) -> None:
    """Keep in `into[kind]` the earlier of what is there and `moment`."""
    known = into.get(kind)
    if known is None or moment < known:
        into[kind] = moment


def _note(session: Session, kind: str, moment: datetime | None) -> None:
    # Moments compare as aware UTC (`utc`: SQLite hands back naive ones). A row without a
    # moment would be due at once (it cannot be: both columns are NOT NULL); the epoch keeps
    # "wake now" the safe reading.
    earliest(session.info.setdefault(_INFO, {}), kind, utc(moment) or EPOCH)


@event.listens_for(Session, "after_commit")
def _publish(session: Session) -> None:
    noted = session.info.pop(_INFO, None)
    if noted:
        with _lock:
            for kind, moment in noted.items():
                earliest(_created, kind, moment)


def take_created() -> dict[str, datetime]:
    """The earliest due moment, per kind (`BUNDLE`, `RECHECK`), of the rows that committed
    transactions of this process inserted since the last call; cleared by the call."""
    with _lock:
        if not _created:
            return {}
        out = dict(_created)
        _created.clear()
    return out
