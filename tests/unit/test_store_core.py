"""gateway/store/core.py hands prebuilt statements straight to the DBAPI cursor: the driver
must see exactly what SQLAlchemy's own execution would give it (the SQL text and the
processed parameters), and a read must come back with the same rows, on SQLite and
PostgreSQL. Every module-level Core statement of the pipeline's hot path is checked."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, exc, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Executable
from sqlmodel import Session

from gateway.pipeline import conversation, junk, lettering, record, respond
from gateway.store import core, plan_marks, queries
from gateway.store.models import (
    BlockedSender,
    Customer,
    CustomerAddress,
    Event,
    Message,
    MessageRef,
    Outbox,
    Ticket,
)

NOW = datetime(2026, 3, 4, 10, 30, 15, 123456, tzinfo=UTC)


def _statements() -> list[tuple[str, Executable]]:
    out: list[tuple[str, Executable]] = []
    for module in (queries, conversation, junk, lettering, record, respond, plan_marks):
        assert isinstance(module, types.ModuleType)
        for name, value in vars(module).items():
            if isinstance(value, (sa.Select, sa.Update, sa.Delete, sa.Insert)):
                out.append((f"{module.__name__}.{name}", value))
    return out


STATEMENTS = _statements()
#: Statements only PostgreSQL runs (its advisory locks; SQLite's writers are serialised).
POSTGRES_ONLY = {"gateway.store.queries._ADVISORY_LOCK"}


def _value(bp: Any) -> Any:
    """A parameter value of the bind's type (an IN list for an expanding one)."""
    py: Any
    try:
        py = getattr(bp.type, "impl", bp.type).python_type
    except NotImplementedError:
        py = str
    one: Any = {int: 1, bool: True, datetime: NOW}.get(py, "someone@example.com")
    return [one, 2] if bp.expanding and py is int else [one] if bp.expanding else one


@pytest.fixture
def session(db: Engine) -> Iterator[Session]:
    with Session(db, expire_on_commit=False) as s:
        _seed(s)
        yield s
        s.rollback()


def _seed(s: Session) -> None:
    cid = core.insert(s, Customer, name="C", created_at=NOW)
    core.insert(s, CustomerAddress, customer_id=cid, address="someone@example.com", created_at=NOW)
    t = core.insert_attached(
        s,
        Ticket(
            ref="T-1",
            subject="s",
            customer_id=cid,
            requester="someone@example.com",
            created_at=NOW,
            updated_at=NOW,
            first_response_due=NOW + timedelta(hours=1),
        ),
    )
    assert t.id is not None
    core.insert(
        s,
        Outbox,
        ticket_id=t.id,
        kind="ack",
        mail_from="",
        rcpt_tos='["someone@example.com"]',
        message_id="someone@example.com",
        raw=b"raw",
        created_at=NOW,
        next_attempt_at=NOW,
    )
    m = core.insert(
        s,
        Message,
        ticket_id=t.id,
        direction="in",
        message_id="someone@example.com",
        dedupe_key="someone@example.com",
        raw_sha256="h",
        raw=b"x",
        at=NOW,
    )
    core.insert_many(s, MessageRef, [{"message_id": m, "ref": "someone@example.com"}])
    queries.add_participant(s, t.id, "someone@example.com", "requester", NOW)
    core.insert(s, BlockedSender, address="someone@example.com", blocked_at=NOW, by="x")


def _norm(calls: list[Any]) -> list[Any]:
    """Comparable driver calls: psycopg's Binary wrappers compare by identity."""

    def value(v: Any) -> Any:
        return ("Binary", v.obj) if type(v).__name__ == "Binary" else v

    def params(p: Any) -> Any:
        if isinstance(p, dict):
            return {k: value(v) for k, v in p.items()}
        if isinstance(p, list):
            return [params(x) for x in p]
        return tuple(value(v) for v in p)

    return [(sql, params(p)) for sql, p in calls]


def _sqlalchemy(s: Session, stmt: Executable, params: Any) -> tuple[list[Any], Any]:
    """What SQLAlchemy's own execution hands the cursor, and its result."""
    seen: list[Any] = []

    def spy(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        seen.append((statement, parameters))

    engine = s.get_bind()
    event.listen(engine, "before_cursor_execute", spy)
    try:
        result = s.connection().execute(stmt, params)
        rows = result.all() if result.returns_rows else None
    finally:
        event.remove(engine, "before_cursor_execute", spy)
    return seen, rows


@pytest.mark.parametrize(("name", "stmt"), STATEMENTS, ids=[n for n, _ in STATEMENTS])
def test_driver_sees_what_sqlalchemy_gives_it(session: Session, name: str, stmt: Any) -> None:
    conn = session.connection()
    if name in POSTGRES_ONLY and conn.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL-only statement")
    compiled = stmt.compile(dialect=conn.dialect)
    params = {bp.key: _value(bp) for bp in compiled.binds.values() if bp.required}
    keys = None if isinstance(stmt, sa.Select) else tuple(sorted(params))
    plan = core._plan_for(conn, stmt, keys, False)
    assert plan is not None, name
    fast = core._bound(plan, params)
    seen, slow_rows = _sqlalchemy(session, stmt, params)
    assert _norm(seen) == _norm([fast]), name
    if slow_rows is not None:
        rows = core.read(session, stmt, params).all()
        assert [tuple(r) for r in rows] == [tuple(r) for r in slow_rows], name
        assert [r._mapping.keys() for r in rows] == [r._mapping.keys() for r in slow_rows]


def test_reads_return_processed_values(session: Session) -> None:
    """A datetime column comes back a datetime (SQLite stores text), as through SQLAlchemy."""
    stmt = conversation._SENT_BY_TICKET
    ticket = session.connection().execute(sa.select(core.table(Ticket).c.id)).scalar_one()
    rows = core.read(session, stmt, {"tickets": [ticket]}).all()
    _, slow = _sqlalchemy(session, stmt, {"tickets": [ticket]})
    assert rows == slow
    assert isinstance(rows[0][0], datetime)
    # An empty IN list: SQLAlchemy's own rendering.
    assert core.read(session, stmt, {"tickets": []}).all() == []


def _insert_seen(s: Session, model: Any, row: dict[str, Any], many: bool = False) -> Any:
    conn = s.connection()
    rows = [row, row] if many else [row]
    full = [core._row(model, r) for r in rows]
    plan = core._plan_for(conn, core._insert_stmt(model), tuple(sorted(full[0])), many)
    assert plan is not None
    seen, _ = _sqlalchemy(s, core._insert_stmt(model), full if many else full[0])
    bound = [core._bound(plan, r) for r in full]
    return seen, bound


@pytest.mark.parametrize(
    ("model", "row"),
    [
        (Event, {"ticket_id": None, "at": NOW, "type": "x", "detail": "d", "data": "{}"}),
        (Customer, {"name": "n", "created_at": NOW}),
        (
            Outbox,
            {
                "kind": "ack",
                "mail_from": "",
                "rcpt_tos": "[]",
                "message_id": "m",
                "raw": b"r",
                "created_at": NOW,
                "next_attempt_at": NOW,
            },
        ),
    ],
)
def test_inserts_match(session: Session, model: Any, row: dict[str, Any]) -> None:
    seen, bound = _insert_seen(session, model, row)
    assert _norm(seen) == _norm(bound)
    # The same row written both ways reads back the same (ids aside).
    fast_id = core.insert(session, model, **row)
    slow_id = session.connection().execute(core._insert_stmt(model), core._row(model, row))
    t = core.table(model)
    key = slow_id.inserted_primary_key
    assert key is not None
    a, b = (
        session.connection().execute(sa.select(t).where(t.c.id == i)).one()._asdict()
        for i in (fast_id, key[0])
    )
    assert {**a, "id": 0} == {**b, "id": 0}


def test_executemany_matches(session: Session) -> None:
    """SQLite: the executemany the driver gets is SQLAlchemy's. PostgreSQL: one INSERT of
    every row's values, as SQLAlchemy executes that statement (psycopg's executemany would
    run one per row); on both, the rows read back as written."""
    row = {"ticket_id": None, "message_id": None, "at": NOW, "type": "x", "detail": "d"}
    if session.get_bind().dialect.name == "sqlite":
        seen, bound = _insert_seen(session, Event, row, many=True)
        assert _norm(seen) == _norm([(bound[0][0], [b[1] for b in bound])])
    else:
        full = [core._row(Event, {**row, "type": f"row-{i}"}) for i in range(3)]
        keys = tuple(sorted(full[0]))
        stmt = core._multi_row_insert(Event, keys, 3)
        values = {f"{k}_{i}": r[k] for i, r in enumerate(full) for k in keys}
        plan = core._plan_for(session.connection(), stmt, None, False)
        assert plan is not None
        seen, _ = _sqlalchemy(session, stmt, values)
        assert _norm(seen) == _norm([core._bound(plan, values)])
        assert seen[0][0].count("VALUES") == 1
    t = core.table(Event)
    core.insert_many(session, Event, [{**row, "type": "many-1"}, {**row, "type": "many-2"}])
    got = session.connection().execute(
        sa.select(t.c.type, t.c.detail, t.c.data).where(t.c.type.like("many-%")).order_by(t.c.id)
    )
    assert [tuple(r) for r in got] == [("many-1", "d", "{}"), ("many-2", "d", "{}")]


def test_insert_attached_left_out_defaults(session: Session) -> None:
    """A None with a column default is left out of the INSERT; SQLAlchemy binds the default
    (prefetch), and so does the plan."""
    t = Ticket(ref="T-2", created_at=NOW, updated_at=NOW)
    core.insert_attached(session, t)
    got = (
        session.connection()
        .execute(sa.select(core.table(Ticket)).where(core.table(Ticket).c.id == t.id))
        .one()
    )
    assert got.status == "open"
    assert got.priority == "normal"
    assert got.acknowledged is False


def _write_seen(s: Session, stmt: Any, params: dict[str, Any]) -> None:
    conn = s.connection()
    plan = core._plan_for(conn, stmt, tuple(sorted(params)), False)
    assert plan is not None
    seen, _ = _sqlalchemy(s, stmt, params)
    assert _norm(seen) == _norm([core._bound(plan, params)])


def test_upserts_and_writes(session: Session) -> None:
    part = core.per_dialect(session, "add_participant", queries._participant_upsert)
    values = {"ticket_id": 1, "address": "b@example.com", "role": "cc", "added_at": NOW}
    _write_seen(session, part, values)
    cursor = core.per_dialect(session, "set_cursor", queries._cursor_upsert)
    _write_seen(session, cursor, {"route": "q", "person": "p", "updated_at": NOW})
    _write_seen(session, record._SET_REF, {"tid": 1, "ref": "X"})
    _write_seen(session, plan_marks.UNPLAN, {"ids": [1, 2]})
    assert queries.add_participant(session, 1, "a@example.com", "cc", NOW)
    assert not queries.add_participant(session, 1, "a@example.com", "cc", NOW)
    queries.set_cursor(session, "r", "p1", NOW)
    queries.set_cursor(session, "r", "p2", NOW)
    assert queries.assignment_cursors(session) == {"q": "p", "r": "p2"}
    assert core.write(session, record._SET_REF, {"tid": 10**9, "ref": "X"}) == 0
    assert core.write(session, record._SET_REF, {"tid": 1, "ref": "T-9"}) == 1


def test_driver_errors_are_wrapped(session: Session) -> None:
    """A constraint violation raises SQLAlchemy's IntegrityError, as before (the worker's
    fault handling reads those)."""
    with pytest.raises(exc.IntegrityError):
        core.insert(
            session, CustomerAddress, customer_id=1, address="someone@example.com", created_at=NOW
        )


def test_parameter_errors_are_wrapped(session: Session) -> None:
    """A value its type cannot bind: SQLAlchemy's StatementError, as before."""
    with pytest.raises(exc.StatementError):
        core.insert(session, Event, ticket_id=None, at="not a time", type="x", detail="d")
    with pytest.raises(exc.StatementError):
        core.insert_many(session, Event, [{"at": "not a time", "type": "x"}] * 2)


def test_watched_connection_takes_sqlalchemys_path(session: Session) -> None:
    """Statement listeners (bench/pipeline.py --sql, statement-counting tests) see every
    statement."""
    seen: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", spy)
    try:
        core.read(session, queries._CUSTOMER_OF, {"address": "x"}).first()
        core.insert(session, Customer, name="n", created_at=NOW)
    finally:
        event.remove(engine, "before_cursor_execute", spy)
    assert len(seen) == 2


def _flushed_sql(s: Session, do: Any) -> list[str]:
    seen: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    engine = s.get_bind()
    event.listen(engine, "before_cursor_execute", spy)
    try:
        do()
        s.flush()
    finally:
        event.remove(engine, "before_cursor_execute", spy)
    return seen


def test_update_attached_writes_what_a_flush_wrote(session: Session) -> None:
    a = core.insert_attached(session, Ticket(ref="A-1", created_at=NOW, updated_at=NOW))
    b = core.insert_attached(session, Ticket(ref="B-1", created_at=NOW, updated_at=NOW))

    def orm() -> None:
        a.language, a.brand = "de", "acme"
        session.add(a)

    def by_core() -> None:
        core.update_attached(session, b, language="de", brand="acme")

    assert not inspect(b).modified
    assert _flushed_sql(session, orm) == _flushed_sql(session, by_core)
    assert not inspect(b).modified
    assert not session.dirty
    assert (b.language, b.brand) == ("de", "acme")
    t = core.table(Ticket)
    row = session.connection().execute(sa.select(t.c.language, t.c.brand).where(t.c.id == b.id))
    assert tuple(row.one()) == ("de", "acme")
    # A value it already holds: nothing written, as the ORM writes nothing.
    assert _flushed_sql(session, lambda: core.update_attached(session, b, language="de")) == []


def test_update_attached_leaves_hooked_columns_to_the_orm(session: Session) -> None:
    """A change the escalation plan depends on must clear escalate_at (plan_marks' flush
    hook): it goes through the unit of work."""
    t = core.insert_attached(
        session, Ticket(ref="C-1", created_at=NOW, updated_at=NOW, escalate_at=NOW)
    )
    core.update_attached(session, t, status="waiting")
    assert inspect(t).modified
    session.flush()
    assert t.escalate_at is None


def _state(obj: Any) -> dict[str, Any]:
    st = inspect(obj)
    return {
        "dict": {k: v for k, v in vars(obj).items() if k not in ("_sa_instance_state", "id")},
        "fields_set": obj.__pydantic_fields_set__,
        "extra": obj.__pydantic_extra__,
        "private": obj.__pydantic_private__,
        "committed": dict(st.committed_state),
        "modified": st.modified,
        "persistent": st.persistent,
        "unloaded": st.unloaded,
    }


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (Ticket, {"ref": "N-1", "subject": "s", "created_at": NOW, "updated_at": NOW}),
        (Ticket, {"ref": "N-2", "created_at": NOW, "updated_at": NOW, "route": None}),
        (
            Message,
            {
                "ticket_id": None,
                "direction": "in",
                "message_id": "<m@x>",
                "dedupe_key": "k",
                "raw_sha256": "h",
                "raw": b"raw",
                "at": NOW,
                "references": "",
            },
        ),
    ],
)
def test_insert_new_is_the_constructed_object(
    session: Session, model: Any, values: dict[str, Any]
) -> None:
    """What `insert_new` attaches is what constructing the model and `insert_attached`
    attached: the same attributes, pydantic state and ORM state, and the same row."""
    t = core.table(model)

    def row(obj: Any) -> dict[str, Any]:
        got = session.connection().execute(sa.select(t).where(t.c.id == obj.id)).one()
        return {**got._asdict(), "id": 0}

    savepoint = session.begin_nested()
    built = core.insert_attached(session, model(**values))
    expected, expected_row = _state(built), row(built)
    savepoint.rollback()
    session.expunge(built)
    fast = core.insert_new(session, model, **values)
    assert type(fast) is model
    assert _state(fast) == expected
    assert fast in session
    assert row(fast) == expected_row
    # Later changes are tracked as usual.
    if model is Message:
        fast.kind = "note"
    else:
        fast.status = "waiting"
    assert inspect(fast).modified


def test_insert_new_first_thing_a_process_does(tmp_path: Any) -> None:
    """Before any query has configured the mappers (a fresh pipeline process)."""
    code = (
        "from datetime import UTC, datetime\n"
        "from sqlmodel import Session\n"
        "from gateway.store import core\n"
        "from gateway.store.db import open_database\n"
        "from gateway.store.models import Ticket\n"
        f"engine = open_database('sqlite:///{tmp_path}/fresh.db')\n"
        "now = datetime.now(UTC)\n"
        "with Session(engine) as s:\n"
        "    t = core.insert_new(s, Ticket, ref='F-1', created_at=now, updated_at=now)\n"
        "    assert t.id and t.ref == 'F-1' and t.status == 'open', t\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def _ticket(s: Session, ref: str) -> Ticket:
    return core.insert_new(s, Ticket, ref=ref, created_at=NOW, updated_at=NOW, escalate_at=NOW)


def test_flush_changes_writes_what_the_flush_wrote(session: Session) -> None:
    a, b = _ticket(session, "FA-1"), _ticket(session, "FB-1")

    def orm() -> None:
        a.acknowledged = True
        session.add(a)

    def by_core() -> None:
        b.acknowledged = True
        session.add(b)
        core.flush_changes(session)

    assert _flushed_sql(session, orm) == _flushed_sql(session, by_core)
    assert not inspect(b).modified
    assert not session.dirty
    t = core.table(Ticket)
    stored = session.connection().execute(sa.select(t.c.acknowledged).where(t.c.id == b.id))
    assert stored.scalar_one() is True
    assert _state(a) | {"dict": None} == _state(b) | {"dict": None}

    # Set to what it holds: nothing written, nothing pending.
    def same() -> None:
        b.acknowledged = True
        core.flush_changes(session)

    assert _flushed_sql(session, same) == []
    assert not inspect(b).modified


def test_flush_changes_leaves_the_rest_to_the_orm(session: Session) -> None:
    t = _ticket(session, "FC-1")
    t.status = "waiting"  # a plan column: the flush hook clears escalate_at with it
    core.flush_changes(session)
    assert t.escalate_at is None
    assert not inspect(t).modified
    u, v = _ticket(session, "FD-1"), _ticket(session, "FE-1")
    u.acknowledged = v.acknowledged = True  # two objects: the unit of work orders them
    core.flush_changes(session)
    assert not session.dirty
    session.add(Ticket(ref="FF-1", created_at=NOW, updated_at=NOW))
    u.language = "fr"
    core.flush_changes(session)
    assert not session.new
    assert not session.dirty


def test_in_lists_of_every_length(session: Session) -> None:
    """The expansion remembered per list length gives SQLAlchemy's statement each time."""
    conn = session.connection()
    stmt = conversation._OPEN_IDS
    plan = core._plan_for(conn, stmt, None, False)
    assert plan is not None
    for ids in ([1], [1, 2], [3], [1, 2, 3], [2, 1]):
        seen, slow = _sqlalchemy(session, stmt, {"ids": ids})
        assert _norm(seen) == _norm([core._bound(plan, {"ids": ids})])
        assert core.read(session, stmt, {"ids": ids}).all() == slow


def test_insert_two_writes_both_rows_and_returns_the_first_id(session: Session) -> None:
    """`insert_two`: one statement on PostgreSQL (two data-modifying CTEs), two on SQLite;
    either way both rows are there with the values given (defaults filled in), and the id
    returned is the first row's."""
    out = {
        "kind": "ack",
        "mail_from": "",
        "rcpt_tos": '["x@example.org"]',
        "message_id": "<two@example.com>",
        "raw": b"raw two",
        "created_at": NOW,
        "next_attempt_at": NOW,
    }
    msg = {
        "direction": "out",
        "kind": "ack",
        "message_id": "<two@example.com>",
        "dedupe_key": "out:<two@example.com>",
        "raw_sha256": "h2",
        "raw": b"raw two",
        "at": NOW,
    }
    new_id = core.insert_two(session, (Outbox, out), (Message, msg))
    t, m = core.table(Outbox), core.table(Message)
    conn = session.connection()
    got = conn.execute(
        sa.select(t.c.id, t.c.state, t.c.raw).where(t.c.message_id == "<two@example.com>")
    )
    assert [tuple(r) for r in got] == [(new_id, "queued", b"raw two")]
    rows = conn.execute(sa.select(m.c.dedupe_key, m.c.text).where(m.c.raw_sha256 == "h2")).all()
    assert [tuple(r) for r in rows] == [("out:<two@example.com>", "")]
