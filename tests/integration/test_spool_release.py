"""When the spool forgets a processed message (gateway/pipeline/worker.py `_release_in`,
`_release_after`; `Spool.releases_in_transaction`):

- the shared spool (PostgreSQL's `spool_entry`) deletes the entry in the transaction that
  commits its ticket: both or neither, one commit;
- a failure anywhere in that transaction, even at its COMMIT after the deletion ran, keeps
  the entry (it pays an attempt and waits for its retry) and makes no ticket;
- the local spool (its own SQLite file) is released after the ticket database committed.

Real SMTP in, the real pipeline, a real PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.pipeline.context import Context
from gateway.pipeline.thread import Disposition
from gateway.store.models import Ticket
from tests.conftest import _pg_database, make_settings
from tests.support.gateway import make_mail, running_gateway, send


@pytest.fixture
def pg_url(pg_migrated_template: str) -> Iterator[str]:
    yield from _pg_database(pg_migrated_template)


def _psql(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def _entries(url: str) -> list[tuple[str, int]]:
    """The shared spool's entries: (state, attempts), oldest first."""
    with _psql(url) as c:
        rows = c.execute("SELECT state, attempts FROM spool_entry ORDER BY id").fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


def _witness(url: str) -> None:
    """A deferred trigger on ticket: at the COMMIT of a transaction that made a ticket it
    records, inside that transaction, how many spool entries are left."""
    with _psql(url) as c:
        c.execute("CREATE TABLE witness (spool_rows bigint NOT NULL)")
        c.execute(
            "CREATE FUNCTION witness_spool() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO witness SELECT count(*) FROM spool_entry; RETURN NULL; END $$"
        )
        c.execute(
            "CREATE CONSTRAINT TRIGGER witness_spool AFTER INSERT ON ticket"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION witness_spool()"
        )


def _witnessed(url: str) -> list[int]:
    with _psql(url) as c:
        return [int(r[0]) for r in c.execute("SELECT spool_rows FROM witness").fetchall()]


def _tickets(engine: Any) -> list[Ticket]:
    with Session(engine) as s:
        return list(s.exec(select(Ticket)).all())


def _commits(engine: Any) -> list[int]:
    """Counts the commits made through `engine` (one item per commit)."""
    seen: list[int] = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


@pytest.mark.postgres
async def test_the_shared_spool_forgets_an_entry_in_its_tickets_transaction(
    tmp_path: Path, clock: FrozenClock, pg_url: str
) -> None:
    """After processing, the entry is gone and the ticket exists; inside the transaction
    that made the ticket, at its COMMIT, the entry was already deleted (the witness saw no
    entry left), and processing took that one commit, no second one for the release."""
    _witness(pg_url)
    settings = make_settings(tmp_path, storage={"database_url": pg_url})
    async with running_gateway(settings, clock) as gw:
        assert gw.pipeline.spool.releases_in_transaction
        await send(gw, make_mail(subject="Printer on fire"))
        [entry] = gw.pipeline.spool.claim(10)
        assert _entries(pg_url) == [("claimed", 1)]
        commits = _commits(gw.engine)
        assert gw.pipeline.process_one(entry)
        assert len(commits) == 1
        assert _entries(pg_url) == []
        assert [t.subject for t in _tickets(gw.engine)] == ["Printer on fire"]
        assert _witnessed(pg_url) == [0]


@pytest.mark.postgres
async def test_a_group_on_the_shared_spool_is_released_with_its_tickets(
    tmp_path: Path, clock: FrozenClock, pg_url: str
) -> None:
    """Several entries in one transaction (`process_many`): all released in it, so the
    witness at its COMMIT saw none left, and every message has its ticket."""
    _witness(pg_url)
    settings = make_settings(tmp_path, storage={"database_url": pg_url})
    senders = [f"customer{i}@customer.example" for i in range(3)]
    async with running_gateway(settings, clock) as gw:
        gw.pipeline.tx_budget = 3600.0  # one group, however loaded the machine
        for i, sender in enumerate(senders):
            await send(gw, make_mail(sender=sender, subject=f"Question {i}"))
        assert await gw.pipeline.run_once() == len(senders)
        assert _entries(pg_url) == []
        assert sorted(t.requester for t in _tickets(gw.engine)) == senders
        assert _witnessed(pg_url) == [0, 0, 0]  # one per ticket, all at the one COMMIT


@pytest.mark.postgres
async def test_a_stage_that_raises_keeps_the_entry_and_makes_no_ticket(
    tmp_path: Path, clock: FrozenClock, pg_url: str
) -> None:
    """A stage raising after the message's rows were written: the transaction is rolled
    back, no ticket, and the entry stays in the spool, charged one attempt and waiting for
    its retry (as any failed message)."""
    settings = make_settings(tmp_path, storage={"database_url": pg_url, "max_attempts": 3})
    async with running_gateway(settings, clock) as gw:
        chains = gw.pipeline.chains

        def explodes(ctx: Context) -> None:
            raise ValueError("stage exploded")

        new = Disposition.NEW
        gw.pipeline.chains = {**chains, new: (*chains[new], explodes)}
        await send(gw, make_mail(subject="Printer on fire"))
        assert await gw.pipeline.run_once() == 1
        assert _entries(pg_url) == [("pending", 1)]
        assert _tickets(gw.engine) == []


@pytest.mark.postgres
async def test_a_failure_at_commit_after_the_release_keeps_the_entry(
    tmp_path: Path, clock: FrozenClock, pg_url: str
) -> None:
    """The transaction fails at its COMMIT, after the entry's deletion ran in it (a deferred
    trigger refusing the ticket): the deletion is rolled back with the ticket, so the
    message is not lost: its entry waits for a retry, and once the refusal is gone the
    retry makes the ticket and only then is the entry gone."""
    with _psql(pg_url) as c:
        c.execute(
            "CREATE FUNCTION refuse_ticket() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'check_violation';"
            " END $$"
        )
        c.execute(
            "CREATE CONSTRAINT TRIGGER refuse_ticket AFTER INSERT ON ticket"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_ticket()"
        )
    settings = make_settings(tmp_path, storage={"database_url": pg_url, "max_attempts": 3})
    async with running_gateway(settings, clock) as gw:
        await send(gw, make_mail(subject="Printer on fire"))
        assert await gw.pipeline.run_once() == 1
        assert _entries(pg_url) == [("pending", 1)]
        assert _tickets(gw.engine) == []
        with _psql(pg_url) as c:
            c.execute("DROP TRIGGER refuse_ticket ON ticket")
        clock.advance(3600)  # past the retry's delay
        assert await gw.pipeline.run_once() == 1
        assert _entries(pg_url) == []
        assert [t.subject for t in _tickets(gw.engine)] == ["Printer on fire"]


def _local(spool_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(spool_dir / "spool.sqlite3")) as c:
        return int(c.execute("SELECT count(*) FROM spool").fetchone()[0])


async def test_the_local_spool_is_released_after_the_commit(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """SQLite with the node's own spool file: not released in the ticket transaction (the
    entry is still in the file when the ticket database commits), gone right after, and
    the ticket exists."""
    settings = make_settings(tmp_path)
    async with running_gateway(settings, clock) as gw:
        assert not gw.pipeline.spool.releases_in_transaction
        await send(gw, make_mail(subject="Printer on fire"))
        at_commit: list[int] = []
        event.listen(
            gw.engine, "commit", lambda conn: at_commit.append(_local(settings.spool_path))
        )
        assert await gw.pipeline.run_once() == 1
        assert at_commit[0] == 1
        assert _local(settings.spool_path) == 0
        assert [t.subject for t in _tickets(gw.engine)] == ["Printer on fire"]
