"""The escalator: when an SLA clock runs out, a named human is told and, step by step, takes
over; the customer is told honestly that the promise slipped (BRIEF point 5, FIELD-NOTES §7).

What fires, for each open, non-snoozed ticket and each running clock (`clocks.active_deadlines`):

- a **warning** to the owner when `warn_at` of the clock's budget is used (step -1);
- the **breach** itself at the deadline (step -2, event 'breach');
- each **ladder step** at `breach + after`, `after` counted in business time of the policy's
  calendar (`deadlines.escalation_schedule`, docs/rules.md "Escalation ladder"; an
  `after = "0m"` step fires at the breach even at closing time). "owner", "backup" and
  "manager" are resolved against the ticket's owner *at the moment the step fires*, so after
  `assign = "backup"` a later `assign = "manager"` names the backup's manager;
- the **customer notice** (step -3): once per breach, after any ladder step of the same moment
  (so it names the new owner), only to a human requester, at most one per ticket per 24 h (a
  notice held back by that limit is sent when the 24 h are over, if the clock still runs).

Exactly once, across restarts and several nodes: every fire first inserts its
`EscalationStep` row (UNIQUE ticket, clock, due_at, step) inside a SAVEPOINT; an
IntegrityError means someone already fired it, and nothing else happens. On PostgreSQL the
ticket row is claimed with `SELECT ... FOR UPDATE SKIP LOCKED`, so two nodes never work on one
ticket at once; on SQLite `BEGIN IMMEDIATE` serialises writers anyway. After downtime every
step whose moment has passed fires once, in order (catch-up).

Notify people in their own working hours, and always a named human (FIELD-NOTES §7; Zammad
notifies nobody when a ticket has no owner): a target outside their own calendar is skipped
for the next on-duty person in the ladder owner -> backup -> manager, with
`rules.defaults.owner` as the last resort; who was skipped and why goes into the event.

The escalator never escalates an agent who already answered (zammad#3140): it re-reads the
ticket under the lock and only fires for clocks `active_deadlines` still reports.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from typing import Any

from sqlalchemy import or_
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from gateway.clock import Clock
from gateway.outbound.compose import (
    LOOP_HEADER,
    compose_notification,
    format_local,
    tagged_subject,
)
from gateway.outbound.handover import compose_handover
from gateway.outbound.worker import enqueue
from gateway.routing.model import EscalationStep as LadderStep
from gateway.routing.model import Person, Rules, SlaPolicy
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.clocks import active_deadlines, utc
from gateway.sla.deadlines import escalation_schedule, isoz
from gateway.store.db import is_postgres, session_scope
from gateway.store.models import EscalationStep, Message, Ticket
from gateway.store.queries import add_event, last_customer_message

__all__ = [
    "BREACH_STEP",
    "MAX_SLEEP",
    "NOTICE_INTERVAL",
    "NOTICE_STEP",
    "WARNING_STEP",
    "Escalator",
    "Fire",
]

log = logging.getLogger("gateway.sla")

#: `EscalationStep.step` of the warning before a breach (models.py: -1 = warning).
WARNING_STEP = -1
#: `EscalationStep.step` of the breach itself (event 'breach').
BREACH_STEP = -2
#: `EscalationStep.step` of the customer notice for a breach.
NOTICE_STEP = -3
#: At most one customer notice per ticket in this window.
NOTICE_INTERVAL = timedelta(hours=24)
#: `run()` wakes at least this often, so rules edits and new tickets are seen.
MAX_SLEEP = 60.0

_CLOCK_NAMES = {
    "first_response": "first response",
    "next_response": "next response",
    "resolution": "resolution",
}
# Order of fires that fall on the same moment: warning, breach, ladder, customer notice last.
_RANK = {WARNING_STEP: 0, BREACH_STEP: 1, NOTICE_STEP: 3}


@dataclass(frozen=True, order=True)
class Fire:
    """One thing due: `step` of the breach of `clock` (due at `due_at`) at `moment`."""

    moment: datetime
    rank: int
    step: int
    clock: str
    due_at: datetime


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
    EscalationStep.action,
    EscalationStep.fired_at,
)


# ------------------------------------------------------------------------------ time helpers


@functools.lru_cache(maxsize=65536)
def _schedule(
    policy: SlaPolicy, calendar: BusinessCalendar, due: datetime
) -> tuple[tuple[datetime, LadderStep], ...]:
    """`escalation_schedule`, cached: every run asks again for the same breaches."""
    return escalation_schedule(policy, calendar, due)


@functools.lru_cache(maxsize=65536)
def _business_before(calendar: BusinessCalendar, due: datetime, amount: timedelta) -> datetime:
    """The latest instant `w` with `amount` of business time between `w` and `due`."""
    if amount <= timedelta(0):
        return due
    low, gap = due - amount, amount
    for _ in range(64):  # widen until enough business time lies in [low, due]
        if calendar.elapsed(low, due) >= amount:
            break
        gap *= 2
        low = due - gap
    high = due
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if calendar.elapsed(middle, due) >= amount:
            low = middle
        else:
            high = middle
    return low.replace(microsecond=0)


def _budget(policy: SlaPolicy, clock: str) -> timedelta | None:
    if clock == "first_response":
        return policy.first_response
    if clock == "next_response":
        return policy.next_response
    return policy.resolution


def _warning_moment(
    policy: SlaPolicy, calendar: BusinessCalendar, clock: str, due: datetime
) -> datetime | None:
    """When `warn_at` of the budget is used: `(1 - warn_at) * budget` business time before
    the deadline (measured back from the deadline, so pauses that moved it are honoured)."""
    budget = _budget(policy, clock)
    if policy.warn_at is None or budget is None or not budget:
        return None
    return _business_before(calendar, due, budget * (1 - policy.warn_at))


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
        self._fired: set[tuple[int, str, datetime, int]] = set()
        # Last customer notice per ticket seen by this process (the DB is the authority).
        self._notice_at: dict[int, datetime] = {}
        # Per ticket: (clock state, earliest moment not fired yet), see _earliest_unfired.
        self._pending: dict[int, tuple[object, datetime | None]] = {}
        self._last_message: dict[int | None, Message | None] = {}
        self._human: dict[int, bool] = {}
        self.fired_total = 0
        #: How long `run()` last decided to sleep (seconds), for tests and metrics.
        self.last_delay: float | None = None

    # -------------------------------------------------------------------------- planning

    def _plan(
        self,
        ticket: Ticket | _Scan,
        rules: Rules,
        fired: set[tuple[int, str, datetime, int]],
        last_notice: datetime | None,
    ) -> list[Fire]:
        """Every fire this ticket has, fired or not, in order (moments may be in the future).

        The customer notice is planned whenever the policy asks for one; whether the requester
        is a human is checked when it fires (a robot's notice is recorded as skipped).
        """
        policy = rules.sla.get(ticket.sla)
        if policy is None or ticket.id is None:
            return []
        calendar = rules.calendar_for_policy(ticket.sla)
        out: list[Fire] = []
        for clock, due in active_deadlines(ticket):
            warn = _warning_moment(policy, calendar, clock, due)
            if warn is not None and warn < due:
                out.append(Fire(warn, 0, WARNING_STEP, clock, due))
            out.append(Fire(due, 1, BREACH_STEP, clock, due))
            for index, (moment, _step) in enumerate(_schedule(policy, calendar, due)):
                out.append(Fire(moment, 2, index, clock, due))
            if policy.customer_notice:
                notice_at = due
                if last_notice is not None and (ticket.id, clock, due, NOTICE_STEP) not in fired:
                    notice_at = max(due, last_notice + NOTICE_INTERVAL)
                out.append(Fire(notice_at, 3, NOTICE_STEP, clock, due))
        out.sort()
        return out

    def _fired_state(
        self, session: Session, ticket_id: int
    ) -> tuple[set[tuple[int, str, datetime, int]], datetime | None]:
        """The ticket's fired step keys and when its last customer notice went out (one query;
        the database is the authority, the in-memory sets only save work)."""
        rows = session.execute(
            sa_select(*_FIRED_COLUMNS).where(col(EscalationStep.ticket_id) == ticket_id)
        ).all()
        keys: set[tuple[int, str, datetime, int]] = set()
        last_notice: datetime | None = None
        for clock, due_at, step, action, fired_at in rows:
            keys.add((ticket_id, clock, utc(due_at) or due_at, step))
            when = utc(fired_at)
            if action == "customer-notice" and when is not None:
                last_notice = when if last_notice is None else max(last_notice, when)
        self._fired |= keys
        if last_notice is not None:
            self._notice_at[ticket_id] = last_notice
        return keys, last_notice

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

    def _scan(self, now: datetime, *, include_snoozed: bool = False) -> list[_Scan]:
        """Open tickets with a running clock (awake ones unless `include_snoozed`), as plain
        column values: the cheap SQL part of the filter, run every time."""
        query = sa_select(*_SCAN_COLUMNS).where(
            col(Ticket.status) == "open",
            or_(
                col(Ticket.first_response_due).is_not(None)
                & col(Ticket.first_responded_at).is_(None),
                col(Ticket.next_response_due).is_not(None),
                col(Ticket.resolution_due).is_not(None),
            ),
        )
        if not include_snoozed:
            query = query.where(
                or_(col(Ticket.snoozed_until).is_(None), col(Ticket.snoozed_until) <= now)
            )
        with Session(self.engine) as session:
            return [_Scan(*row) for row in session.execute(query).all()]

    def _earliest_unfired(self, row: _Scan, rules: Rules) -> datetime | None:
        """The earliest moment of this ticket's plan not fired yet, memoised per clock state
        (fired keys only ever grow, so the answer stays right until the state changes)."""
        assert row.id is not None
        deadlines = tuple(active_deadlines(row))
        state = (id(rules), row.sla, deadlines, self._notice_at.get(row.id))
        cached = self._pending.get(row.id)
        if cached is not None and cached[0] == state:
            nxt = cached[1]
            if nxt is None or nxt > self.clock.now():
                return nxt
        plan = self._plan(row, rules, self._fired, self._notice_at.get(row.id))
        nxt = next((f.moment for f in plan if self._key(row.id, f) not in self._fired), None)
        self._pending[row.id] = (state, nxt)
        return nxt

    # -------------------------------------------------------------------------- run_once

    def run_once(self) -> int:
        """Fire everything due at `clock.now()`; returns how many steps fired."""
        now = self.clock.now()
        rules = self.rules_provider()
        due_ids: list[int] = []
        rows = self._scan(now)
        self._forget_all_but({row.id for row in rows if row.id is not None})
        for row in rows:
            assert row.id is not None
            nxt = self._earliest_unfired(row, rules)
            if nxt is not None and nxt <= now:
                due_ids.append(row.id)
        fired = 0
        for ticket_id in due_ids:
            try:
                fired += self._process(ticket_id, now, rules)
            except Exception:  # one broken ticket must not stop the others
                log.exception("escalation of ticket %s failed; will retry", ticket_id)
        self.fired_total += fired
        return fired

    def _forget_all_but(self, ticket_ids: set[int]) -> None:
        """Drop the memos of tickets no longer running a clock (closed, answered), so a
        long-running daemon's memory stays proportional to the open tickets."""
        self._fired = {k for k in self._fired if k[0] in ticket_ids}
        self._pending = {k: v for k, v in self._pending.items() if k in ticket_ids}
        self._notice_at = {k: v for k, v in self._notice_at.items() if k in ticket_ids}
        self._human = {k: v for k, v in self._human.items() if k in ticket_ids}

    @staticmethod
    def _key(ticket_id: int, fire: Fire) -> tuple[int, str, datetime, int]:
        return (ticket_id, fire.clock, fire.due_at, fire.step)

    def _process(self, ticket_id: int, now: datetime, rules: Rules) -> int:
        fired = 0
        self._last_message = {}
        # Keys claimed in this transaction: remembered only once it has committed (a rollback
        # must leave them to be fired again).
        claimed: set[tuple[int, str, datetime, int]] = set()
        notice_sent: datetime | None = None
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
            known, last_notice = self._fired_state(session, ticket_id)
            human = self._requester_is_human(session, ticket_id)
            plan = self._plan(ticket, rules, known, last_notice)
            # Customer notices go after every ladder step due now (catch-up included), so
            # the notice names the owner the ladder has just put in charge.
            due = sorted(
                (f for f in plan if f.moment <= now), key=lambda f: (f.step == NOTICE_STEP, f)
            )
            for fire in due:
                key = self._key(ticket_id, fire)
                if key in known:
                    continue
                # The 24 h notice limit may have moved since planning (a notice just went out).
                recent = last_notice is not None and now < last_notice + NOTICE_INTERVAL
                if fire.step == NOTICE_STEP and recent:
                    continue
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
                    last_notice = notice_sent = now
                self._act(session, ticket, row, fire, now, rules)
            ticket.updated_at = now
            session.add(ticket)
        self._fired |= claimed
        if notice_sent is not None:
            self._notice_at[ticket_id] = notice_sent
        return fired

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

    # -------------------------------------------------------------------------- actions

    def _act(
        self,
        session: Session,
        ticket: Ticket,
        row: EscalationStep,
        fire: Fire,
        now: datetime,
        rules: Rules,
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
        if fire.step == WARNING_STEP:
            person, skipped = self._on_duty(owner, "owner", owner, rules, now)
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
        if fire.step == NOTICE_STEP:
            self._customer_notice(session, ticket, row, fire, now, policy, calendar, owner)
            return
        ladder = policy.escalation
        if fire.step >= len(ladder):
            return  # the rules changed and the ladder got shorter
        step = ladder[fire.step]
        done: list[str] = []
        notes: list[str] = list(why_owner)
        if step.assign:
            person, skipped = self._target(step.assign, owner, rules, now)
            notes += skipped
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
                    data={"from": previous, "to": person.id, "skipped": skipped},
                )
            done.append(f"assigned to {person.name} ({step.assign})")
            compose_handover(  # issue 11: the whole history to the new holder; the old one told
                session,
                ticket,
                person,
                rules.people.get(previous),
                f"{ticket.ref} missed its {clock_name} deadline ({promised}) and is now yours"
                f" (escalation step {fire.step + 1} of {len(ladder)}).",
                rules=rules,
                settings=self.settings,
                signer=self.signer,
                now=now,
                subject=f"[{ticket.ref}] escalated to you: {clock_name} missed",
                notes=notes,
                kind="escalation",
                told=f"{ticket.ref} missed its {clock_name} deadline ({promised}); escalation"
                f" step {fire.step + 1} of {len(ladder)} gave it to {person.name}.",
            )
            row.person, row.action = person.id, f"assign:{step.assign}"
            owner = person
        if step.notify:
            person, skipped = self._target(step.notify, owner, rules, now)
            notes += skipped
            body = self._staff_body(
                session,
                ticket,
                calendar,
                f"{ticket.ref} missed its {clock_name} deadline ({promised})"
                f" (escalation step {fire.step + 1} of {len(ladder)}).",
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
            done.append(f"notified {person.name} ({step.notify})")
            if not step.assign:
                row.person, row.action = person.id, f"notify:{step.notify}"
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

    # -------------------------------------------------------------------------- people

    def _owner(self, ticket: Ticket, rules: Rules) -> tuple[Person, list[str]]:
        """The ticket's owner, or the default owner when it has none (FIELD-NOTES §7:
        always a named human, where Zammad would notify nobody)."""
        person = rules.people.get(ticket.owner) if ticket.owner else None
        if person is not None:
            return person, []
        fallback = rules.person(rules.defaults.owner)
        why = f"owner {ticket.owner!r} unknown" if ticket.owner else "no owner"
        return fallback, [f"{why}: default owner {fallback.name} used"]

    @staticmethod
    def _on_shift(person: Person, rules: Rules, now: datetime) -> bool:
        calendar = rules.calendar_for_person(person.id)
        return calendar is None or calendar.is_open(now)

    def _on_duty(
        self, first: Person, role: str, owner: Person, rules: Rules, now: datetime
    ) -> tuple[Person, list[str]]:
        """`first`, or the next on-duty person after it in owner -> backup -> manager, else
        the default owner (even off duty: always a named human). Returns who and why."""
        chain: list[tuple[str, Person | None]] = [(role, first)]
        order = ["owner", "backup", "manager"]
        if role in order:
            chain += [(r, rules.resolve(r, owner)) for r in order[order.index(role) + 1 :]]
        else:
            chain += [(r, rules.resolve(r, first)) for r in ("backup", "manager")]
        skipped: list[str] = []
        seen: set[str] = set()
        for label, person in chain:
            if person is None:
                skipped.append(f"no {label}")
                continue
            if person.id in seen:
                continue
            seen.add(person.id)
            if self._on_shift(person, rules, now):
                return person, skipped
            calendar = rules.calendar_for_person(person.id)
            hours = calendar.describe_hours() if calendar else "?"
            skipped.append(f"{person.name} ({label}) skipped: off duty ({hours})")
        last = rules.person(rules.defaults.owner)
        skipped.append(f"nobody on duty in the ladder: default owner {last.name} used")
        return last, skipped

    def _target(
        self, who: str, owner: Person, rules: Rules, now: datetime
    ) -> tuple[Person, list[str]]:
        person = rules.resolve(who, owner)
        if person is None:
            # The owner has no backup/manager (or the id is unknown): walk on from there.
            order = ["owner", "backup", "manager"]
            if who in order:
                rest = order[order.index(who) + 1 :]
                for role in rest:
                    nxt = rules.resolve(role, owner)
                    if nxt is not None:
                        found, skipped = self._on_duty(nxt, role, owner, rules, now)
                        return found, [f"{owner.name} has no {who}", *skipped]
            last = rules.person(rules.defaults.owner)
            return last, [f"{who!r} names nobody: default owner {last.name} used"]
        return self._on_duty(person, who, owner, rules, now)

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
    ) -> None:
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

    def _customer_notice(
        self,
        session: Session,
        ticket: Ticket,
        row: EscalationStep,
        fire: Fire,
        now: datetime,
        policy: SlaPolicy,
        calendar: BusinessCalendar,
        owner: Person,
    ) -> None:
        """Tell the customer plainly: the promised time, who owns the request now, when they
        will hear from us (the next ladder moment, computed with the calendar), and who takes
        over if that slips too: exactly what the ladder will do, nothing invented."""
        assert ticket.id is not None
        row.person = owner.id
        later = [(m, step) for m, step in _schedule(policy, calendar, fire.due_at) if m > now]
        if later:
            by = later[0][0]
        else:
            budget = policy.next_response or policy.first_response or calendar.day
            by = calendar.add(now, budget)
        successor = ""
        rules = self.rules_provider()
        for moment, step in later:
            target = rules.resolve(step.assign, owner) if step.assign else None
            if target is not None and target.id != owner.id:
                successor = (
                    f" If {owner.name} has not answered by {format_local(moment, calendar)}, "
                    f"{target.name} takes over your request."
                )
                break
        promised = format_local(fire.due_at, calendar)
        what = {
            "first_response": "a first answer from a person",
            "next_response": "an answer to your last message",
            "resolution": "your request resolved",
        }[fire.clock]
        text = (
            "Hello,\n\n"
            f"we promised you {what} by {promised}, and we did not keep that promise. "
            "We are sorry.\n\n"
            f"{owner.name} now owns your request {ticket.ref} and will answer you by "
            f"{format_local(by, calendar)}.{successor}\n\n"
            f"Our support hours are {calendar.describe_hours()}.\n\n"
            f"You do not need to do anything. To add something, simply reply to this email: "
            f"your reply goes straight into ticket {ticket.ref} and is read by people.\n\n"
            f"{self.settings.outbound.from_name or self.settings.outbound.from_address}\n"
        )
        out = self.settings.outbound
        local, _, domain = out.from_address.rpartition("@")
        reply_to = self.signer.reply_address(local.split("+", 1)[0], domain, ticket.id)
        message_id = self.signer.message_id(self.settings.smtp.hostname, ticket.id, "notice")
        subject = tagged_subject(ticket.ref, ticket.subject)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = (
            formataddr((out.from_name, out.from_address)) if out.from_name else out.from_address
        )
        msg["To"] = ticket.requester
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now.astimezone(UTC))
        msg["Message-ID"] = message_id
        msg["Reply-To"] = reply_to
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
        msg["X-Auto-Response-Suppress"] = "All"
        msg[LOOP_HEADER] = self.signer.installation_id()  # the same on every node
        last = self._last_customer_message(session, ticket.id)
        if last is not None and last.message_id:
            msg["In-Reply-To"] = last.message_id
            refs = [r for r in last.references.split() if r != last.message_id]
            msg["References"] = " ".join([*refs[-10:], last.message_id])
        msg.set_content(text)
        raw = msg.as_bytes(policy=SMTP)
        enqueue(
            session,
            ticket_id=ticket.id,
            kind="customer_notice",
            raw=raw,
            message_id=message_id,
            rcpt_tos=[ticket.requester],
            now=now,
            from_address=out.from_address,
            subject=subject,
            text=text,
            in_reply_to=last.message_id if last is not None else None,
        )
        session.add(row)
        add_event(
            session,
            ticket.id,
            "customer-notice",
            f"told {ticket.requester} that the {_CLOCK_NAMES[fire.clock]} promise"
            f" ({isoz(fire.due_at)}) was missed; owner {owner.name}; next answer by {isoz(by)}",
            now,
            data={"clock": fire.clock, "due_at": isoz(fire.due_at), "by": isoz(by)},
        )

    # -------------------------------------------------------------------------- timing

    def next_due(self) -> datetime | None:
        """The earliest future moment anything fires (None: nothing is scheduled)."""
        now = self.clock.now()
        rules = self.rules_provider()
        best: datetime | None = None
        for row in self._scan(now, include_snoozed=True):
            moment = self._earliest_unfired(row, rules)
            if moment is None:
                continue
            snoozed = utc(row.snoozed_until)
            if snoozed is not None and snoozed > now:
                moment = max(moment, snoozed)
            if moment > now and (best is None or moment < best):
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
