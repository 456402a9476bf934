"""Core statements for the pipeline's hot path: reads and inserts without the ORM's cost.

Why (docs/performance.md §7): every new ticket runs about 35 statements. Through the ORM each
costs 260-400 µs of CPU on SQLite (building the statement: ~130 µs of argument coercion;
ORM execution context, autoflush, entity loading; and for an insert constructing the
SQLModel object, whose pydantic validation runs per field, then a unit-of-work flush).
The same statement built once at import and executed as Core costs 45-65 µs. At 100 new
customers a second that difference is most of a core.

The rules callers keep:

- Statements are module-level constants with `bindparam`s (an `IN` list is an
  ``expanding`` bindparam): building one per call gives back most of the saving.
- `read` flushes the session first. A Core statement does not autoflush, and a read must
  see what this transaction added through the ORM (the ticket created a stage earlier).
- `insert` and `insert_many` flush too (a row may name one the ORM holds) and bypass the
  identity map: use them for rows this transaction will not read back as ORM objects
  (the audit trail, the outbox, participants); a later ORM query still finds them, since
  they are in the same transaction.
- Values not given take the model's own defaults (`defaults`), exactly as constructing
  the model would.
- `insert_attached` is for a row the transaction goes on to change as an ORM object (the
  new ticket, the inbound message): the model object is built as before, written by Core,
  then attached to the session as if the ORM had flushed it, so the identity map holds
  exactly that instance and later changes to it are tracked as usual.
  `insert_new` builds that object itself, without the model constructor's cost.
- `update_attached` and `flush_changes` write a persistent object's changed columns by
  one Core UPDATE (the statement the unit of work writes) where no flush hook watches them
  (`HOOKED`): a unit-of-work flush of one changed ticket costs ~0.3 ms of CPU.
- A statement whose text depends on the dialect (an upsert) is cached per dialect name
  (`per_dialect`).

Even a prebuilt statement costs SQLAlchemy ~20 µs of Python per execution on SQLite (cache
key, execution context, parameter processing, result metadata) around ~5 µs in the driver:
about a tenth of the pipeline's CPU per new ticket (33 statements). So each statement is
compiled once per dialect (and, for DML, per set of keys given) into a `_Plan`: its SQL
text, the order of its parameters, their type processors and those of its result columns,
exactly as SQLAlchemy would use them. `_run` hands the text and processed parameters straight to the
DBAPI cursor of the session's connection. The driver sees the same statement and the same
parameters (tests/unit/test_store_core.py compares them with SQLAlchemy's own, on SQLite and
PostgreSQL); a driver error goes through SQLAlchemy's handler, so it is wrapped (and a lost
connection invalidated) as before. `insert_many` on PostgreSQL writes its rows with one
multi-row INSERT of their values (psycopg's executemany runs a statement per row). What the
plan does not cover (an IN list given empty) and any connection someone watches
(``before_cursor_execute`` listeners, echo: the statement counts of bench/pipeline.py --sql,
tests counting statements) take SQLAlchemy's path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache, lru_cache
from typing import Any, TypeGuard, TypeVar, cast

from pydantic_core import PydanticUndefined
from sqlalchemy import Table, bindparam, inspect, select, update
from sqlalchemy.engine import Connection, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.sql import Executable
from sqlmodel import Session, SQLModel

M = TypeVar("M", bound=SQLModel)

#: The primary key column every table of ours has (`id`, integer, assigned by the database).
PK = "id"


def table(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel class (typed: SQLModel declares it as a ClassVar)."""
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


@cache
def defaults(model: type[SQLModel]) -> Mapping[str, Any]:
    """The model's field defaults, as constructing it would apply them (the id left to the
    database)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name == PK or field.default is PydanticUndefined:
            continue
        out[name] = field.default
    return out


def read(
    session: Session, stmt: Executable, params: Mapping[str, Any] | None = None
) -> Result[*tuple[Any, ...]]:
    """Execute a prebuilt read (or a write whose RETURNING rows are wanted) in the session's
    transaction, after flushing what the ORM holds (Core statements skip autoflush). Its rows
    are typed as tuples of any length."""
    session.flush()
    conn = session.connection()
    values = dict(params or {})
    # A write (RETURNING) is compiled for the keys given, as SQLAlchemy compiles DML.
    keys = tuple(sorted(values)) if getattr(stmt, "is_dml", False) else None
    plan = _plan_for(conn, stmt, keys, False)
    if plan is not None and plan.rows is not None:
        done = _run(conn, plan, values)
        if done is not None:
            return IteratorResult(plan.rows, iter(_rows(plan, done)))
    return conn.execute(stmt, values)


def write(session: Session, stmt: Executable, params: Mapping[str, Any] | None = None) -> int:
    """Execute a prebuilt UPDATE, DELETE or upsert; the number of rows it touched. The session is
    flushed first so that the statement applies after what the ORM holds."""
    session.flush()
    return _write_on(session.connection(), stmt, dict(params or {}))


def _plain_write(plan: _Plan | None) -> TypeGuard[_Plan]:
    """A plan of a write that returns no rows (the plan's own path runs it)."""
    return plan is not None and plan.metadata is None and not plan.returning


def _write_on(conn: Connection, stmt: Executable, values: dict[str, Any]) -> int:
    """`write` on `conn` without the flush; the number of rows touched."""
    # Compiled for the keys given, as SQLAlchemy compiles DML: they choose an INSERT's
    # columns and may add to an UPDATE's SET.
    plan = _plan_for(conn, stmt, tuple(sorted(values)), False)
    if _plain_write(plan):
        done = _run(conn, plan, values)
        if done is not None:
            rowcount = done.rowcount
            done.close()
            return int(rowcount or 0)
    result = conn.execute(stmt, values)
    return int(getattr(result, "rowcount", 0) or 0)


def _row(model: type[SQLModel], values: Mapping[str, Any]) -> dict[str, Any]:
    row = {**defaults(model), **values}
    if row.get(PK) is None:
        row.pop(PK, None)
    return row


#: Builds the INSERT of one row for the names of the values it is given (`insert_new`); the
#: statement returns the new id as its first column.
Inserter = Callable[[tuple[str, ...]], Executable]


def _insert_one(
    session: Session, model: type[SQLModel], row: dict[str, Any], inserter: Inserter | None = None
) -> int:
    """INSERT `row` (flushed first), by the model's INSERT or `inserter`'s; the new id."""
    session.flush()
    conn = session.connection()
    if inserter is not None:  # the caller's statement, complete as built: no keys to choose
        stmt, keys = inserter(tuple(sorted(row))), None
    else:
        stmt, keys = _insert_stmt(model), tuple(sorted(row))
    plan = _plan_for(conn, stmt, keys, False)
    if plan is not None and plan.metadata is None:
        done = _run(conn, plan, row)
        if done is not None:
            if plan.returning:
                fetched = done.fetchone()
                assert fetched is not None
                new_id = fetched[0]
            else:
                new_id = done.lastrowid
            done.close()
            return int(new_id)
    result = conn.execute(stmt, row)
    if inserter is not None:
        return int(result.scalar_one())
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def insert(session: Session, model: type[SQLModel], **values: Any) -> int:
    """INSERT one row of `model` (defaults filled in); its new id."""
    return _insert_one(session, model, _row(model, values))


def insert_many(session: Session, model: type[SQLModel], rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT several rows of `model` in one executemany, or on PostgreSQL one INSERT of all
    of them (ids not returned). Every row must name the same columns (the defaults fill the
    rest)."""
    if not rows:
        return
    session.flush()
    conn = session.connection()
    stmt = _insert_stmt(model)
    full = [_row(model, r) for r in rows]
    if len(full) > 1:
        keys = tuple(sorted(full[0]))
        done = None
        if conn.dialect.name == "sqlite":
            plan = _plan_for(conn, stmt, keys, True)
            if _plain_write(plan):
                done = _run_many(conn, plan, full)
        elif len(full) * len(keys) <= _MULTI_ROW_PARAMS:
            # One INSERT of every row (one statement) instead of the driver's executemany
            # (a statement per row, pipelined), ~0.3 ms less per new ticket (its events).
            plan = _plan_for(conn, _multi_row_insert(model, keys, len(full)), None, False)
            if _plain_write(plan):
                values = {f"{k}_{i}": row[k] for i, row in enumerate(full) for k in keys}
                done = _run(conn, plan, values)
        if done is not None:
            done.close()
            return
    conn.execute(stmt, full if len(full) > 1 else full[0])


@cache
def _insert_stmt(model: type[SQLModel]) -> Executable:
    return table(model).insert()


def insert_two(
    session: Session,
    first: tuple[type[SQLModel], Mapping[str, Any]],
    second: tuple[type[SQLModel], Mapping[str, Any]],
) -> int:
    """INSERT a row of each of two models (defaults filled in, as `insert`); the first's new
    id. On PostgreSQL by one statement, the two INSERTs as data-modifying CTEs (each runs
    once, to completion, whether or not the query reads it): one round trip where there
    were two, for rows written together (a queued mail's outbox row and its message row)."""
    (model_a, values_a), (model_b, values_b) = first, second
    if session.get_bind().dialect.name != "postgresql":
        new_id = insert(session, model_a, **values_a)
        insert(session, model_b, **values_b)
        return new_id
    row_a, row_b = _row(model_a, values_a), _row(model_b, values_b)
    stmt = _two_inserts(model_a, tuple(sorted(row_a)), model_b, tuple(sorted(row_b)))
    params = {**{f"a_{k}": v for k, v in row_a.items()}, **{f"b_{k}": v for k, v in row_b.items()}}
    row = read(session, stmt, params).first()
    assert row is not None
    return int(row[0])


@lru_cache(maxsize=64)
def _two_inserts(
    model_a: type[SQLModel],
    keys_a: tuple[str, ...],
    model_b: type[SQLModel],
    keys_b: tuple[str, ...],
) -> Executable:
    """``WITH a AS (INSERT ... RETURNING id), b AS (INSERT ...) SELECT id FROM a``, the
    values of `model_a`'s row bound as ``a_<column>``, `model_b`'s as ``b_<column>``."""
    ta, tb = table(model_a), table(model_b)
    a = (
        ta.insert()
        .values({k: bindparam(f"a_{k}", type_=ta.c[k].type) for k in keys_a})
        .returning(ta.c[PK])
        .cte("a")
    )
    b = tb.insert().values({k: bindparam(f"b_{k}", type_=tb.c[k].type) for k in keys_b}).cte("b")
    return select(a.c[PK]).add_cte(b)


#: The most parameters one multi-row INSERT binds (PostgreSQL's protocol allows 65,535).
_MULTI_ROW_PARAMS = 30_000


@lru_cache(maxsize=256)
def _multi_row_insert(model: type[SQLModel], keys: tuple[str, ...], rows: int) -> Executable:
    """INSERT of `rows` rows of `keys`, row i's value of k bound as ``k_i``."""
    t = table(model)
    return t.insert().values(
        [{k: bindparam(f"{k}_{i}", type_=t.c[k].type) for k in keys} for i in range(rows)]
    )


def insert_attached(session: Session, obj: M, inserter: Inserter | None = None) -> M:
    """INSERT the new (transient) model object `obj` by Core, set its id, and attach it to
    the session as a persistent, unmodified instance: what `session.add(obj); session.flush()`
    leaves, without the unit of work's cost. The values written are the object's own, a
    None left out where the column has a default of its own, as the ORM's flush does.

    `inserter` (see `Inserter`) writes the row by a statement of the caller's, such as one
    that computes a column from the id it assigns (the ticket's ref on PostgreSQL)."""
    values: dict[str, Any] = {}
    for column in table(type(obj)).columns:
        value = getattr(obj, column.key)
        if value is None and (column.primary_key or column.default is not None):
            continue
        values[column.key] = value
    setattr(obj, PK, _insert_one(session, type(obj), values, inserter))
    # Every attribute the constructor set now counts as loaded, with no pending change.
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


def insert_new(
    session: Session, model: type[M], inserter: Inserter | None = None, **values: Any
) -> M:
    """`insert_attached` of a `model(**values)` built without the constructor's cost.

    A table model's constructor validates nothing (SQLModel), but sets each of its ~25
    fields through SQLAlchemy's attribute instrumentation and pydantic's `__setattr__`,
    recording a pending change per field (~100 µs for a ticket), only for
    `insert_attached` to discard those changes at once. This fills the instance's
    dictionary with what the constructor would set (the given fields, then the defaults
    of the others; a required one not given stays unset, as there) and the same
    `__pydantic_fields_set__`; the result, once attached, is indistinguishable
    (tests/unit/test_store_core.py). Models with relationships use the constructor."""
    if getattr(model, "__sqlmodel_relationships__", None):
        return insert_attached(session, model(**values), inserter)
    obj: M = _manager(model).new_instance()
    fields = model.model_fields
    given = {k: v for k, v in values.items() if k in fields}
    state = obj.__dict__
    state.update(given)
    for name, field in fields.items():
        if name not in given and not field.is_required():
            state[name] = field.get_default(call_default_factory=True)
    object.__setattr__(obj, "__pydantic_fields_set__", set(given))
    return insert_attached(session, obj, inserter)


@cache
def _manager(model: type[SQLModel]) -> Any:
    """The model's class manager, its mapper configured (as the constructor would see to:
    an attribute has no implementation before)."""
    configure_mappers()
    return manager_of_class(model)


#: Columns an ORM flush hook reacts to, per model (registered by gateway/store/plan_marks.py):
#: `update_attached` leaves a change to one of them to the unit of work, whose hook then
#: writes what goes with it.
HOOKED: dict[type[SQLModel], set[str]] = {}


def update_attached(session: Session, obj: SQLModel, **values: Any) -> None:
    """Set attributes of the persistent object `obj` and write them at once by one Core
    UPDATE, leaving them loaded with no pending change: what setting them and flushing does,
    without the unit of work's cost (~0.3 ms of CPU for one changed row). An attribute
    already holding its value is left out, as the ORM leaves it. An object with other
    changes pending, or a column a flush hook watches (`HOOKED`), goes to the ORM as before
    (one UPDATE with the rest, at the next flush)."""
    state = inspect(obj)
    model = type(obj)
    hooked = HOOKED.get(model, ())
    if not state.persistent or state.modified or any(k in hooked for k in values):
        for key, value in values.items():
            setattr(obj, key, value)
        session.add(obj)
        return
    loaded = state.dict
    changed = {k: v for k, v in values.items() if k not in loaded or loaded[k] != v}
    if not changed:
        return
    session.flush()  # as `write`: what the ORM holds goes first
    _update_row(session.connection(), obj, changed)
    for key, value in changed.items():
        set_committed_value(obj, key, value)


def flush_changes(session: Session) -> None:
    """Flush the session; when all it holds pending is changed columns of one persistent
    object that no flush hook watches (`HOOKED`), by one Core UPDATE of those columns (the
    statement the unit of work writes, in the same place), then counting them as loaded
    as its flush does. Anything else goes to the ORM's flush.

    For a stage that sets a ticket attribute right before an INSERT (the acknowledgement
    sets ``acknowledged``, then records its promise): ~0.3 ms of CPU less. Like the
    other writes here, a rollback does not expire the object; the pipeline discards its
    session after one."""
    if session.new or session.deleted:
        session.flush()
        return
    dirty = list(session.dirty)
    if len(dirty) != 1 or not isinstance(dirty[0], SQLModel):
        session.flush()
        return
    obj = dirty[0]
    state = inspect(obj)
    model = type(obj)
    hooked = HOOKED.get(model, ())
    columns = table(model).c
    loaded = state.dict
    changed: dict[str, Any] = {}
    for key, old in state.committed_state.items():
        if key in hooked or key not in columns or key not in loaded or key == PK:
            session.flush()
            return
        if old is NO_VALUE or old != loaded[key]:
            changed[key] = loaded[key]
    if not state.persistent:
        session.flush()
        return
    if changed:
        _update_row(session.connection(), obj, changed)
    # What the unit of work does to a flushed object: its values are the committed ones.
    state._commit_all(loaded, session.identity_map)


def _update_row(conn: Connection, obj: SQLModel, changed: dict[str, Any]) -> None:
    """UPDATE the `changed` columns of `obj`'s row by its id (the unit of work's statement);
    a row that is not there is the ORM's StaleDataError."""
    model = type(obj)
    stmt = _update_stmt(model, tuple(c.key for c in table(model).columns if c.key in changed))
    if _write_on(conn, stmt, {**changed, _pk_param(model): getattr(obj, PK)}) != 1:
        raise StaleDataError(f"UPDATE of {model.__name__} {getattr(obj, PK)} matched no row")


def _pk_param(model: type[SQLModel]) -> str:
    """The bind name of the id in `update_attached`'s statements: the ORM's (``ticket_id``),
    so PostgreSQL sees the same text, unless a column has that name."""
    t = table(model)
    name = f"{t.name}_{PK}"
    return name if name not in t.c else "pk_"


@cache
def _update_stmt(model: type[SQLModel], columns: tuple[str, ...]) -> Executable:
    """UPDATE `columns` (in the table's order, as the ORM writes them) of the row by id."""
    t = table(model)
    where = t.c[PK] == bindparam(_pk_param(model))
    return update(t).where(where).values({c: bindparam(c) for c in columns})


# ------------------------------------------------------------------ straight to the driver


class _Plan:
    """One statement compiled for one dialect (and, for an INSERT, one set of columns): what
    SQLAlchemy's execution would hand the DBAPI cursor, worked out once."""

    __slots__ = (
        "binds",
        "compiled",
        "expanded",
        "expanding",
        "metadata",
        "order",
        "results",
        "returning",
        "rows",
        "sql",
        "statics",
    )

    def __init__(self, compiled: Any, many: bool) -> None:
        self.compiled = compiled
        self.sql: str = compiled.string
        #: Parameter names in placeholder order (qmark), or None for named (pyformat).
        self.order: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positional else None
        )
        if compiled.escaped_bind_names or compiled.literal_execute_params:
            raise _Unplanned("escaped or literal parameters")
        if any(bp.callable is not None for bp in compiled.bind_names):
            raise _Unplanned("callable parameter values")
        #: The values bound in the statement itself (``kind != 'junk'``), and None for those
        #: the caller gives (`construct_params` fills both as execution does).
        self.statics: dict[str, Any] = dict(compiled.construct_params(_check=False))
        for column in getattr(compiled, "insert_prefetch", ()):
            # A column left out whose model default is a plain value: SQLAlchemy computes it
            # before the INSERT and binds it like a given one.
            default = column.default
            if default is None or not default.is_scalar:
                raise _Unplanned("a computed column default")
            self.statics[column.key] = default.arg
        if getattr(compiled, "postfetch", None) or getattr(compiled, "update_prefetch", None):
            raise _Unplanned("server-side or update defaults")
        self.binds: dict[str, Callable[[Any], Any]] = dict(compiled._bind_processors)
        if any(not callable(p) for p in self.binds.values()):
            raise _Unplanned("tuple parameters")
        #: The IN lists' parameter names (expanding binds), and per list lengths what
        #: SQLAlchemy's expansion made of the statement (`_bound`).
        self.expanding: tuple[str, ...] = tuple(
            compiled.bind_names[bp] for bp in compiled.post_compile_params
        )
        self.expanded: dict[tuple[int, ...], Any] = {}
        if any(bp.literal_execute or not bp.expanding for bp in compiled.post_compile_params):
            raise _Unplanned("a parameter rendered into the SQL")
        if self.expanding and many:
            raise _Unplanned("an IN list in an executemany")
        self.returning: bool = (
            bool(getattr(compiled, "returning", None)) and not compiled.statement.is_select
        )
        columns = compiled._result_columns if compiled.statement.is_select else []
        #: Row metadata shared by every result of a read (None for DML).
        self.metadata = SimpleResultMetaData([c.keyname for c in columns]) if columns else None
        if self.returning:
            # A write's RETURNING rows, read by `read` (an upsert that says what it did).
            columns = compiled._result_columns
        #: The metadata of the rows `read` hands back: a read's, or a write's RETURNING.
        self.rows = SimpleResultMetaData([c.keyname for c in columns]) if columns else None
        #: Result column types; their processors are looked up once the driver names the
        #: column types (as SQLAlchemy's result does: PostgreSQL's depend on them).
        self.results: Any = [c.type for c in columns]


class _Unplanned(Exception):
    """A statement the plan does not cover: SQLAlchemy executes it."""


_PLANS: dict[tuple[Any, ...], _Plan | None] = {}
#: Plans kept at most: statements are module constants, so a few hundred; a caller building
#: a statement per call would otherwise grow the memo without end (it is then forgotten).
_PLANS_KEPT = 4096


def _plan_for(
    conn: Connection, stmt: Executable, keys: tuple[str, ...] | None, many: bool
) -> _Plan | None:
    """The plan of `stmt` on `conn`'s dialect, or None where SQLAlchemy executes it: a plan
    not covered, or a connection watched (statement listeners, echo)."""
    if conn._echo or conn.dispatch.before_cursor_execute or conn.dispatch.after_cursor_execute:
        return None
    dialect = conn.dialect
    if dialect._has_events:
        return None
    cache_key = (stmt, dialect.name, keys, many)
    try:
        return _PLANS[cache_key]
    except KeyError:
        pass
    plan: _Plan | None
    try:
        compiled = stmt.compile(  # type: ignore[attr-defined]
            dialect=dialect,
            column_keys=list(keys) if keys is not None else None,
            for_executemany=many,
        )
        plan = _Plan(compiled, many)
    except _Unplanned:
        plan = None
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.clear()
    _PLANS[cache_key] = plan
    return plan


def _bound(plan: _Plan, params: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The SQL text and the driver's parameters of one execution of `plan`, processed as
    SQLAlchemy's execution context processes them; None for an IN list given empty
    (SQLAlchemy renders those specially)."""
    values = {**plan.statics, **params}
    binds = plan.binds
    names: Iterable[str]
    if plan.expanding:
        lists = tuple(values.get(name) for name in plan.expanding)
        if not all(lists):
            return None
        sizes = tuple(len(v) for v in lists)  # type: ignore[arg-type]
        expanded = plan.expanded.get(sizes)
        if expanded is None:
            # SQLAlchemy's own expansion, once per list length: the statement and the
            # names its elements take are the same for every list of that length.
            state = plan.compiled.construct_expanded_state(values)
            expanded = plan.expanded[sizes] = (
                state.statement,
                None if state.positiontup is None else tuple(state.positiontup),
                tuple(state.parameters),
                {**binds, **state.processors},
                tuple(tuple(state.parameter_expansion[n]) for n in plan.expanding),
            )
        sql, order, names, binds, element_names = expanded
        for elements, keys in zip(lists, element_names, strict=True):
            values.update(zip(keys, elements, strict=True))  # type: ignore[arg-type]
    else:
        sql, order, names = plan.sql, plan.order, plan.statics
    if order is not None:
        return sql, tuple([binds[k](values[k]) if k in binds else values[k] for k in order])
    # Named (psycopg): exactly the statement's parameters, as SQLAlchemy passes them.
    return sql, {k: binds[k](values[k]) if k in binds else values[k] for k in names}


def _run(conn: Connection, plan: _Plan, params: Mapping[str, Any]) -> Any:
    """Execute `plan` on the DBAPI cursor of `conn`; the cursor (None: SQLAlchemy's turn)."""
    # What SQLAlchemy names when processing the parameters fails: the statement and the
    # parameters given (a StatementError, as there).
    sql, args = plan.sql, params
    cursor = None
    try:
        bound = _bound(plan, params)
        if bound is None:
            return None
        sql, args = bound
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql, args)
    except BaseException as e:
        conn._handle_dbapi_exception(e, sql, args, cursor, None)
    return cursor


def _run_many(conn: Connection, plan: _Plan, rows: Sequence[Mapping[str, Any]]) -> Any:
    """`_run` for an executemany on SQLite, where SQLAlchemy calls the driver's executemany
    (PostgreSQL: `insert_many` runs one multi-row INSERT instead)."""
    sql = plan.sql
    args: Any = rows
    cursor = None
    try:
        processed = []
        for row in rows:
            bound = _bound(plan, row)
            assert bound is not None
            processed.append(bound[1])
        args = processed
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.executemany(sql, args)
    except BaseException as e:
        conn._handle_dbapi_exception(e, sql, args, cursor, None)
    return cursor


def _rows(plan: _Plan, cursor: Any) -> list[Any]:
    """The fetched rows of a read, with the result processors SQLAlchemy would apply."""
    try:
        rows: list[Any] = cursor.fetchall()
        description = cursor.description
    finally:
        cursor.close()
    types = plan.results
    if types and not isinstance(types, tuple):
        # First execution: the processors for the column types the driver reports.
        dialect = plan.compiled.dialect
        pairs = zip(types, description, strict=True)
        procs = tuple(t._cached_result_processor(dialect, d[1]) for t, d in pairs)
        plan.results = types = procs if any(procs) else ()
    if types:
        rows = [tuple([p(v) if p else v for p, v in zip(types, r, strict=True)]) for r in rows]
    return rows


_PER_DIALECT: dict[tuple[str, str], Executable] = {}


def per_dialect(session: Session, name: str, build: Callable[[str], Executable]) -> Executable:
    """The statement `name` for the session's dialect, built once per dialect by `build`
    (given the dialect name): for statements spelled differently per dialect, such as
    ``INSERT ... ON CONFLICT``, which need the dialect's own `insert`."""
    dialect = session.get_bind().dialect.name
    stmt = _PER_DIALECT.get((name, dialect))
    if stmt is None:
        stmt = _PER_DIALECT[(name, dialect)] = build(dialect)
    return stmt
