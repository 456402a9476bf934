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
no person is sent two mails for one breach. This module is the loop (find what is due, claim
it, act, sleep); `gateway.escalation.moments` keeps each ticket's next moment,
`gateway.escalation.actions` does what a claimed step says, in the words of
`gateway.letters.escalation`.

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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from gateway.clock import Clock
from gateway.escalation.actions import Actions, Batch
from gateway.escalation.moments import (
    FAR,
    Key,
    Planner,
    customer_promises,
    key,
    next_moment,
    plan,
)
from gateway.letters.escalation import clock_name
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.clocks import active_deadlines, utc
from gateway.sla.deadlines import isoz
from gateway.sla.plan import (
    BREACH_STEP,
    MERGE_WINDOW,
    NOTICE_STEP,
    WARNING_STEP,
    Fire,
)
from gateway.store import core, promises
from gateway.store.db import is_postgres, session_scope
from gateway.store.models import EscalationStep, Message, Promise, Ticket
from gateway.store.queries import add_event

__all__ = [
    "BREACH_STEP",
    "FAR",
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
#: Woken (after every pipeline batch, by other nodes, a rules reload), `run()` starts a pass
#: at most this long after the previous one began. Under load the pipeline commits many
#: times a second, and a pass per commit was a tenth of the daemon's CPU; a wake that comes
#: meanwhile is not lost (exactly one more pass), and moments the loop sleeps until are
#: never held back, so a step still fires well within 5 s of its moment.
WAKE_GAP = 1.0
#: Seconds between looks for pending promises to settle (kept, broken, withdrawn). The look
#: joins every pending promise to its ticket (whether the ticket was answered or closed since
#: cannot be indexed), and most open tickets hold one: at every pass it grew with the open
#: tickets (15 ms per pass on PostgreSQL with 12,000 pending, docs/performance.md §9). The
#: state it records is computed from the ticket's own times, so settling later records the
#: same outcome; what a broken promise sets off (the customer notice) is planned from the
#: promise and its due time, not from this state.
SETTLE_EVERY = timedelta(seconds=10)

_FIRED_COLUMNS: tuple[Any, ...] = (
    EscalationStep.clock,
    EscalationStep.due_at,
    EscalationStep.step,
    EscalationStep.person,
    EscalationStep.action,
)

#: A pending promise `promises.settle` would move: its condition (`promises.movable`),
#: prebuilt (gateway/store/core.py), read-only, one row.
_SETTLE_PROBE = (
    sa_select(core.table(Promise).c.id)
    .where(*promises.movable(bindparam("now", type_=core.table(Promise).c.due.type)))
    .limit(1)
)

#: `EscalationStep.action` of a claimed row before its action says more.
_ACTIONS = {WARNING_STEP: "warning", BREACH_STEP: "breach", NOTICE_STEP: "customer-notice"}


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
        self.planner = Planner(engine)
        self.actions = Actions(settings, signer)
        # Keys known to be fired (rows are never deleted, so this only saves queries).
        self._fired: set[Key] = set()
        #: Tickets the last pass read as due (tests: a ticket not due is not read).
        self.last_scanned = 0
        self._human: dict[int, bool] = {}
        self.fired_total = 0
        #: How long `run()` last decided to sleep (seconds), for tests and metrics.
        self.last_delay: float | None = None
        #: When the next pass looks for promises to settle (`SETTLE_EVERY`).
        self._settle_at = datetime.min.replace(tzinfo=UTC)

    @property
    def generation(self) -> int:
        """The rules generation in force (bumped by each new rules object)."""
        return self.planner.generation

    # -------------------------------------------------------------------------- a pass

    def run_once(self) -> int:
        """Fire everything due at `clock.now()`, then settle promises; returns how many
        steps fired."""
        now = self.clock.now()
        rules = self.rules_provider()
        self.planner.rules_generation(rules)
        self._fired = set()  # only saves queries within a pass; memory stays flat
        if len(self._human) > 10_000:
            self._human = {}
        self.last_scanned = 0
        self.planner.plan_changed(rules)
        due_rows = self.planner.due(now)
        self.last_scanned = len(due_rows)
        fired = 0
        for row in due_rows:
            assert row.id is not None
            try:
                fired += self._process(row.id, now, rules)
            except Exception:  # one broken ticket must not stop the others
                log.exception("escalation of ticket %s failed; will retry", row.id)
        self.planner.replan(rules)
        if now >= self._settle_at:
            try:
                if self._promises_to_settle(now):
                    with session_scope(self.engine) as session:
                        promises.settle(session, now)
                self._settle_at = now + SETTLE_EVERY
            except Exception:
                log.exception("settling promises failed; will retry")
        self.fired_total += fired
        return fired

    def _promises_to_settle(self, now: datetime) -> bool:
        """Can any pending promise move now? A read-only look first: most passes find none,
        and `promises.settle` is a write transaction (on SQLite the write lock, queued
        behind the pipeline's commits) with an ORM query."""
        with self.planner.reader.connect() as conn:
            return conn.execute(_SETTLE_PROBE, {"now": now}).first() is not None

    def next_due(self) -> datetime | None:
        """The earliest future moment anything fires (None: nothing is scheduled)."""
        rules = self.rules_provider()
        self.planner.rules_generation(rules)
        self.planner.plan_changed(rules)
        self.planner.replan(rules)
        if self.planner.busy:
            return self.clock.now()  # planning is under way: the next pass continues it
        return self.planner.earliest_after(self.clock.now())

    # -------------------------------------------------------------------------- one ticket

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

    @staticmethod
    def _batch(
        ticket: Ticket, by_breach: dict[tuple[str, datetime], list[tuple[int, str, str]]]
    ) -> Batch:
        """Who was told for each breach and who acts for each clock, from the fired rows."""
        batch = Batch(told={}, acting={}, notices=[], mailed=set())
        running = active_deadlines(ticket)
        for (clock, deadline), steps in by_breach.items():
            batch.told[(clock, deadline)] = {p for step, p, _ in steps if p and step >= -1}
            ladder = [(step, p) for step, p, _ in steps if step >= 0 and p]
            if ladder and (clock, deadline) in running:
                batch.acting[clock] = max(ladder)[1]
        return batch

    @staticmethod
    def _due_fires(fires: list[Fire], ticket_id: int, now: datetime, known: set[Key]) -> list[Fire]:
        """The fires due at `now` and not fired, customer notices last."""
        due = [f for f in fires if f.moment <= now and key(ticket_id, f) not in known]
        if any(f.step == NOTICE_STEP for f in due):
            # A customer never gets two notices within a minute: fold the notices due
            # within MERGE_WINDOW into this one (their keys are claimed now).
            due += [
                f
                for f in fires
                if f.step == NOTICE_STEP
                and now < f.moment <= now + MERGE_WINDOW
                and key(ticket_id, f) not in known
            ]
        # Customer notices go after every ladder step due now (catch-up included), so
        # the notice names the person the ladder has just put in charge.
        due.sort(key=lambda f: (f.step == NOTICE_STEP, f))
        return due

    def _process(self, ticket_id: int, now: datetime, rules: Rules) -> int:
        fired = 0
        self.actions.start_ticket()
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
            batch = self._batch(ticket, by_breach)
            fires = plan(ticket, rules, customer_promises(session, ticket_id))
            for fire in self._due_fires(fires, ticket_id, now, known):
                step_key = key(ticket_id, fire)
                known.add(step_key)
                claimed.add(step_key)
                if self._skipped(session, ticket, fire, now, human=human):
                    continue
                row = self._claim(session, ticket, fire, now)
                if row is None:
                    continue
                fired += 1
                if fire.step == NOTICE_STEP:
                    batch.notices.append((fire, row))
                    continue
                self.actions.act(session, ticket, row, fire, now, rules, known, batch)
            if batch.notices:
                self.actions.customer_notice(session, ticket, now, rules, known, batch)
            ticket.updated_at = now
            # Its next moment, from the columns and promises as they are now (a notice may
            # have made a new promise; a step may have moved a deadline).
            session.flush()
            after = plan(ticket, rules, customer_promises(session, ticket_id))
            ticket.escalate_at = next_moment(after, ticket_id, known)
            session.add(ticket)
        self._fired |= claimed
        return fired

    def _skipped(
        self, session: Session, ticket: Ticket, fire: Fire, now: datetime, *, human: bool
    ) -> bool:
        """True when ``fire`` is marked done without mail (claimed, so never fired again)."""
        if fire.step == NOTICE_STEP and not human:
            # Never to robots: the breach is recorded, the notice is not sent.
            if self._claim(session, ticket, fire, now, "customer-notice-skipped"):
                add_event(
                    session,
                    ticket.id,
                    "customer-notice",
                    f"not sent for the {clock_name(fire.clock)} breach: the"
                    " requester is not a human sender (robot mail opened the ticket)",
                    now,
                    data={"clock": fire.clock, "due_at": isoz(fire.due_at)},
                )
            return True
        if fire.step == WARNING_STEP and now >= fire.due_at:
            # Catching up past the deadline itself: a "due soon" warning would be
            # noise next to the breach; mark it done without mail.
            self._claim(session, ticket, fire, now, "warning-skipped")
            return True
        return False

    def _claim(
        self, session: Session, ticket: Ticket, fire: Fire, now: datetime, action: str = ""
    ) -> EscalationStep | None:
        """Insert the step's row; None when it was already fired (by us or another node)."""
        assert ticket.id is not None
        row = EscalationStep(
            ticket_id=ticket.id,
            clock=fire.clock,
            due_at=fire.due_at,
            step=fire.step,
            person="",
            action=action or _ACTIONS.get(fire.step, "step"),
            fired_at=now,
        )
        if session.get_bind().dialect.name == "postgresql":
            # An upsert, not insert-and-catch: another node's fire of the same step is
            # expected, not an error in the database log.
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

    # -------------------------------------------------------------------------- timing

    async def run(
        self,
        stopping: asyncio.Event,
        wakeup: asyncio.Event,
        on_fired: Callable[[], None] | None = None,
    ) -> None:
        """Fire what is due, then sleep exactly until the next moment (at most MAX_SLEEP, so
        rules edits and new tickets are seen) or until `wakeup` is set (a new ticket, a
        reply, a rules reload; passes so woken start at most once per `WAKE_GAP`). Not a
        coarse poll: a step due in 3 s is fired in 3 s. `on_fired` runs after a pass that
        fired steps: it wakes the delivery worker, so the mail leaves now and not at the
        worker's next poll."""
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            wakeup.clear()  # before the work: a wakeup during the run is not lost
            started = loop.time()
            try:
                # One hop to a thread for the pass and the next moment (each hop is a
                # context switch and a future, at every wake).
                nxt = await asyncio.to_thread(self._pass, on_fired, loop)
            except Exception:
                log.exception("escalator run failed; retrying")
                nxt = None
            delay = MAX_SLEEP
            if nxt is not None:
                delay = min(MAX_SLEEP, max(0.0, (nxt - self.clock.now()).total_seconds()))
            self.last_delay = delay
            due = loop.time() + delay
            if await _wait(stopping, wakeup, delay) and not stopping.is_set():
                # Woken early: the next pass waits for the gap since this one began (never
                # past the moment it was going to wake for anyway).
                rest = min(started + WAKE_GAP, due) - loop.time()
                if rest > 0:
                    await _wait(stopping, None, rest)

    def _pass(
        self, on_fired: Callable[[], None] | None, loop: asyncio.AbstractEventLoop
    ) -> datetime | None:
        """One pass (in a worker thread): fire what is due, then the next moment. A pass
        that fired steps calls `on_fired` on the event loop at once, before the next moment
        is looked up: the mail leaves now."""
        fired = self.run_once()
        if fired and on_fired is not None:
            loop.call_soon_threadsafe(on_fired)
        return self.next_due()


async def _wait(stopping: asyncio.Event, wakeup: asyncio.Event | None, timeout: float) -> bool:
    """Sleep `timeout` seconds or until `stopping` (or `wakeup`, if given) is set; True when
    an event ended it."""
    waiters = [asyncio.ensure_future(stopping.wait())]
    if wakeup is not None:
        waiters.append(asyncio.ensure_future(wakeup.wait()))
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)
