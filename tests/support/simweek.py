"""A simulated week of tickets against the real database, the real escalator and the real
plan (docs/decisions.md D11), shared by tests/integration/test_escalation_simulation.py (few
tickets, asserts the goals) and bench/sla_week.py (many tickets, prints the figures).

Tickets are written straight into the database with deadlines from `initial_deadlines` (the
one computation behind the acknowledgement), an owner checked against the plan
(`duty.owner_for_window`, as the route stage does) and the acknowledgement's promise
recorded. A seeded RNG adds staff replies, customer follow-ups, closes, reassignments
(`#assign`), merges (closed into another ticket) and **late mail** (a message that waited
hours in a stopped node's spool: `gateway.notices.late.collapse` + `send_late`, as the respond
stage does). The rules (tests/support/rules_sla/) have off-duty hours, absences and a 24x7
policy served by office-hours people plus an on-call person. A frozen clock advances in
10-minute ticks; each tick runs the escalator first (it wakes exactly at a moment in
production), then the tick's actions. Ticks at which nothing can happen are skipped, as the
daemon sleeps until `Escalator.next_due()` (`next_tick`): the same passes that do anything,
about a third fewer in all.

Figures (`Report`): promises made, kept, broken, withdrawn; broken customer promises with
no notice (goal 0); statements naming a person who did not act on that step (goal 0);
notices within 60 s of each other to one customer (goal 0).
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.clock import FrozenClock
from gateway.escalation.escalator import Escalator
from gateway.notices.late import collapse, send_late
from gateway.security.tokens import Signer
from gateway.sla import clocks
from gateway.sla.deadlines import escalation_schedule, isoz
from gateway.sla.duty import owner_for_window
from gateway.store import promises
from gateway.store.models import EscalationStep, Event, Outbox, Promise, Ticket
from gateway.store.queries import add_event
from tests.conftest import make_settings
from tests.support.sla import SLA_RULES, add_customer_message, make_escalator, new_ticket, sla_rules

TICK = timedelta(minutes=10)
START = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)  # Monday 00:00Z
END = START + timedelta(days=7)
SEED = 20261123
OWNERS = ["alice", "bob", "erin", "carol", "hugo", "frank"]


@dataclass
class Story:
    created: datetime
    sla: str
    owner: str
    robot: bool
    late: timedelta | None
    actions: list[tuple[datetime, str]] = field(default_factory=list)


@dataclass
class Report:
    """The figures of one simulated week."""

    figures: dict[str, Any]
    violations: dict[str, list[str]]

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]


def make_stories(rng: random.Random, count: int) -> list[Story]:
    stories = []
    for _ in range(count):
        created = START + rng.randrange(0, 5 * 24 * 6) * TICK
        story = Story(
            created=created,
            sla=rng.choices(["standard", "night", "vip24"], [5, 3, 3])[0],
            owner=rng.choice(OWNERS),
            robot=rng.random() < 0.05,
            late=timedelta(hours=rng.randrange(2, 12)) if rng.random() < 0.04 else None,
        )
        t = created
        for _round in range(rng.choice([0, 1, 1, 1, 2, 3])):
            late = rng.random() < 0.2
            t += rng.randrange(1, 6 * (24 if late else 3)) * TICK
            if rng.random() < 0.1:
                story.actions.append((t, "reassign"))
                t += rng.randrange(1, 6) * TICK
            story.actions.append((t, "staff"))
            if rng.random() < 0.4:
                t += rng.randrange(1, 6 * 10) * TICK
                story.actions.append((t, "customer"))
        roll = rng.random()
        if roll < 0.5:
            story.actions.append((t + rng.randrange(1, 6 * 24) * TICK, "close"))
        elif roll < 0.6:
            story.actions.append((t + rng.randrange(1, 6 * 24) * TICK, "merge"))
        stories.append(story)
    return stories


def run_week(db: Engine, tmp_path: Path, count: int, seed: int = SEED) -> Report:
    rules = sla_rules()
    settings = make_settings(tmp_path, rules_dir=str(SLA_RULES))
    signer = Signer(settings.secret())
    clock = FrozenClock(START)
    escalator = make_escalator(db, settings, clock, rules)
    rng = random.Random(seed)
    stories = make_stories(rng, count)
    by_tick: dict[datetime, list[tuple[int, str]]] = {}
    for index, story in enumerate(stories):
        by_tick.setdefault(story.created, []).append((index, "create"))
        for at, what in story.actions:
            by_tick.setdefault(at, []).append((index, what))

    ids: dict[int, int] = {}
    acks: list[tuple[str, datetime]] = []  # (customer, when) of acknowledgements
    reassigned: dict[int, list[datetime]] = {}
    clocks_seen = Clocks()
    action_ticks = sorted(by_tick)
    started = time.monotonic()
    fired = 0
    passes = 0
    now = START
    while now <= END:
        clock.set(now)
        fired += escalator.run_once()
        passes += 1
        todo = by_tick.get(now, [])
        if todo:
            with Session(db) as s:
                for index, what in todo:
                    _act(
                        s,
                        rules,
                        settings,
                        signer,
                        stories,
                        index,
                        what,
                        now,
                        ids,
                        acks,
                        reassigned,
                        rng,
                        clocks_seen,
                    )
                s.commit()
        now = next_tick(now, bool(todo), escalator, db, action_ticks)
    elapsed = time.monotonic() - started
    report = _report(db, rules, stories, ids, acks, reassigned, fired, elapsed, count)
    report.figures["escalator passes"] = passes
    _check_clocks(db, rules, clocks_seen, report)
    return report


@dataclass
class Clocks:
    """Every clock instance that ran, and when it stopped (answered, closed)."""

    armed: dict[tuple[int, str, datetime], None] = field(default_factory=dict)
    stopped: dict[tuple[int, str, datetime], datetime] = field(default_factory=dict)

    def before(self, t: Ticket) -> set[tuple[str, datetime]]:
        return {(c, d) for c, d in clocks.active_deadlines(t)}

    def after(self, t: Ticket, before: set[tuple[str, datetime]], now: datetime) -> None:
        assert t.id is not None
        after = self.before(t)
        for c, due in before - after:
            self.stopped[(t.id, c, due)] = now
        for c, due in after - before:
            # A clock can re-arm with the very due time of an earlier one that was answered
            # in time (both land on a closing instant): track the latest.
            self.armed[(t.id, c, due)] = None
            self.stopped.pop((t.id, c, due), None)


def next_tick(
    now: datetime, acted: bool, escalator: Escalator, db: Engine, action_ticks: list[datetime]
) -> datetime:
    """The next tick at which anything can happen, as the daemon's escalator loop sleeps
    until `Escalator.next_due()` unless a new ticket or reply wakes it: the tick after one
    with actions (their promises settle on the next pass, as before), the next tick with
    actions, the first tick at or after the escalator's next moment, and the first tick at
    or after a pending promise's due time. The ticks in between would run passes that find
    nothing due, so skipping them changes no figure; it also makes the week depend on
    `next_due` being right (a moment it missed would fire late and fail the ladder check).
    """
    step = now + TICK
    if acted:
        return step
    candidates = [END + TICK]
    later = bisect.bisect_right(action_ticks, now)
    if later < len(action_ticks):
        candidates.append(action_ticks[later])
    due = escalator.next_due()
    if due is not None:
        candidates.append(ceil_tick(due))
    with Session(db) as s:
        promised = s.exec(
            select(func.min(col(Promise.due))).where(col(Promise.state) == "pending")
        ).one()
    promised_at = clocks.utc(promised)
    if promised_at is not None:
        candidates.append(ceil_tick(promised_at))
    return max(step, min(candidates))


def ceil_tick(moment: datetime) -> datetime:
    """The first escalator run at or after `moment`."""
    n = -(-(moment - START) // TICK)
    return START + n * TICK


def _check_clocks(db: Engine, rules: Any, seen: Clocks, report: Report) -> None:  # noqa: C901  (the ladder oracle: each check beside the case it covers)
    """Each breach the escalator could see escalates exactly once per ladder step, at the
    first run at or after its moment (a late ticket's past steps are collapsed at creation);
    an agent who answered in time is never escalated (zammad#3140); nothing fires for a clock
    that never ran."""
    with Session(db) as s:
        steps = s.exec(select(EscalationStep)).all()
        tickets = {t.id: t for t in s.exec(select(Ticket)).all()}
    rows = {(r.ticket_id, r.clock, clocks.utc(r.due_at), r.step): r for r in steps}
    bad = report.violations.setdefault("ladder", [])
    expected = 0
    for (tid, c, due), _ in seen.armed.items():
        stop = seen.stopped.get((tid, c, due), END + TICK)
        policy = rules.policy(tickets[tid].sla)
        calendar = rules.calendar_for_policy(tickets[tid].sla)
        breach = rows.get((tid, c, due, -2))
        if ceil_tick(due) > stop:  # answered (or closed) before any run saw it overdue
            if breach is not None:
                bad.append(f"{tid} {c} answered in time but escalated")
            continue
        if breach is None:
            bad.append(f"{tid} {c} due {isoz(due)} never breached")
            continue
        if breach.action != "late-collapsed" and clocks.utc(breach.fired_at) != ceil_tick(due):
            bad.append(f"{tid} {c} breach fired at {isoz(clocks.utc(breach.fired_at))}")
        for index, (moment, _) in enumerate(escalation_schedule(policy, calendar, due)):
            row = rows.get((tid, c, due, index))
            if ceil_tick(moment) <= stop:
                expected += 1
                if row is None:
                    bad.append(f"{tid} {c} step {index} missing")
                elif row.action != "late-collapsed" and clocks.utc(row.fired_at) != ceil_tick(
                    moment
                ):
                    bad.append(f"{tid} {c} step {index} fired at the wrong time")
            elif row is not None:
                bad.append(f"{tid} {c} step {index} fired after the clock stopped")
    # (A notice for a broken promise is keyed by the promise's own time, not a deadline.)
    if not {k[:3] for k in rows if k[3] != -3} <= set(seen.armed):
        bad.append("something fired for a clock that never ran")
    report.figures["ladder steps expected"] = expected


def _act(
    s: Session,
    rules: Any,
    settings: Any,
    signer: Signer,
    stories: list[Story],
    index: int,
    what: str,
    now: datetime,
    ids: dict[int, int],
    acks: list[tuple[str, datetime]],
    reassigned: dict[int, list[datetime]],
    rng: random.Random,
    seen: Clocks,
) -> None:
    story = stories[index]
    requester = f"customer{index}@customer.example"
    if what == "create":
        received = now - story.late if story.late is not None else now
        policy = rules.policy(story.sla)
        t = new_ticket(
            s,
            rules,
            at=received,
            sla=story.sla,
            owner=story.owner,
            requester=requester,
            robot="auto-reply: X-Autoreply: yes" if story.robot else "",
        )
        assert t.id is not None
        ids[index] = t.id
        # The owner the acknowledgement names is on duty before the deadline (route stage).
        found = owner_for_window(
            rules, policy, rules.person(t.owner), received, clocks.utc(t.first_response_due)
        )
        t.owner = found.person.id
        seen.after(t, set(), received)
        late = collapse(s, t, rules, received, now) if story.late is not None else None
        if story.robot:
            return
        if late is not None:
            send_late(s, settings, signer, t, rules, late, to=requester, last=None)
            return
        acks.append((requester, now))
        promises.record(
            s,
            ticket_id=t.id,
            made_at=now,
            to=requester,
            person=t.owner,
            message_id=f"<ack{t.id}@sim>",
            what="first answer",
            clock="first_response",
            due=clocks.utc(t.first_response_due),
        )
        return
    t = s.get(Ticket, ids[index])
    assert t is not None
    before = seen.before(t)
    if what == "staff":
        clocks.on_staff_reply(t, now)
    elif what == "customer":
        clocks.on_customer_message(t, now, rules.policy(t.sla), rules.calendar_for_policy(t.sla))
        add_customer_message(s, t, now, text=f"more from {index}")
    elif what == "reassign":
        if t.status == "open":
            t.owner = rng.choice([p for p in OWNERS if p != t.owner])
            add_event(s, t.id, "assigned", f"{t.ref} assigned by #assign to {t.owner}", now)
            reassigned.setdefault(t.id or 0, []).append(now)
    else:  # close or merge (a merge closes the ticket into another)
        clocks.on_close(t, now)
    seen.after(t, before, now)
    s.add(t)


def _report(  # noqa: C901  (the week's report: each violation list beside the rows it reads)
    db: Engine,
    rules: Any,
    stories: list[Story],
    ids: dict[int, int],
    acks: list[tuple[str, datetime]],
    reassigned: dict[int, list[datetime]],
    fired: int,
    elapsed: float,
    count: int,
) -> Report:
    with Session(db) as s:
        steps = s.exec(select(EscalationStep)).all()
        mail = s.exec(select(Outbox)).all()
        rows = s.exec(select(Promise)).all()
        notices = s.exec(select(Event).where(Event.type == "customer-notice")).all()
        tickets = {t.id: t for t in s.exec(select(Ticket)).all()}
    violations: dict[str, list[str]] = {"untold": [], "wrong person": [], "within 60 s": []}

    keys = Counter((r.ticket_id, r.clock, clocks.utc(r.due_at), r.step) for r in steps)
    violations["fired twice"] = [str(k) for k, n in keys.items() if n > 1]
    emails = {p.email for p in rules.people.values()}
    for m in mail:
        if m.kind in ("escalation", "notification"):
            to = json.loads(m.rcpt_tos)
            if len(to) != 1 or to[0] not in emails:
                violations.setdefault("not a named human", []).append(m.rcpt_tos)

    customer = [p for p in rows if p.audience == "customer"]
    for p in customer:
        if p.state == "broken" and not p.told:
            violations["untold"].append(f"ticket {p.ticket_id} {p.clock} due {isoz(p.due)}")

    # Every statement of a person: the one acting when told, the one named for the next step.
    ladder: dict[tuple[int, str, datetime], dict[int, EscalationStep]] = {}
    for r in steps:
        due = clocks.utc(r.due_at)
        assert due is not None
        if r.step >= 0:
            ladder.setdefault((r.ticket_id, r.clock, due), {})[r.step] = r
    statements = 0
    for e in notices:
        data = json.loads(e.data or "{}")
        if "person" not in data or e.ticket_id is None:
            continue
        tid = e.ticket_id
        told_at = clocks.utc(e.at)
        assert told_at is not None
        breach_due = datetime.fromisoformat(data["breach_due"].replace("Z", "+00:00"))
        fired_steps = ladder.get((tid, data["clock"], breach_due), {})
        statements += 1
        before = [r for r in fired_steps.values() if clocks.utc(r.fired_at) <= told_at]
        if before:
            latest = max(before, key=lambda r: r.step)
            if latest.person != data["person"]:
                violations["wrong person"].append(f"{tid}: told {data['person']}, {latest.person}")
        if data["by"] is None:
            continue
        statements += 1
        by = datetime.fromisoformat(data["by"].replace("Z", "+00:00"))
        if any(told_at <= r <= by for r in reassigned.get(tid, [])):
            continue  # a person reassigned it meanwhile: the plan changed, and says so next
        policy = rules.policy(tickets[tid].sla)
        calendar = rules.calendar_for_policy(tickets[tid].sla)
        for index, (moment, _) in enumerate(escalation_schedule(policy, calendar, breach_due)):
            row = fired_steps.get(index)
            if moment == by and row is not None and row.action != "late-collapsed":
                expected = data["then"] or data["person"]
                if row.person != expected:
                    violations["wrong person"].append(
                        f"{tid} step {index}: said {expected}, acted {row.person}"
                    )

    sent: dict[str, list[datetime]] = {}
    for who, at in acks:
        sent.setdefault(who, []).append(at)
    for m in mail:
        if m.kind in ("customer_notice", "ack"):
            at = clocks.utc(m.created_at)
            assert at is not None
            sent.setdefault(json.loads(m.rcpt_tos)[0], []).append(at)
    for who, times in sent.items():
        times.sort()
        for a, b in itertools.pairwise(times):
            if b - a < timedelta(seconds=60):
                violations["within 60 s"].append(f"{who}: {isoz(a)} and {isoz(b)}")

    states = Counter(p.state for p in customer)
    staff = Counter(p.state for p in rows if p.audience == "staff")
    kinds = Counter(m.kind for m in mail)
    figures = {
        "database": db.dialect.name,
        "tickets": count,
        "late tickets": sum(1 for s in stories if s.late is not None),
        "reassigned": sum(len(v) for v in reassigned.values()),
        "merged": sum(1 for s in stories for _, w in s.actions if w == "merge"),
        "customer promises made": len(customer),
        "kept": states["kept"],
        "broken": states["broken"],
        "withdrawn": states["withdrawn"],
        "pending at the end": states["pending"],
        "staff promises made": sum(staff.values()),
        "staff promises broken": staff["broken"],
        "broken promises with no customer notice": len(violations["untold"]),
        "statements about a person checked": statements,
        "statements naming a person who did not act": len(violations["wrong person"]),
        "notices within 60 s to one customer": len(violations["within 60 s"]),
        "customer notices": kinds["customer_notice"],
        "escalation mails": kinds["escalation"],
        "ladder steps fired": sum(1 for r in steps if r.step >= 0 and r.action != "late-collapsed"),
        "steps collapsed (late)": sum(1 for r in steps if r.action == "late-collapsed"),
        "fired total": fired,
        "seconds": round(elapsed, 1),
    }
    return Report(figures, violations)
