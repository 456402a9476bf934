"""Each open ticket's next moment (``Ticket.escalate_at``): what the escalator's scan reads.

A pass of the escalator reads only tickets whose stored next moment is due, plus those marked
"to be planned" (NULL, set by `gateway.store.plan_marks` whenever a column the plan reads
changes), so a pass at 100,000 open tickets with nothing due is two index lookups
(docs/architecture.md). The moment itself is the first unfired entry of the ticket's plan
(`gateway.sla.plan.fires`); this module stores it, re-plans after a rules change, and finds
the earliest future one for the loop's sleep.

A rules change is recognised by identity, counted in `Planner.generation`: not `id(rules)`,
which a new rules object can reuse once the old one is freed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select
from sqlmodel import Session, col

from gateway.routing.model import Rules
from gateway.sla.clocks import utc
from gateway.sla.plan import Fire, fires
from gateway.store import core
from gateway.store.db import is_postgres, read_only, session_scope
from gateway.store.models import EscalationStep, Promise, Ticket

__all__ = [
    "FAR",
    "PLAN_CHUNK",
    "REPLAN_BUDGET",
    "SCAN_COLUMNS",
    "Key",
    "Planner",
    "Scan",
    "customer_promises",
    "key",
    "next_moment",
    "plan",
]

#: `Ticket.escalate_at` of a ticket with nothing left to fire (NULL means "to be planned").
FAR = datetime(9000, 1, 1, tzinfo=UTC)
#: Tickets planned per transaction, and seconds of re-planning per pass after a rules change.
PLAN_CHUNK = 500
REPLAN_BUDGET = 0.5

#: A fired step: (ticket id, clock, due, step), the unique key of `EscalationStep`.
Key = tuple[int, str, datetime, int]


def key(ticket_id: int, fire: Fire) -> Key:
    return (ticket_id, fire.clock, fire.due_at, fire.step)


@dataclass
class Scan:
    """The columns of a ticket the planning needs (`clocks.ClockState` plus id and policy)."""

    id: int | None
    sla: str
    status: str
    created_at: datetime
    closed_at: datetime | None
    first_response_due: datetime | None
    next_response_due: datetime | None
    resolution_due: datetime | None
    first_responded_at: datetime | None
    last_customer_at: datetime | None
    last_staff_at: datetime | None
    waiting_since: datetime | None
    snoozed_until: datetime | None


SCAN_COLUMNS: tuple[Any, ...] = (
    Ticket.id,
    Ticket.sla,
    Ticket.status,
    Ticket.created_at,
    Ticket.closed_at,
    Ticket.first_response_due,
    Ticket.next_response_due,
    Ticket.resolution_due,
    Ticket.first_responded_at,
    Ticket.last_customer_at,
    Ticket.last_staff_at,
    Ticket.waiting_since,
    Ticket.snoozed_until,
)


# The reads every pass makes, prebuilt (gateway/store/core.py): a pass with nothing due is
# these few index lookups, and an ORM select costs five times the CPU of a prebuilt Core one.
_t = core.table(Ticket)
_SCAN = tuple(_t.c[column.key] for column in SCAN_COLUMNS)
_AWAKE = or_(_t.c.snoozed_until.is_(None), _t.c.snoozed_until <= bindparam("now"))
#: Open tickets marked to be planned, oldest first: ordered by id, so both databases read the
#: partial index `ticket_to_plan` whatever their statistics say. Unordered, PostgreSQL with
#: statistics from a moment when most tickets were unplanned (after an upgrade or a bulk
#: import, or with autovacuum off) read the whole table for each chunk: 20 ms at 100,000
#: open tickets, several times a second under load (docs/decisions.md D16.12).
_TO_PLAN = (_t.c.status == "open", _t.c.escalate_at.is_(None))
#: Is any open ticket to be planned (`Planner.plan_changed`)?
_DIRTY = sa_select(_t.c.id).where(*_TO_PLAN).order_by(_t.c.id).limit(1)
#: Open, awake tickets whose next moment has come (`Planner.due`).
_DUE = sa_select(*_SCAN).where(_t.c.status == "open", _t.c.escalate_at <= bindparam("now"), _AWAKE)
#: The earliest stored moment after now of the awake tickets (`Planner.earliest_after`)...
_EARLIEST = sa_select(func.min(_t.c.escalate_at)).where(
    _t.c.status == "open",
    _t.c.escalate_at > bindparam("now"),
    _t.c.escalate_at < FAR,
    _AWAKE,
)
#: ... and the snoozed ones, whose moment is at the earliest their wake-up. Only the
#: snooze is asked of the database, status and moment are checked here: given `status =
#: 'open'` SQLite (without ANALYZE statistics) walks every open ticket by the (status,
#: escalate_at) index instead of the few snoozed ones by `ticket_snoozed` (115 ms at 100,000
#: open tickets, at every pass).
_SNOOZED = sa_select(_t.c.status, _t.c.escalate_at, _t.c.snoozed_until).where(
    _t.c.snoozed_until > bindparam("now")
)


def plan(
    ticket: Ticket | Scan, rules: Rules, promised: tuple[tuple[str, datetime], ...]
) -> list[Fire]:
    """Every fire this ticket has, fired or not, in order (`gateway.sla.plan.fires`).

    The customer notice is planned whenever the policy asks for one; whether the requester
    is a human is checked when it fires (a robot's notice is recorded as skipped).
    """
    if ticket.id is None:
        return []
    return fires(ticket, ticket.sla, rules, promised)


def next_moment(fired_plan: list[Fire], ticket_id: int, known: set[Key]) -> datetime:
    """The first moment of the plan not fired yet (FAR: nothing left to fire)."""
    nxt = next((f.moment for f in fired_plan if key(ticket_id, f) not in known), None)
    return nxt if nxt is not None else FAR


def _promise_filter(*where: Any) -> Any:
    """The customer promises a notice has not yet owned up to (each may get its own notice)."""
    return sa_select(col(Promise.ticket_id), col(Promise.clock), col(Promise.due)).where(
        *where,
        col(Promise.audience) == "customer",
        col(Promise.told) == "",
        col(Promise.due).is_not(None),
        col(Promise.state).in_(("pending", "broken")),
    )


def customer_promises(session: Session, ticket_id: int) -> tuple[tuple[str, datetime], ...]:
    """(clock, due) of the ticket's open customer promises, sorted (`plan`'s `promised`)."""
    rows = session.execute(_promise_filter(col(Promise.ticket_id) == ticket_id)).all()
    return tuple(sorted((clock, utc(due) or due) for _, clock, due in rows))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def chunk_query(after_id: int | None, *, postgres: bool) -> Select[Any]:
    """The rows `Planner._plan_chunk` plans: up to PLAN_CHUNK open tickets marked to be
    planned (NULL), or, with `after_id` (a rules change), every open ticket after that id;
    on PostgreSQL the rows are locked (others skipped: another node plans them)."""
    if after_id is None:
        query = sa_select(*_SCAN).where(*_TO_PLAN).order_by(_t.c.id).limit(PLAN_CHUNK)
    else:
        # NULL ones are the dirty planning's (no double work after a start).
        query = (
            sa_select(*_SCAN)
            .where(_t.c.status == "open", _t.c.id > after_id, _t.c.escalate_at.is_not(None))
            .order_by(_t.c.id)
            .limit(PLAN_CHUNK)
        )
    if postgres:
        query = query.with_for_update(skip_locked=True)
    return query


class Planner:
    """Stores every open ticket's next moment and finds the due ones."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The rules object in force (a strong reference, so the identity check is exact)
        # and its generation; the id of the last ticket re-planned after a rules change
        # (None: no replan under way).
        self._rules: Rules | None = None
        self.generation = 0
        self._replan_after: int | None = None
        self._dirty_left = False
        # Reads only: on SQLite a deferred BEGIN, never the write lock (gateway/store/db.py).
        self.reader = read_only(engine)

    @property
    def busy(self) -> bool:
        """Planning is under way (a replan or dirty tickets left): come back now."""
        return self._replan_after is not None or self._dirty_left

    def rules_generation(self, rules: Rules) -> int:
        """A counter bumped whenever the rules object in force changes; a change re-plans
        every open ticket, chunk by chunk."""
        if rules is not self._rules:
            self._rules = rules
            self.generation += 1
            self._replan_after = 0
        return self.generation

    # -------------------------------------------------------------------------- planning

    def _plan_moments(
        self, session: Session, rows: list[Scan], rules: Rules
    ) -> dict[int, datetime]:
        """Each ticket's earliest moment not fired yet (FAR: nothing left to fire)."""
        ids = [row.id for row in rows if row.id is not None]
        fired: set[Key] = set()
        promised: dict[int, list[tuple[str, datetime]]] = {}
        for chunk in _chunks(ids, 500):
            for tid, clock, due_at, step in session.execute(
                sa_select(
                    col(EscalationStep.ticket_id),
                    col(EscalationStep.clock),
                    col(EscalationStep.due_at),
                    col(EscalationStep.step),
                ).where(col(EscalationStep.ticket_id).in_(chunk))
            ).all():
                fired.add((tid, clock, utc(due_at) or due_at, step))
            for tid, clock, due in session.execute(
                _promise_filter(col(Promise.ticket_id).in_(chunk))
            ).all():
                promised.setdefault(tid, []).append((clock, utc(due) or due))
        out: dict[int, datetime] = {}
        for row in rows:
            assert row.id is not None
            fired_plan = plan(row, rules, tuple(sorted(promised.get(row.id, ()))))
            out[row.id] = next_moment(fired_plan, row.id, fired)
        return out

    @staticmethod
    def _store_moments(session: Session, moments: dict[int, datetime]) -> None:
        if moments:
            table: Any = Ticket.metadata.tables["ticket"]
            session.connection().execute(
                update(table)
                .where(table.c.id == bindparam("tid"))
                .values(escalate_at=bindparam("at")),
                [{"tid": tid, "at": at} for tid, at in moments.items()],
            )

    def _plan_chunk(self, rules: Rules, *, after_id: int | None = None) -> int:
        """Plan up to PLAN_CHUNK open tickets: those marked to be planned (NULL), or, with
        `after_id` (a rules change), every open ticket after that id. Read and write in one
        write transaction (rows locked on PostgreSQL), so a concurrent change is never
        overwritten by a stale moment. Returns the last id planned (0: none)."""
        query = chunk_query(after_id, postgres=is_postgres(self.engine))
        with session_scope(self.engine) as session:
            rows = [Scan(*row) for row in session.execute(query).all()]
            if not rows:
                return 0
            self._store_moments(session, self._plan_moments(session, rows, rules))
        return max(row.id or 0 for row in rows)

    def _has_dirty(self) -> bool:
        with self.reader.connect() as conn:
            return conn.execute(_DIRTY).first() is not None

    def plan_changed(self, rules: Rules) -> None:
        """Plan the tickets whose plan changed (new tickets, replies, snoozes, promises),
        at most REPLAN_BUDGET seconds per pass (`busy` then says to come back now): after
        an upgrade every open ticket is to be planned, and due steps go first."""
        started = time.monotonic()
        self._dirty_left = False
        while self._has_dirty():
            if time.monotonic() - started >= REPLAN_BUDGET:
                self._dirty_left = True
                return
            if not self._plan_chunk(rules):
                return  # the rest is locked by another node, which plans it

    def replan(self, rules: Rules) -> None:
        """After a start or a rules change every open ticket is planned again, at most
        REPLAN_BUDGET seconds per pass, so due steps never wait behind the whole replan."""
        if self._replan_after is None:
            return
        started = time.monotonic()
        while time.monotonic() - started < REPLAN_BUDGET:
            last = self._plan_chunk(rules, after_id=self._replan_after)
            if not last:
                self._replan_after = None
                return
            self._replan_after = last

    # -------------------------------------------------------------------------- reading

    def due(self, now: datetime) -> list[Scan]:
        """Open, awake tickets whose next moment has come (the indexed part of the scan)."""
        with self.reader.connect() as conn:
            return [Scan(*row) for row in conn.execute(_DUE, {"now": now}).all()]

    def earliest_after(self, now: datetime) -> datetime | None:
        """The earliest stored moment after `now` (None: nothing scheduled); two index
        lookups, plus the snoozed tickets (few) whose moment is their wake-up."""
        with self.reader.connect() as conn:
            best = utc(conn.execute(_EARLIEST, {"now": now}).scalar())
            for status, at, snoozed in conn.execute(_SNOOZED, {"now": now}).all():
                if status != "open" or at is None or (utc(at) or at) >= FAR:
                    continue
                moment = max(utc(at) or at, utc(snoozed) or snoozed)
                if best is None or moment < best:
                    best = moment
        return best
