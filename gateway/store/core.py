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
- A statement whose text depends on the dialect (an upsert) is cached per dialect name
  (`per_dialect`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any, TypeVar, cast

from pydantic_core import PydanticUndefined
from sqlalchemy import Table
from sqlalchemy.engine import Result
from sqlalchemy.orm import make_transient_to_detached
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
    """Execute a prebuilt read in the session's transaction, after flushing what the ORM
    holds (Core statements skip autoflush). Its rows are typed as tuples of any length."""
    session.flush()
    return session.connection().execute(stmt, dict(params or {}))


def write(session: Session, stmt: Executable, params: Mapping[str, Any] | None = None) -> int:
    """Execute a prebuilt UPDATE, DELETE or upsert; the number of rows it touched. The session is
    flushed first so that the statement applies after what the ORM holds."""
    session.flush()
    result = session.connection().execute(stmt, dict(params or {}))
    return int(getattr(result, "rowcount", 0) or 0)


def _row(model: type[SQLModel], values: Mapping[str, Any]) -> dict[str, Any]:
    row = {**defaults(model), **values}
    if row.get(PK) is None:
        row.pop(PK, None)
    return row


def insert(session: Session, model: type[SQLModel], **values: Any) -> int:
    """INSERT one row of `model` (defaults filled in); its new id."""
    session.flush()
    result = session.connection().execute(_insert_stmt(model), _row(model, values))
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def insert_many(session: Session, model: type[SQLModel], rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT several rows of `model` in one executemany (ids not returned). Every row must
    name the same columns (the defaults fill the rest)."""
    if not rows:
        return
    session.flush()
    session.connection().execute(_insert_stmt(model), [_row(model, r) for r in rows])


@cache
def _insert_stmt(model: type[SQLModel]) -> Executable:
    return table(model).insert()


def insert_attached(session: Session, obj: M) -> M:
    """INSERT the new (transient) model object `obj` by Core, set its id, and attach it to
    the session as a persistent, unmodified instance: what `session.add(obj); session.flush()`
    leaves, without the unit of work's cost. The values written are the object's own, a
    None left out where the column has a default of its own, as the ORM's flush does."""
    session.flush()
    values: dict[str, Any] = {}
    for column in table(type(obj)).columns:
        value = getattr(obj, column.key)
        if value is None and (column.primary_key or column.default is not None):
            continue
        values[column.key] = value
    result = session.connection().execute(_insert_stmt(type(obj)), values)
    key = result.inserted_primary_key
    assert key is not None
    setattr(obj, PK, int(key[0]))
    # Every attribute the constructor set now counts as loaded, with no pending change.
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


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
