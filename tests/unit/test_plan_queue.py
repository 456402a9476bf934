"""The escalator's queue of tickets to be planned: the partial index `ticket_to_plan`
(migration 0012_plan_queue, `Ticket.__table_args__`) and the two queries that read it,
`_DIRTY` (is anything to be planned?) and the chunk `Planner._plan_chunk` plans
(`chunk_query`), ordered by id so both databases use the index whatever their statistics
say (docs/decisions.md D16.12)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.engine import Engine

from gateway.escalation.moments import _DIRTY, _SCAN, _TO_PLAN, PLAN_CHUNK, Planner, chunk_query
from gateway.store.db import is_postgres, open_database
from gateway.store.models import Ticket
from tests.conftest import _pg_database
from tests.support.sla import sla_rules

N = 3000  # open tickets: enough that a whole-table read costs more than the index
PLANNED = datetime(2030, 1, 1, tzinfo=UTC)  # the moment of the tickets already planned
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty database of either kind: `open_database()` runs every migration on it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
    else:
        yield from _pg_database()


def _index_sql(engine: Engine) -> str:
    """The database's own definition of the index (its catalogue), "" when there is none."""
    with engine.connect() as conn:
        if is_postgres(engine):
            row = conn.execute(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ticket_to_plan'")
            ).first()
        else:
            row = conn.execute(
                text(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ticket_to_plan'"
                )
            ).first()
    return str(row[0]) if row else ""


def test_open_database_creates_the_partial_index(fresh_url: str) -> None:
    """After `open_database()` on an empty database the ticket table has `ticket_to_plan`
    on `id`, limited to open tickets not planned yet."""
    engine = open_database(fresh_url)
    try:
        indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("ticket")}
        assert indexes["ticket_to_plan"]["column_names"] == ["id"]
        sql = _index_sql(engine)
        where = sql.partition(" WHERE ")[2]
        assert re.search(r"status\W*(::text)?\W*=\s*'open'", where), sql
        assert re.search(r"escalate_at\W* IS NULL", where), sql
    finally:
        engine.dispose()


@pytest.fixture
def queue_db(database_url: str) -> Iterator[tuple[Engine, list[int]]]:
    """`_queue_db` on SQLite and on PostgreSQL."""
    yield from _queue_db(database_url)


@pytest.fixture
def pg_queue_db(pg_migrated_template: str) -> Iterator[tuple[Engine, list[int]]]:
    """`_queue_db` on PostgreSQL only."""
    for url in _pg_database(pg_migrated_template):
        yield from _queue_db(url)


def _queue_db(database_url: str) -> Iterator[tuple[Engine, list[int]]]:
    """N open tickets: statistics gathered while every one of them was to be planned
    (ANALYZE), then all but three planned. The statistics now say "all NULL": the moment
    (after an upgrade, a bulk import, autovacuum off) the old queries read the whole table
    for each chunk. Yields the engine and the ids of the three still to be planned."""
    engine = open_database(database_url)
    table: Any = Ticket.metadata.tables["ticket"]
    rows = [
        {
            "ref": f"T{i:05d}",
            "status": "open",
            "sla": "standard",
            "owner": "alice",
            "queue": "support",
            "created_at": T0,
            "updated_at": T0,
            "last_customer_at": T0,
        }
        for i in range(N)
    ]
    with engine.begin() as conn:
        if is_postgres(engine):
            # Nothing may refresh the statistics behind the test's back.
            conn.execute(text("ALTER TABLE ticket SET (autovacuum_enabled = false)"))
        conn.execute(insert(table), rows)
        ids = [int(i) for i in conn.execute(select(table.c.id).order_by(table.c.id)).scalars()]
    with engine.connect() as conn:
        conn.execute(text("ANALYZE ticket"))
        conn.commit()
    left = [ids[7], ids[N // 2], ids[-1]]
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id.not_in(left)).values(escalate_at=PLANNED))
    try:
        yield engine, left
    finally:
        engine.dispose()


def _explain(engine: Engine, query: Any) -> list[str]:
    """The database's plan of `query` (EXPLAIN; EXPLAIN QUERY PLAN on SQLite), one line
    per node."""
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if is_postgres(engine):
            return [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + sql)]
        return [str(r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]


def test_the_queries_read_the_index_whatever_the_statistics_say(
    queue_db: tuple[Engine, list[int]],
) -> None:
    """With statistics that call every ticket unplanned, `_DIRTY` and the dirty chunk still
    go through `ticket_to_plan` on PostgreSQL, never a sequential scan of ticket; on SQLite
    through an index (`ticket_to_plan` or the (status, escalate_at) one), never a scan of
    the ticket table itself."""
    engine, _ = queue_db
    if is_postgres(engine):
        with engine.connect() as conn:
            stale = conn.execute(
                text(
                    "SELECT null_frac FROM pg_stats"
                    " WHERE tablename = 'ticket' AND attname = 'escalate_at'"
                )
            ).scalar_one()
        assert stale == 1.0  # the statistics describe the table before the planning
    for query in (_DIRTY, chunk_query(None, postgres=is_postgres(engine))):
        plan = _explain(engine, query)
        text_plan = "\n".join(plan)
        if is_postgres(engine):
            assert "ticket_to_plan" in text_plan, text_plan
            assert "Seq Scan on ticket" not in text_plan, text_plan
        else:
            # SQLite may as well search the (status, escalate_at) index; what it must not
            # do is walk the table itself.
            reads = [line for line in plan if re.match(r"(SCAN|SEARCH) ticket\b", line)]
            assert reads, text_plan
            assert all(" USING " in line for line in reads), text_plan


def test_the_planner_plans_exactly_the_tickets_to_be_planned(
    queue_db: tuple[Engine, list[int]],
) -> None:
    """The planner finds the three unplanned tickets among the N, gives each a moment, and
    leaves the others' moments alone; nothing is left to plan afterwards."""
    engine, left = queue_db
    planner = Planner(engine)
    assert planner._has_dirty()
    assert planner._plan_chunk(sla_rules()) == max(left)  # one chunk: the three
    assert not planner._has_dirty()
    table: Any = Ticket.metadata.tables["ticket"]
    with engine.connect() as conn:
        moments = dict(conn.execute(select(table.c.id, table.c.escalate_at)).all())
    assert len(moments) == N
    assert all(moments[tid] is not None for tid in left)
    untouched = [tid for tid, at in moments.items() if tid not in left]
    assert len(untouched) == N - 3
    assert {_utc(moments[tid]) for tid in untouched} == {PLANNED}


def _utc(at: datetime) -> datetime:
    # SQLite hands back naive UTC datetimes.
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@pytest.mark.postgres
def test_the_statistics_do_mislead_the_unordered_query(
    pg_queue_db: tuple[Engine, list[int]],
) -> None:
    """The control for the test above: under the same stale statistics the queries as they
    were before 0012 (no ORDER BY) are planned as a sequential scan of the whole ticket
    table, so the setup reproduces the case the index and the ordering are for."""
    engine, _ = pg_queue_db
    old_chunk = select(*_SCAN).where(*_TO_PLAN).limit(PLAN_CHUNK).with_for_update(skip_locked=True)
    old_dirty = select(_SCAN[0]).where(*_TO_PLAN).limit(1)
    for query in (old_dirty, old_chunk):
        text_plan = "\n".join(_explain(engine, query))
        assert "Seq Scan on ticket" in text_plan, text_plan
