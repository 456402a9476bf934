"""The escalator: when an SLA clock runs out, a named human is told and, step by step, takes
over; the customer is told honestly that the promise slipped (docs/design.md §0, docs/design.md §7).

What fires, for each open, non-snoozed ticket and each running clock (`clocks.active_deadlines`):

- a **warning** to the owner when `warn_at` of the clock's budget is used (step -1);
- the **breach** itself at the deadline (step -2, event 'breach');
- each **ladder step** at `breach + after`, `after` counted in business time of the policy's
  calendar (`deadlines.escalation_schedule`, docs/rules.md "Escalation ladder"; an
  `after = "0m"` step fires at the breach even at closing time). "owner", "backup" and
  "manager" are resolved against the ticket's owner *at the moment the step fires*, so after
  `assign = "backup"` a later `assign = "manager"` names the backup's manager;
- the **customer notice** (step -3): once per breach and once per broken promise that an
  earlier notice made (keyed by the promise's own time, so the rate limit is per promise, not
  per ticket per day), after any ladder step of the same moment (so it names who acts now),
  only to a human requester; notices due within `MERGE_WINDOW` of each other go as one mail.

What each step does and what each notice says come from one plan (`gateway.sla.plan`, walking
`gateway.sla.duty`): the person a notice names is the person the ladder step acts with, and
no person is sent two mails for one breach.

Exactly once, across restarts and several nodes: every fire first inserts its
`EscalationStep` row (UNIQUE ticket, clock, due_at, step) inside a SAVEPOINT; an
IntegrityError means someone already fired it, and nothing else happens. On PostgreSQL the
ticket row is claimed with `SELECT ... FOR UPDATE SKIP LOCKED`, so two nodes never work on one
ticket at once; on SQLite `BEGIN IMMEDIATE` serialises writers anyway. After downtime every
step whose moment has passed fires once, in order (catch-up).

Notify people in their own working hours, and always a named human (docs/design.md §7; Zammad
notifies nobody when a ticket has no owner): a target off duty (outside their calendar or
away) is skipped for the next on-duty person in owner -> backup -> manager -> the policy's
on-call people -> `rules.defaults.owner`; with nobody on duty, the one on duty soonest stays
accountable (`gateway.sla.duty.walk_chain`); who was skipped and why goes into the event.

The escalator never escalates an agent who already answered (zammad#3140): it re-reads the
ticket under the lock and only fires for clocks `active_deadlines` still reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from gateway.clock import Clock
from gateway.outbound.compose import compose_notification, format_local
from gateway.outbound.handover import compose_handover
from gateway.outbound.worker import enqueue
from gateway.routing.model import Person, Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla import promises
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.clocks import active_deadlines, utc
from gateway.sla.deadlines import isoz
from gateway.sla.duty import resolve
from gateway.sla.notice import Broken, notice_text, queue_customer_mail
from gateway.sla.plan import (
    BREACH_STEP,
    MERGE_WINDOW,
    NOTICE_STEP,
    WARNING_STEP,
    Commitment,
    Fire,
    TicketPlan,
    fires,
    plan_ticket,
)
from gateway.store.db import is_postgres, read_scope, session_scope
from gateway.store.models import EscalationStep, Message, Promise, Ticket
from gateway.store.queries import add_event, last_customer_message

__all__ = [
    "BREACH_STEP",
    "MAX_SLEEP",
    "MERGE_WINDOW",
    "NOTICE_STEP",
    "WARNING_STEP",
    "Escalator",
    "Fire",
]

log = logging.getLogger("gateway.sla")

#: `run()` wakes at least this often, so rules edits and new tickets are seen.
MAX_SLEEP = 60.0

#: `Ticket.escalate_at` of a ticket with nothing left to fire (NULL means "to be planned").
FAR = datetime(9000, 1, 1, tzinfo=UTC)
#: Tickets planned per transaction, and seconds of re-planning per pass after a rules change.
PLAN_CHUNK = 500
REPLAN_BUDGET = 0.5


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


_CLOCK_NAMES = {
    "first_response": "first response",
    "next_response": "next response",
    "resolution": "resolution",
}


@dataclass
class _Scan:
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


_SCAN_COLUMNS: tuple[Any, ...] = (
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

_FIRED_COLUMNS: tuple[Any, ...] = (
    EscalationStep.clock,
    EscalationStep.due_at,
    EscalationStep.step,
    EscalationStep.person,
    EscalationStep.action,
)

#: A fired step: (ticket id, clock, due, step).
Key = tuple[int, str, datetime, int]


@dataclass
class _Batch:
    """What one `_process` run of a ticket has done so far: who was mailed for which breach,
    who acts for each clock, and the customer notices to send as one mail at the end."""

    told: dict[tuple[str, datetime], set[str]]  # (clock, due) -> person ids mailed
    acting: dict[str, str]  # clock -> person id acting since its latest ladder step
    notices: list[tuple[Fire, EscalationStep]]
    mailed: set[str]


# ------------------------------------------------------------------------------ the escalator


class Escalator:
    """Fires warnings, breaches, ladder steps and customer notices that are due."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Clock,
        rules_provider: Callable[[], Rules],
        signer: Signer,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.rules_provider = rules_provider
        self.signer = signer
        # Keys known to be fired (rows are never deleted, so this only saves queries).
        self._fired: set[Key] = set()
        # The rules object in force and its generation (see _rules_generation); the id of
        # the last ticket re-planned after a rules change (None: no replan under way).
        self._rules: Rules | None = None
        self.generation = 0
        self._replan_after: int | None = None
        self._dirty_left = False
        #: Tickets the last pass read as due (tests: a ticket not due is not read).
        self.last_scanned = 0
        self._last_message: dict[int | None, Message | None] = {}
        self._human: dict[int, bool] = {}
        self.fired_total = 0
        #: How long `run()` last decided to sleep (seconds), for tests and metrics.
        self.last_delay: float | None = None

    # -------------------------------------------------------------------------- planning

    def _fired_state(
        self, session: Session, ticket_id: int
    ) -> tuple[set[Key], dict[tuple[str, datetime], list[tuple[int, str, str]]]]:
        """The ticket's fired step keys and, per breach, (step, person, action) of its rows
        (one query; the database is the authority, the in-memory sets only save work)."""
        rows = session.execute(
            sa_select(*_FIRED_COLUMNS).where(col(EscalationStep.ticket_id) == ticket_id)
        ).all()
        keys: set[Key] = set()
        by_breach: dict[tuple[str, datetime], list[tuple[int, str, str]]] = {}
        for clock, due_at, step, person, action in rows:
            due = utc(due_at) or due_at
            keys.add((ticket_id, clock, due, step))
            by_breach.setdefault((clock, due), []).append((step, person, action))
        self._fired |= keys
        return keys, by_breach

    def _requester_is_human(self, session: Session, ticket_id: int) -> bool:
        """True when the ticket's first inbound message is from a human (`Message.robot` is
        empty). That message never changes, so the answer is remembered."""
        known = self._human.get(ticket_id)
        if known is not None:
            return known
        robot = session.exec(
            select(Message.robot)
            .where(Message.ticket_id == ticket_id, Message.direction == "in")
            .order_by(col(Message.at), col(Message.id))
        ).first()
        if robot is None:
            return False  # no inbound message yet: decide later, when one is recorded
        self._human[ticket_id] = robot == ""
        return robot == ""

    # The scan (issue 16 finding 4): a pass reads only tickets whose stored next moment
    # (`Ticket.escalate_at`, indexed with status) is due, plus those marked "to be planned"
    # (NULL, set by `gateway.store.plan_marks` whenever a column the plan reads changes). A
    # pass at 100,000 open tickets with nothing due is two index lookups.

    def _plan_moments(
        self, session: Session, rows: list[_Scan], rules: Rules
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
                sa_select(col(Promise.ticket_id), col(Promise.clock), col(Promise.due)).where(
                    col(Promise.ticket_id).in_(chunk),
                    col(Promise.audience) == "customer",
                    col(Promise.told) == "",
                    col(Promise.due).is_not(None),
                    col(Promise.state).in_(("pending", "broken")),
                )
            ).all():
                promised.setdefault(tid, []).append((clock, utc(due) or due))
        out: dict[int, datetime] = {}
        for row in rows:
            assert row.id is not None
            plan = self._plan(row, rules, tuple(sorted(promised.get(row.id, ()))))
            nxt = next((f.moment for f in plan if self._key(row.id, f) not in fired), None)
            out[row.id] = nxt if nxt is not None else FAR
        return out

    def _store_moments(self, session: Session, moments: dict[int, datetime]) -> None:
        if moments:
            table: Any = Ticket.metadata.tables["ticket"]
            session.connection().execute(
                update(table)
                .where(table.c.id == bindparam("tid"))
                .values(escalate_at=bindparam("at")),
                [{"tid": tid, "at": at} for tid, at in moments.items()],
            )

    def _plan_dirty(self, rules: Rules, *, after_id: int | None = None) -> int:
        """Plan up to PLAN_CHUNK open tickets: those marked to be planned (NULL), or, with
        `after_id` (a rules change), every open ticket after that id. Read and write in one
        write transaction (rows locked on PostgreSQL), so a concurrent change is never
        overwritten by a stale moment. Returns the last id planned (0: none)."""
        query = sa_select(*_SCAN_COLUMNS).where(col(Ticket.status) == "open")
        if after_id is None:
            # No ORDER BY: walking the primary key in order to find the few NULL rows (the
            # newest tickets, at the end) is what PostgreSQL would pick for a LIMIT; the
            # (status, escalate_at) index finds them directly.
            query = query.where(col(Ticket.escalate_at).is_(None)).limit(PLAN_CHUNK)
        else:
            # NULL ones are the dirty planning's (no double work after a start).
            query = (
                query.where(col(Ticket.id) > after_id, col(Ticket.escalate_at).is_not(None))
                .order_by(col(Ticket.id))
                .limit(PLAN_CHUNK)
            )
        if is_postgres(self.engine):
            query = query.with_for_update(skip_locked=True)
        with session_scope(self.engine) as session:
            rows = [_Scan(*row) for row in session.execute(query).all()]
            if not rows:
                return 0
            self._store_moments(session, self._plan_moments(session, rows, rules))
        return max(row.id or 0 for row in rows)

    def _has_dirty(self) -> bool:
        with read_scope(self.engine) as session:
            return (
                session.execute(
                    sa_select(col(Ticket.id))
                    .where(col(Ticket.status) == "open", col(Ticket.escalate_at).is_(None))
                    .limit(1)
                ).first()
                is not None
            )

    def _plan(
        self, ticket: Ticket | _Scan, rules: Rules, promised: tuple[tuple[str, datetime], ...]
    ) -> list[Fire]:
        """Every fire this ticket has, fired or not, in order (`gateway.sla.plan.fires`).

        The customer notice is planned whenever the policy asks for one; whether the requester
        is a human is checked when it fires (a robot's notice is recorded as skipped).
        """
        if ticket.id is None:
            return []
        return fires(ticket, ticket.sla, rules, promised)

    def _rules_generation(self, rules: Rules) -> int:
        """A counter bumped whenever the rules object in force changes. Not `id(rules)`: a
        new rules object can reuse a freed one's id; the strong reference kept here makes
        the identity check exact."""
        if rules is not self._rules:
            self._rules = rules
            self.generation += 1
            self._replan_after = 0  # every open ticket is planned again, chunk by chunk
        return self.generation

    # -------------------------------------------------------------------------- run_once

    def run_once(self) -> int:
        """Fire everything due at `clock.now()`, then settle promises; returns how many
        steps fired."""
        now = self.clock.now()
        rules = self.rules_provider()
        self._rules_generation(rules)
        self._fired = set()  # only saves queries within a pass; memory stays flat
        if len(self._human) > 10_000:
            self._human = {}
        self.last_scanned = 0
        self._plan_changed(rules)
        due_rows = self._due(now)
        fired = 0
        for row in due_rows:
            assert row.id is not None
            try:
                fired += self._process(row.id, now, rules)
            except Exception:  # one broken ticket must not stop the others
                log.exception("escalation of ticket %s failed; will retry", row.id)
        self._replan(rules)
        try:
            with session_scope(self.engine) as session:
                promises.settle(session, now)
        except Exception:
            log.exception("settling promises failed; will retry")
        self.fired_total += fired
        return fired

    def _plan_changed(self, rules: Rules) -> None:
        """Plan the tickets whose plan changed (new tickets, replies, snoozes, promises),
        at most REPLAN_BUDGET seconds per pass (`_dirty_left` then says to come back now):
        after an upgrade every open ticket is to be planned, and due steps go first."""
        started = time.monotonic()
        self._dirty_left = False
        while self._has_dirty():
            if time.monotonic() - started >= REPLAN_BUDGET:
                self._dirty_left = True
                return
            if not self._plan_dirty(rules):
                return  # the rest is locked by another node, which plans it

    def _replan(self, rules: Rules) -> None:
        """After a start or a rules change every open ticket is planned again, at most
        REPLAN_BUDGET seconds per pass, so due steps never wait behind the whole replan."""
        if self._replan_after is None:
            return
        started = time.monotonic()
        while time.monotonic() - started < REPLAN_BUDGET:
            last = self._plan_dirty(rules, after_id=self._replan_after)
            if not last:
                self._replan_after = None
                return
            self._replan_after = last

    def _due(self, now: datetime) -> list[_Scan]:
        """Open, awake tickets whose next moment has come (the indexed part of the scan)."""
        query = sa_select(*_SCAN_COLUMNS).where(
            col(Ticket.status) == "open",
            col(Ticket.escalate_at) <= now,
            or_(col(Ticket.snoozed_until).is_(None), col(Ticket.snoozed_until) <= now),
        )
        with read_scope(self.engine) as session:
            rows = [_Scan(*row) for row in session.execute(query).all()]
        self.last_scanned = len(rows)
        return rows

    @staticmethod
    def _key(ticket_id: int, fire: Fire) -> Key:
        return (ticket_id, fire.clock, fire.due_at, fire.step)

    def _process(self, ticket_id: int, now: datetime, rules: Rules) -> int:
        fired = 0
        self._last_message = {}
        # Keys claimed in this transaction: remembered only once it has committed (a rollback
        # must leave them to be fired again).
        claimed: set[Key] = set()
        with session_scope(self.engine) as session:
            query = select(Ticket).where(Ticket.id == ticket_id)
            if is_postgres(self.engine):
                query = query.with_for_update(skip_locked=True)
            ticket = session.exec(query).first()
            if ticket is None:
                return 0  # another node holds it (SKIP LOCKED) or it is gone
            snoozed = utc(ticket.snoozed_until)
            if ticket.status != "open" or (snoozed is not None and snoozed > now):
                return 0  # re-checked under the lock: answered, closed or snoozed meanwhile
            known, by_breach = self._fired_state(session, ticket_id)
            human = self._requester_is_human(session, ticket_id)
            promised = self._customer_promises(session, ticket_id)
            plan = self._plan(ticket, rules, promised)
            batch = _Batch(told={}, acting={}, notices=[], mailed=set())
            running = active_deadlines(ticket)
            for (clock, deadline), steps in by_breach.items():
                batch.told[(clock, deadline)] = {p for step, p, _ in steps if p and step >= -1}
                ladder = [(step, p) for step, p, _ in steps if step >= 0 and p]
                if ladder and (clock, deadline) in running:
                    batch.acting[clock] = max(ladder)[1]
            due = [f for f in plan if f.moment <= now and self._key(ticket_id, f) not in known]
            if any(f.step == NOTICE_STEP for f in due):
                # A customer never gets two notices within a minute: fold the notices due
                # within MERGE_WINDOW into this one (their keys are claimed now).
                due += [
                    f
                    for f in plan
                    if f.step == NOTICE_STEP
                    and now < f.moment <= now + MERGE_WINDOW
                    and self._key(ticket_id, f) not in known
                ]
            # Customer notices go after every ladder step due now (catch-up included), so
            # the notice names the person the ladder has just put in charge.
            due.sort(key=lambda f: (f.step == NOTICE_STEP, f))
            for fire in due:
                key = self._key(ticket_id, fire)
                if fire.step == NOTICE_STEP and not human:
                    # Never to robots: the breach is recorded, the notice is not sent.
                    row = self._claim(session, ticket, fire, now, "customer-notice-skipped")
                    if row is not None:
                        add_event(
                            session,
                            ticket_id,
                            "customer-notice",
                            f"not sent for the {_CLOCK_NAMES[fire.clock]} breach: the"
                            " requester is not a human sender (robot mail opened the ticket)",
                            now,
                            data={"clock": fire.clock, "due_at": isoz(fire.due_at)},
                        )
                    known.add(key)
                    claimed.add(key)
                    continue
                if fire.step == WARNING_STEP and now >= fire.due_at:
                    # Catching up past the deadline itself: a "due soon" warning would be
                    # noise next to the breach; mark it done without mail.
                    self._claim(session, ticket, fire, now, "warning-skipped")
                    known.add(key)
                    claimed.add(key)
                    continue
                row = self._claim(session, ticket, fire, now)
                known.add(key)
                claimed.add(key)
                if row is None:
                    continue
                fired += 1
                if fire.step == NOTICE_STEP:
                    batch.notices.append((fire, row))
                    continue
                self._act(session, ticket, row, fire, now, rules, known, batch)
            if batch.notices:
                self._customer_notice(session, ticket, now, rules, known, batch)
            ticket.updated_at = now
            # Its next moment, from the columns and promises as they are now (a notice may
            # have made a new promise; a step may have moved a deadline).
            session.flush()
            after = self._plan(ticket, rules, self._customer_promises(session, ticket_id))
            nxt = next((f.moment for f in after if self._key(ticket_id, f) not in known), None)
            ticket.escalate_at = nxt if nxt is not None else FAR
            session.add(ticket)
        self._fired |= claimed
        return fired

    def _customer_promises(
        self, session: Session, ticket_id: int
    ) -> tuple[tuple[str, datetime], ...]:
        rows = session.execute(
            sa_select(col(Promise.clock), col(Promise.due)).where(
                col(Promise.ticket_id) == ticket_id,
                col(Promise.audience) == "customer",
                col(Promise.told) == "",
                col(Promise.due).is_not(None),
                col(Promise.state).in_(("pending", "broken")),
            )
        ).all()
        return tuple(sorted((clock, utc(due) or due) for clock, due in rows))

    def _claim(
        self, session: Session, ticket: Ticket, fire: Fire, now: datetime, action: str = ""
    ) -> EscalationStep | None:
        """Insert the step's row; None when it was already fired (by us or another node)."""
        assert ticket.id is not None
        names = {WARNING_STEP: "warning", BREACH_STEP: "breach", NOTICE_STEP: "customer-notice"}
        row = EscalationStep(
            ticket_id=ticket.id,
            clock=fire.clock,
            due_at=fire.due_at,
            step=fire.step,
            person="",
            action=action or names.get(fire.step, "step"),
            fired_at=now,
        )
        if session.get_bind().dialect.name == "postgresql":
            # An upsert, not insert-and-catch: another node's fire of the same step is
            # expected, not an error in the database log (issue 13 finding 5).
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            values = row.model_dump(exclude={"id"})
            stmt = (
                pg_insert(EscalationStep)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["ticket_id", "clock", "due_at", "step"])
                .returning(EscalationStep.id)  # type: ignore[call-overload]
            )
            new_id = session.execute(stmt).scalar()
            return session.get(EscalationStep, new_id) if new_id is not None else None
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            return None
        return row

    def _plan_now(self, ticket: Ticket, rules: Rules, now: datetime, known: set[Key]) -> TicketPlan:
        """The plan of this ticket at `now`, with every step fired so far taken as done."""
        assert ticket.id is not None
        fired = [(c, d, s) for (t, c, d, s) in known if t == ticket.id and s >= 0]
        return plan_ticket(ticket, ticket.owner, ticket.sla, rules, now, fired)

    # -------------------------------------------------------------------------- actions

    def _act(
        self,
        session: Session,
        ticket: Ticket,
        row: EscalationStep,
        fire: Fire,
        now: datetime,
        rules: Rules,
        known: set[Key],
        batch: _Batch,
    ) -> None:
        policy = rules.policy(ticket.sla)
        calendar = rules.calendar_for_policy(ticket.sla)
        clock_name = _CLOCK_NAMES[fire.clock]
        promised = f"{format_local(fire.due_at, calendar)} ({isoz(fire.due_at)})"
        if fire.step == BREACH_STEP:
            add_event(
                session,
                ticket.id,
                "breach",
                f"{clock_name} deadline missed: it was due {promised}",
                now,
                data={"clock": fire.clock, "due_at": isoz(fire.due_at)},
            )
            return
        owner, why_owner = self._owner(ticket, rules)
        told = batch.told.setdefault((fire.clock, fire.due_at), set())
        if fire.step == WARNING_STEP:
            found = resolve(rules, policy, "owner", owner, now)
            person, skipped = found.person, list(found.skipped)
            row.person, row.action = person.id, "warning"
            body = self._staff_body(
                session,
                ticket,
                calendar,
                f"The {clock_name} deadline of {ticket.ref} is near: due {promised}.",
                fire,
                [*why_owner, *skipped],
            )
            self._notify(
                session,
                ticket,
                person,
                f"[{ticket.ref}] {clock_name} due soon",
                body,
                now,
                "notification",
            )
            batch.mailed.add(person.id)
            told.add(person.id)
            add_event(
                session,
                ticket.id,
                "sla-warning",
                f"{clock_name} due {promised}: warned {person.name}"
                + (f" ({'; '.join([*why_owner, *skipped])})" if why_owner or skipped else ""),
                now,
                data={"clock": fire.clock, "due_at": isoz(fire.due_at), "person": person.id},
            )
            return
        ladder = policy.escalation
        if fire.step >= len(ladder):
            return  # the rules changed and the ladder got shorter
        step = ladder[fire.step]
        # The plan with this step still to do: what it does is what it said it would do.
        planned = self._plan_now(ticket, rules, now, known - {self._key(ticket.id or 0, fire)})
        this = planned.step(fire.clock, fire.due_at, fire.step)
        assert this is not None
        after = self._plan_now(ticket, rules, now, known)
        done: list[str] = []
        notes: list[str] = list(why_owner)
        of = f"(escalation step {fire.step + 1} of {len(ladder)})"
        if this.assign is not None:
            person = this.assign.person
            notes += this.assign.skipped
            previous = ticket.owner
            if person.id != ticket.owner:
                ticket.owner = person.id
                add_event(
                    session,
                    ticket.id,
                    "assigned",
                    f"{ticket.ref} assigned to {person.name} by escalation ({clock_name} missed;"
                    f" ladder step {fire.step + 1}: assign {step.assign});"
                    f" was {previous or 'nobody'}",
                    now,
                    data={"from": previous, "to": person.id, "skipped": list(this.assign.skipped)},
                )
                done.append(f"assigned to {person.name} ({step.assign})")
                commitment = after.commitment(fire.clock, fire.due_at, person)
                self._tell_new_holder(
                    session,
                    ticket,
                    person,
                    rules.people.get(previous) if previous else None,
                    calendar,
                    fire,
                    notes,
                    now,
                    of,
                    commitment,
                    rules,
                )
                told.add(person.id)
                batch.mailed.add(person.id)
            else:
                done.append(f"{person.name} already holds it ({step.assign})")
            row.person, row.action = person.id, f"assign:{step.assign}"
        if this.notify is not None:
            person = this.notify.person
            notes += this.notify.skipped
            if person.id in told:
                # One mail per person per breach: they already have this one.
                done.append(f"{person.name} already told ({step.notify})")
            else:
                body = self._staff_body(
                    session,
                    ticket,
                    calendar,
                    f"{ticket.ref} missed its {_CLOCK_NAMES[fire.clock]} deadline"
                    f" ({format_local(fire.due_at, calendar)}) {of}.",
                    fire,
                    notes,
                )
                self._notify(
                    session,
                    ticket,
                    person,
                    f"[{ticket.ref}] escalation: {clock_name} missed",
                    body,
                    now,
                )
                told.add(person.id)
                batch.mailed.add(person.id)
                done.append(f"notified {person.name} ({step.notify})")
            if this.assign is None:
                row.person, row.action = person.id, f"notify:{step.notify}"
        batch.acting[fire.clock] = this.acting.id
        session.add(row)
        add_event(
            session,
            ticket.id,
            "escalated",
            f"{clock_name} due {promised} missed; step {fire.step + 1} of {len(ladder)}: "
            + ", ".join(done)
            + (f" ({'; '.join(notes)})" if notes else ""),
            now,
            data={
                "clock": fire.clock,
                "due_at": isoz(fire.due_at),
                "step": fire.step,
                "person": row.person,
                "skipped": notes,
            },
        )

    def _tell_new_holder(
        self,
        session: Session,
        ticket: Ticket,
        person: Person,
        previous: Person | None,
        calendar: BusinessCalendar,
        fire: Fire,
        notes: list[str],
        now: datetime,
        of: str,
        commitment: Commitment,
        rules: Rules,
    ) -> None:
        """The one place an assign step tells the person who now holds the ticket: the
        handover pack (the whole history; the previous holder is told who has it now). A
        time stated to them is recorded as a promise."""
        assert ticket.id is not None
        headline = (
            f"{ticket.ref} missed its {_CLOCK_NAMES[fire.clock]} deadline"
            f" ({format_local(fire.due_at, calendar)}) and is now yours {of}."
        )
        if commitment.by is not None:
            headline += (
                f" Please answer the customer by {format_local(commitment.by, calendar)}"
                + (f"; after that it goes to {commitment.then.name}." if commitment.then else ".")
            )
        clock_name = _CLOCK_NAMES[fire.clock]
        rows = compose_handover(
            session,
            ticket,
            person,
            previous,
            headline,
            rules=rules,
            settings=self.settings,
            signer=self.signer,
            now=now,
            subject=f"[{ticket.ref}] escalated to you: {clock_name} missed",
            notes=notes,
            kind="escalation",
            told=f"{ticket.ref} missed its {clock_name} deadline"
            f" ({format_local(fire.due_at, calendar)}); escalation {of[1:-1]} gave it to"
            f" {person.name}.",
        )
        message_id = rows[0].message_id if rows else ""
        if commitment.by is not None:
            promises.record(
                session,
                ticket_id=ticket.id,
                made_at=now,
                to=person.email,
                person=person.id,
                message_id=message_id,
                what=f"{person.name} answers {ticket.ref} by {isoz(commitment.by)}",
                clock=fire.clock,
                due=commitment.by,
                audience="staff",
            )

    # -------------------------------------------------------------------------- people

    def _owner(self, ticket: Ticket, rules: Rules) -> tuple[Person, list[str]]:
        """The ticket's owner, or the default owner when it has none (docs/design.md §7:
        always a named human, where Zammad would notify nobody)."""
        person = rules.people.get(ticket.owner) if ticket.owner else None
        if person is not None:
            return person, []
        fallback = rules.person(rules.defaults.owner)
        why = f"owner {ticket.owner!r} unknown" if ticket.owner else "no owner"
        return fallback, [f"{why}: default owner {fallback.name} used"]

    # -------------------------------------------------------------------------- mail

    def _last_customer_message(self, session: Session, ticket_id: int | None) -> Message | None:
        """The customer's last inbound message (memoised for the ticket being processed)."""
        if ticket_id in self._last_message:
            return self._last_message[ticket_id]
        found = last_customer_message(session, ticket_id) if ticket_id is not None else None
        self._last_message = {ticket_id: found}
        return found

    def _staff_body(
        self,
        session: Session,
        ticket: Ticket,
        calendar: BusinessCalendar,
        headline: str,
        fire: Fire,
        notes: list[str],
    ) -> str:
        rules = self.rules_provider()
        owner = rules.people.get(ticket.owner)
        owner_text = f"{owner.name} <{owner.email}>" if owner else (ticket.owner or "nobody")
        lines = [
            headline,
            "",
            f"Ticket:     {ticket.ref}",
            f"Subject:    {ticket.subject}",
            f"Requester:  {ticket.requester}",
            f"Owner:      {owner_text}",
            f"Clock:      {_CLOCK_NAMES[fire.clock]}",
            f"Deadline:   {format_local(fire.due_at, calendar)} ({isoz(fire.due_at)})",
            f"Hours:      {calendar.describe_hours()}",
        ]
        lines += [f"Note:       {n}" for n in notes]
        last = self._last_customer_message(session, ticket.id)
        if last is not None:
            lines += [
                "",
                f"The customer's last message ({isoz(utc(last.at))}, from {last.from_address}):",
                "-" * 72,
                last.text.rstrip() or "(no text)",
                "-" * 72,
            ]
        lines += ["", f"Reply to this email to answer: your reply goes into ticket {ticket.ref}."]
        return "\n".join(lines) + "\n"

    def _notify(
        self,
        session: Session,
        ticket: Ticket,
        person: Person,
        subject: str,
        body: str,
        now: datetime,
        kind: str = "escalation",
    ) -> str:
        """Queue a staff mail to `person`; returns its Message-ID."""
        out = self.settings.outbound
        token_person: str | None = person.id
        try:
            self.signer.reply_token(ticket.id or 0, person.id)
        except ValueError:
            token_person = None  # a person id that is no valid token slug: plain ticket token
        raw, message_id = compose_notification(
            to_address=person.email,
            to_name=person.name,
            subject=subject,
            body=body,
            from_address=out.from_address,
            from_name=out.from_name,
            signer=self.signer,
            hostname=self.settings.smtp.hostname,
            now=now,
            ticket_id=ticket.id,
            person=token_person,
        )
        enqueue(
            session,
            ticket_id=ticket.id,
            kind=kind,
            raw=raw,
            message_id=message_id,
            rcpt_tos=[person.email],
            now=now,
            from_address=out.from_address,
            subject=subject,
            text=body,
        )
        return message_id

    def _customer_notice(
        self,
        session: Session,
        ticket: Ticket,
        now: datetime,
        rules: Rules,
        known: set[Key],
        batch: _Batch,
    ) -> None:
        """One mail for every customer notice of this run: each broken promise owned up to,
        then the next real commitment from the plan (who acts now, by when, who next), or,
        with the ladder exhausted, who stays responsible and no invented time."""
        assert ticket.id is not None
        calendar = rules.calendar_for_policy(ticket.sla)
        running = dict(active_deadlines(ticket))
        broken: list[Broken] = []
        covered: list[Promise] = []
        for fire, _ in batch.notices:
            rows = session.exec(
                select(Promise).where(
                    Promise.ticket_id == ticket.id,
                    Promise.audience == "customer",
                    Promise.clock == fire.clock,
                    Promise.due == fire.due_at,
                    Promise.told == "",
                )
            ).all()
            rows = [p for p in rows if utc(p.due) == fire.due_at]
            covered += rows
            names = {rules.people[p.person].name for p in rows if p.person in rules.people}
            if fire.due_at == running.get(fire.clock) or not names:
                broken.append(Broken(fire.clock, fire.due_at))
            else:
                broken.append(Broken(fire.clock, fire.due_at, " or ".join(sorted(names))))
        # The notice speaks for the clock due first; its breach's ladder gives the next time.
        main = min((f for f, _ in batch.notices), key=lambda f: (f.due_at, f.clock))
        plan = self._plan_now(ticket, rules, now, known)
        acting_id = batch.acting.get(main.clock)
        acting = rules.people.get(acting_id) if acting_id else None
        if acting is None:
            acting = plan.acting.person
        breach_due = running.get(main.clock, main.due_at)
        commitment = plan.commitment(main.clock, breach_due, acting)
        # In the ticket's language, From its brand (issue 17; gateway.letters).
        text = notice_text(self.settings, rules, ticket, broken, commitment, calendar)
        last = self._last_customer_message(session, ticket.id)
        message_id = queue_customer_mail(
            session, self.settings, self.signer, ticket, text, now, last, rules=rules
        )
        for p in covered:
            p.told = message_id
            if p.state == "pending":
                p.state, p.settled_at = "broken", now
            session.add(p)
        promises.record(
            session,
            ticket_id=ticket.id,
            made_at=now,
            to=ticket.requester,
            person=acting.id,
            message_id=message_id,
            what=(
                f"answer from {acting.name} by {isoz(commitment.by)}"
                if commitment.by is not None
                else f"{acting.name} stays responsible (no time promised)"
            ),
            clock=main.clock,
            due=commitment.by,
        )
        if acting.id not in batch.mailed:
            # The person accountable for the broken promise hears of it too.
            body = self._staff_body(
                session,
                ticket,
                calendar,
                f"A promise to the customer on {ticket.ref} was broken; the customer has been"
                f" told that you are responsible now"
                + (
                    f" and will answer by {format_local(commitment.by, calendar)}."
                    if commitment.by is not None
                    else "."
                ),
                main,
                [],
            )
            staff_id = self._notify(
                session, ticket, acting, f"[{ticket.ref}] promise to the customer broken", body, now
            )
            batch.mailed.add(acting.id)
            if commitment.by is not None:
                # A time stated to a colleague is a promise too (recorded, shown, settled).
                promises.record(
                    session,
                    ticket_id=ticket.id,
                    made_at=now,
                    to=acting.email,
                    person=acting.id,
                    message_id=staff_id,
                    what=f"{acting.name} answers {ticket.ref} by {isoz(commitment.by)}",
                    clock=main.clock,
                    due=commitment.by,
                    audience="staff",
                )
        for _, step_row in batch.notices:
            step_row.person = acting.id
            session.add(step_row)
        add_event(
            session,
            ticket.id,
            "customer-notice",
            f"told {ticket.requester} that "
            + "; ".join(f"the {_CLOCK_NAMES[b.clock]} promise ({isoz(b.due)})" for b in broken)
            + f" was missed; {acting.name} responsible"
            + (f"; next answer by {isoz(commitment.by)}" if commitment.by else "; no time promised")
            + (f"; then {commitment.then.name}" if commitment.then else ""),
            now,
            data={
                "clock": main.clock,
                "due_at": isoz(main.due_at),
                "covers": [[b.clock, isoz(b.due)] for b in broken],
                "breach_due": isoz(breach_due),
                "person": acting.id,
                "by": isoz(commitment.by),
                "then": commitment.then.id if commitment.then else None,
                "message_id": message_id,
            },
        )

    # -------------------------------------------------------------------------- timing

    def next_due(self) -> datetime | None:
        """The earliest future moment anything fires (None: nothing is scheduled); two
        index lookups, plus the snoozed tickets (few) whose moment is their wake-up."""
        rules = self.rules_provider()
        self._rules_generation(rules)
        self._plan_changed(rules)
        self._replan(rules)
        if self._replan_after is not None or self._dirty_left:
            return self.clock.now()  # planning is under way: the next pass continues it
        now = self.clock.now()
        with read_scope(self.engine) as session:
            best = session.execute(
                sa_select(func.min(col(Ticket.escalate_at))).where(
                    col(Ticket.status) == "open",
                    col(Ticket.escalate_at) > now,
                    col(Ticket.escalate_at) < FAR,
                    or_(col(Ticket.snoozed_until).is_(None), col(Ticket.snoozed_until) <= now),
                )
            ).scalar()
            best = utc(best)
            for at, snoozed in session.execute(
                sa_select(col(Ticket.escalate_at), col(Ticket.snoozed_until)).where(
                    col(Ticket.status) == "open",
                    col(Ticket.snoozed_until) > now,
                    col(Ticket.escalate_at) < FAR,
                )
            ).all():
                moment = max(utc(at) or at, utc(snoozed) or snoozed)
                if best is None or moment < best:
                    best = moment
        return best

    async def run(
        self,
        stopping: asyncio.Event,
        wakeup: asyncio.Event,
        on_fired: Callable[[], None] | None = None,
    ) -> None:
        """Fire what is due, then sleep exactly until the next moment (at most MAX_SLEEP, so
        rules edits and new tickets are seen) or until `wakeup` is set (a new ticket, a
        reply, a rules reload). Not a coarse poll: a step due in 3 s is fired in 3 s.
        `on_fired` runs after a pass that fired steps: it wakes the delivery worker, so the
        mail leaves now and not at the worker's next poll (issue 11 finding 3)."""
        while not stopping.is_set():
            wakeup.clear()  # before the work: a wakeup during the run is not lost
            try:
                fired = await asyncio.to_thread(self.run_once)
                if fired and on_fired is not None:
                    on_fired()
                nxt = await asyncio.to_thread(self.next_due)
            except Exception:
                log.exception("escalator run failed; retrying")
                nxt = None
            delay = MAX_SLEEP
            if nxt is not None:
                delay = min(MAX_SLEEP, max(0.0, (nxt - self.clock.now()).total_seconds()))
            self.last_delay = delay
            waiters = [
                asyncio.ensure_future(stopping.wait()),
                asyncio.ensure_future(wakeup.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
