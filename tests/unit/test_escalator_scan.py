"""The escalator's indexed scan (docs/decisions.md D16): a pass reads only tickets whose next moment
has come (`Ticket.escalate_at`), a change to a ticket re-plans it, a rules change re-plans every
open ticket (a generation counter, not `id(rules)`), and read-only sessions never take
SQLite's write lock."""

from __future__ import annotations

import copy
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.escalation.escalator import FAR, SETTLE_EVERY, Escalator
from gateway.routing.loader import load_rules
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.store import fresh
from gateway.store.db import open_database, read_scope, session_scope
from gateway.store.models import Promise, Ticket
from tests.conftest import make_settings
from tests.support.sla import SLA_RULES, make_escalator, new_ticket, sla_rules

MON_09 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = open_database(f"sqlite:///{tmp_path}/scan.db")
    yield e  # type: ignore[misc]
    e.dispose()


def create(engine: Engine, when: datetime, n: int = 1) -> list[int]:
    rules = sla_rules()
    ids = []
    with Session(engine) as s:
        for _ in range(n):
            t = new_ticket(s, rules, at=when)
            assert t.id is not None
            ids.append(t.id)
        s.commit()
    return ids


def escalate_at(engine: Engine, tid: int) -> datetime | None:
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        return t.escalate_at


def test_a_due_ticket_among_many_not_due_fires_and_only_it_is_read(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    (due,) = create(engine, MON_09)  # first response due Monday 13:00Z (4 business hours)
    later = create(engine, at(25, 9), n=150)  # due Wednesday: not due on Monday
    esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
    clock.set(at(23, 12, 59))
    assert esc.run_once() == 0
    assert esc.last_scanned == 0  # 151 open tickets, none due: none read
    assert escalate_at(engine, due) == at(23, 13)
    assert escalate_at(engine, later[0]) == at(25, 13)
    clock.set(at(23, 13))
    assert esc.run_once() == 3  # breach, notify owner, customer notice
    assert esc.last_scanned == 1  # the due one, not the 150 others
    assert escalate_at(engine, due) == at(23, 14)  # its next ladder step
    assert esc.next_due() == at(23, 14)


def test_a_change_to_a_ticket_replans_it(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    (tid,) = create(engine, MON_09)
    esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
    esc.run_once()
    assert escalate_at(engine, tid) == at(23, 13)
    with session_scope(engine) as s:  # an agent answers: the first-response clock stops
        t = s.get(Ticket, tid)
        assert t is not None
        t.first_responded_at = at(23, 10)
        t.first_response_due = None
        s.add(t)
    assert escalate_at(engine, tid) is None  # marked for planning in the same commit
    clock.set(at(23, 13))
    assert esc.run_once() == 0  # no breach of an answered clock
    moment = escalate_at(engine, tid)
    assert moment is not None
    assert moment > at(23, 13)


def edited_rules(tmp_path: Path) -> Path:
    """The SLA rules with `warn_at = 0.5` on the standard policy (a warning at 11:00)."""
    edited = tmp_path / "rules_edited"
    shutil.copytree(SLA_RULES, edited)
    toml = edited / "rules.toml"
    text_ = toml.read_text()
    policy = '[sla.standard]\ncalendar = "berlin"\n'
    assert policy in text_
    toml.write_text(text_.replace(policy, policy + "warn_at = 0.5\n", 1))
    return edited


def test_a_new_rules_object_replans_every_open_ticket(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    (tid,) = create(engine, MON_09)
    edited = edited_rules(tmp_path)
    current = [sla_rules()]
    settings = make_settings(tmp_path, rules_dir=str(SLA_RULES))
    esc = Escalator(engine, settings, clock, lambda: current[0], Signer(settings.secret()))
    clock.set(at(23, 9, 30))
    assert esc.run_once() == 0
    assert escalate_at(engine, tid) == at(23, 13)  # the breach: no warning in these rules
    generation = esc.generation
    esc.run_once()
    assert esc.generation == generation  # the same object: no replan
    current[0] = load_rules(edited)  # a reload: a new object (its id may be a freed one's)
    esc.run_once()
    assert esc.generation == generation + 1
    # Re-planned with the edited policy: warned at half of the 4 business hours.
    assert escalate_at(engine, tid) == at(23, 11)


def test_a_rules_object_at_a_freed_ones_address_still_replans(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    """A reload whose new rules object could land where the previous one lived (CPython reuses
    freed memory, so `id()` repeats) is still a change: a cache keyed on `id(rules)` would
    keep the old plan here."""
    (tid,) = create(engine, MON_09)
    template = load_rules(edited_rules(tmp_path))
    current: list[Rules] = [sla_rules()]
    settings = make_settings(tmp_path, rules_dir=str(SLA_RULES))
    esc = Escalator(engine, settings, clock, lambda: current[0], Signer(settings.secret()))
    clock.set(at(23, 9, 30))
    esc.run_once()
    assert escalate_at(engine, tid) == at(23, 13)
    generation, old_id = esc.generation, id(current[0])
    current[0] = template  # the test's last reference to the first rules object goes
    # Copies of the same type and size, each kept so the next takes a new block: the
    # allocator soon hands out the freed object's memory again, unless something (the
    # escalator) still holds that object.
    copies = [copy.copy(template)]
    while id(copies[-1]) != old_id and len(copies) < 100_000:
        copies.append(copy.copy(template))
    current[0] = copies[-1]
    esc.run_once()
    assert esc.generation == generation + 1
    assert escalate_at(engine, tid) == at(23, 11)  # planned with warn_at = 0.5


def test_nothing_left_to_fire_is_far_away(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    (tid,) = create(engine, MON_09)
    esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
    with session_scope(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        t.first_response_due = t.next_response_due = t.resolution_due = None
        s.add(t)
    esc.run_once()
    assert escalate_at(engine, tid) == FAR
    assert esc.next_due() is None


def test_a_read_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path}/lock.db")
    create(engine, MON_09)
    writer = sqlite3.connect(tmp_path / "lock.db", timeout=0.1, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with read_scope(engine) as s:
            assert s.execute(text("SELECT count(*) FROM ticket")).scalar() == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        engine.dispose()


def test_the_read_session_never_commits(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path}/ro.db")
    (tid,) = create(engine, MON_09)
    with read_scope(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        t.subject = "changed"
        s.add(t)
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        assert t.subject != "changed"
    engine.dispose()


def test_plan_columns_cover_what_the_planner_reads() -> None:
    from gateway.escalation.moments import SCAN_COLUMNS as _SCAN_COLUMNS
    from gateway.store.plan_marks import PLAN_COLUMNS

    read = {c.key for c in _SCAN_COLUMNS} - {"id"}
    assert read == set(PLAN_COLUMNS)


def _promise(tid: int, when: datetime) -> Promise:
    return Promise(
        ticket_id=tid,
        made_at=when,
        audience="customer",
        to="c@customer.example",
        person="Alice",
        what="first answer",
        clock="first_response",
        due=when,
    )


def test_a_promise_on_a_ticket_of_this_transaction_costs_no_update(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    """A promise marks its ticket "to be planned" (the notice joins its plan), except a
    ticket inserted by the same transaction (`fresh.ticket_created`): that one is
    unplanned already and nothing else can plan it before the commit, so no UPDATE is sent.
    The record of new tickets ends with the transaction: a promise in the next one marks
    the ticket again."""
    updates: list[str] = []

    def count(_c: object, _cur: object, statement: str, *_a: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE TICKET SET ESCALATE_AT"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with Session(engine) as s:
            t = new_ticket(s, sla_rules(), at=MON_09)
            assert t.id is not None
            assert t.escalate_at is None
            tid = t.id
            fresh.ticket_created(s, t.customer_id, tid)
            s.add(_promise(tid, MON_09))
            s.flush()
            assert updates == []
            s.commit()
        esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
        esc.run_once()  # planned: a moment is stored
        assert escalate_at(engine, tid) is not None
        updates.clear()
        with session_scope(engine) as s:  # a later transaction: the ticket is not new there
            s.add(_promise(tid, MON_09))
        assert len(updates) == 1
        assert escalate_at(engine, tid) is None
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_promises_are_looked_at_every_settle_interval_not_every_pass(
    engine: Engine, tmp_path: Path, clock: FrozenClock
) -> None:
    """The look for pending promises to settle joins every pending promise to its ticket
    (most open tickets hold one), so it runs once per `SETTLE_EVERY`, not at every pass;
    a promise whose time has come is still settled, within that interval."""
    (tid,) = create(engine, MON_09)
    with session_scope(engine) as s:
        s.add(_promise(tid, at(23, 10)))
    esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
    looks: list[str] = []

    def count(_c: object, _cur: object, statement: str, *_a: object) -> None:
        if "FROM promise, ticket" in statement:
            looks.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        clock.set(at(23, 9, 30))
        esc.run_once()
        assert len(looks) == 1  # the first pass looks (nothing to settle yet)
        clock.set(at(23, 10, 0))  # the promise's time has come, 30 minutes later
        esc.run_once()
        assert len(looks) == 2
        with Session(engine) as s:
            (p,) = s.exec(
                select(Promise).where(Promise.ticket_id == tid, Promise.to == "c@customer.example")
            ).all()
            assert p.state == "broken"
        esc.run_once()  # the same instant: no look
        clock.set(at(23, 10, 0) + SETTLE_EVERY / 2)
        esc.run_once()
        assert len(looks) == 2
        clock.set(at(23, 10, 0) + SETTLE_EVERY)
        esc.run_once()
        assert len(looks) == 3
    finally:
        event.remove(engine, "before_cursor_execute", count)
