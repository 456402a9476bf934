"""The plan of a ticket: what fires when, who holds it and who acts at every step.

One pure computation (docs/decisions.md D11, "One plan, said and done"): for a ticket at a moment it
lists every warning, breach, ladder step and customer notice (`fires`), and walks the ladder
forward from the current owner through calendars, absences and on-call (`plan_ticket`), so
that for every future step it is known who will be assigned or told. The acknowledgement,
the customer notices, the staff mails and the escalator all take their statements from
here: a person or a time is only ever stated when this plan says it will act on it.

Because `gateway.sla.duty` is deterministic for given rules, the plan computed at a breach
for the step an hour later is what the escalator computes when that hour comes (unless a
person reassigns the ticket or the rules change; the next notice then says so).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from gateway.sla.business_time import BusinessCalendar
from gateway.sla.clocks import ClockState, active_deadlines
from gateway.sla.deadlines import escalation_schedule
from gateway.sla.duty import Resolved, resolve

if TYPE_CHECKING:
    from gateway.routing.model import EscalationStep as LadderStep
    from gateway.routing.model import Person, Rules, SlaPolicy

__all__ = [
    "BREACH_STEP",
    "MERGE_WINDOW",
    "NOTICE_STEP",
    "WARNING_STEP",
    "Commitment",
    "Fire",
    "PlannedStep",
    "TicketPlan",
    "fires",
    "plan_ticket",
    "schedule",
]

#: `EscalationStep.step` of the warning before a breach (models.py: -1 = warning).
WARNING_STEP = -1
#: `EscalationStep.step` of the breach itself (event 'breach').
BREACH_STEP = -2
#: `EscalationStep.step` of a customer notice: at a breach (due_at = the deadline) or when a
#: promise a notice made is broken (due_at = that promise's time).
NOTICE_STEP = -3
#: Customer notices due within this much of each other go out as one mail.
MERGE_WINDOW = timedelta(seconds=60)


@dataclass(frozen=True, order=True)
class Fire:
    """One thing due: `step` of the breach of `clock` (due at `due_at`) at `moment`."""

    moment: datetime
    rank: int
    step: int
    clock: str
    due_at: datetime


@functools.lru_cache(maxsize=65536)
def schedule(
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


def warning_moment(
    policy: SlaPolicy, calendar: BusinessCalendar, clock: str, due: datetime
) -> datetime | None:
    """When `warn_at` of the budget is used: `(1 - warn_at) * budget` business time before
    the deadline (measured back from the deadline, so pauses that moved it are honoured)."""
    budget = _budget(policy, clock)
    if policy.warn_at is None or budget is None or not budget:
        return None
    return _business_before(calendar, due, budget * (1 - policy.warn_at))


def fires(
    ticket: ClockState,
    sla: str,
    rules: Rules,
    promise_notices: Iterable[tuple[str, datetime]] = (),
) -> list[Fire]:
    """Every fire of this ticket, fired or not, in order (moments may be in the future).

    Per running clock: the warning, the breach, each ladder step and, when the policy asks
    for it, the customer notice at the breach. `promise_notices` are (clock, due) of pending
    promises made to the customer by earlier notices: each gets its own notice when broken
    (rate-limited per promise: the unique step key makes it once).
    """
    policy = rules.sla.get(sla)
    if policy is None:
        return []
    calendar = rules.calendar_for_policy(sla)
    out: list[Fire] = []
    running = active_deadlines(ticket)
    for clock, due in running:
        warn = warning_moment(policy, calendar, clock, due)
        if warn is not None and warn < due:
            out.append(Fire(warn, 0, WARNING_STEP, clock, due))
        out.append(Fire(due, 1, BREACH_STEP, clock, due))
        for index, (moment, _step) in enumerate(schedule(policy, calendar, due)):
            out.append(Fire(moment, 2, index, clock, due))
        if policy.customer_notice:
            out.append(Fire(due, 3, NOTICE_STEP, clock, due))
    if policy.customer_notice:
        clocks = {clock for clock, _ in running}
        known = {(f.clock, f.due_at) for f in out if f.step == NOTICE_STEP}
        for clock, due in promise_notices:
            if clock in clocks and (clock, due) not in known:
                out.append(Fire(due, 3, NOTICE_STEP, clock, due))
                known.add((clock, due))
    out.sort()
    return out


# ------------------------------------------------------------------------------ who acts


@dataclass(frozen=True)
class PlannedStep:
    """A ladder step not fired yet and what it will do when its moment comes."""

    moment: datetime
    clock: str
    due_at: datetime
    index: int
    assign: Resolved | None
    notify: Resolved | None
    holder: Person  # who holds the ticket once the step has fired
    acting: Person  # who acts from this step on: the assignee, else the one told


@dataclass(frozen=True)
class Commitment:
    """What we can truthfully promise next for one clock: `person` acts now; by `by` (None:
    the ladder is exhausted, no time is promised) `then` takes over if it is still open."""

    person: Person
    by: datetime | None
    then: Person | None


@dataclass(frozen=True)
class TicketPlan:
    """The ticket at `at`: who holds it, who acts for it now, and every unfired step."""

    at: datetime
    holder: Person
    acting: Resolved
    steps: tuple[PlannedStep, ...]

    def step(self, clock: str, due_at: datetime, index: int) -> PlannedStep | None:
        for planned in self.steps:
            if (planned.clock, planned.due_at, planned.index) == (clock, due_at, index):
                return planned
        return None

    def commitment(self, clock: str, due_at: datetime, acting: Person) -> Commitment:
        """The next real commitment for the breach of `clock` at `due_at`, when `acting`
        is who acts for it now: the next step of this breach's ladder after `at`."""
        for planned in self.steps:
            if planned.clock == clock and planned.due_at == due_at and planned.moment > self.at:
                then = planned.acting if planned.acting.id != acting.id else None
                return Commitment(acting, planned.moment, then)
        return Commitment(acting, None, None)


def _owner(rules: Rules, owner_id: str) -> Person:
    person = rules.people.get(owner_id) if owner_id else None
    return person if person is not None else rules.person(rules.defaults.owner)


def plan_ticket(
    ticket: ClockState,
    owner_id: str,
    sla: str,
    rules: Rules,
    at: datetime,
    fired: Iterable[tuple[str, datetime, int]] = (),
) -> TicketPlan:
    """Walk the ladder forward from the current owner: for every step not in `fired`
    ((clock, due, index) keys), who it will assign or tell at its own moment.

    Steps of all running clocks are walked in moment order, each resolved against the owner
    the earlier steps leave (so "manager" after "assign backup" is the backup's manager).
    """
    policy = rules.sla.get(sla)
    holder = _owner(rules, owner_id)
    acting = resolve(rules, policy, "owner", holder, at)
    if policy is None:
        return TicketPlan(at, holder, acting, ())
    calendar = rules.calendar_for_policy(sla)
    done = set(fired)
    pending: list[tuple[datetime, int, str, datetime, LadderStep]] = []
    for clock, due in active_deadlines(ticket):
        for index, (moment, step) in enumerate(schedule(policy, calendar, due)):
            if (clock, due, index) not in done:
                pending.append((moment, index, clock, due, step))
    pending.sort(key=lambda p: (p[0], p[1], p[2]))
    owner = holder
    steps: list[PlannedStep] = []
    for moment, index, clock, due, step in pending:
        assigned = resolve(rules, policy, step.assign, owner, moment) if step.assign else None
        if assigned is not None:
            owner = assigned.person
        told = resolve(rules, policy, step.notify, owner, moment) if step.notify else None
        who = assigned or told
        assert who is not None  # the loader requires notify or assign
        steps.append(PlannedStep(moment, clock, due, index, assigned, told, owner, who.person))
    return TicketPlan(at, holder, acting, tuple(steps))
