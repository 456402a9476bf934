"""Two nodes with the first mails of one new customer (docs/decisions.md D13.5), on
PostgreSQL: the customer and its address are made by one statement whose ON CONFLICT on the
address settles the race (gateway/store/queries.py `_NEW_CUSTOMER`). The second transaction
waits for the first; if that commits, both name one customer; if it rolls back, the second
makes the customer itself. Never two customers, never a customer without an address.

Real transactions on a real PostgreSQL server, one thread each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.store.db import open_database
from gateway.store.queries import customer_of, ensure_customer
from tests.conftest import _pg_database

pytestmark = [pytest.mark.postgres]

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
WAIT = 10.0  # the most the second transaction may take once the first has ended (a bound)


@pytest.fixture
def engine(pg_migrated_template: str) -> Iterator[Engine]:
    for url in _pg_database(pg_migrated_template):
        e = open_database(url)
        yield e
        e.dispose()


def _rows(engine: Engine) -> tuple[int, list[tuple[int, str]]]:
    with engine.connect() as c:
        customers = c.execute(text("SELECT count(*) FROM customer")).scalar_one()
        addresses = c.execute(text("SELECT customer_id, address FROM customer_address")).all()
    return int(customers), [(int(r[0]), str(r[1])) for r in addresses]


def _second(engine: Engine, got: dict[str, int | None]) -> tuple[threading.Thread, Session]:
    """The second node's transaction, started in a thread: it must wait for the first."""
    s = Session(engine)

    def run() -> None:
        got["second"] = ensure_customer(s, "New@Customer.example", "Second", NOW)

    t = threading.Thread(target=run)
    t.start()
    t.join(0.5)
    assert t.is_alive(), "the second transaction did not wait for the first"
    return t, s


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_one_new_customers_first_mails_on_two_nodes(engine: Engine, first_ends: str) -> None:
    first = Session(engine)
    made = ensure_customer(first, "new@customer.example", "First", NOW)
    assert made is not None
    got: dict[str, int | None] = {}
    thread, second = _second(engine, got)
    first.commit() if first_ends == "commit" else first.rollback()
    thread.join(WAIT)
    assert not thread.is_alive()
    second.commit()
    customers, addresses = _rows(engine)
    assert customers == 1
    assert addresses == [(got["second"], "new@customer.example")]
    if first_ends == "commit":
        assert got["second"] == made
    else:
        assert got["second"] != made
    with Session(engine) as s:
        assert customer_of(s, "NEW@customer.example") == got["second"]
    first.close()
    second.close()


def test_a_known_customer_is_found_with_one_statement(engine: Engine) -> None:
    """A known address costs one look; a new one, in a transaction that has just looked for
    it (the known-customer stage), one insert."""
    from sqlalchemy import event

    with Session(engine) as s:
        made = ensure_customer(s, "pat@customer.example", "Pat", NOW)
        s.commit()
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with Session(engine) as s:
        assert ensure_customer(s, "pat@customer.example", "Pat", NOW) == made
        assert [q for q in seen if "customer_address" in q or "INSERT" in q] == [seen[0]]
        assert "INSERT" not in seen[0]
        assert customer_of(s, "jo@customer.example") is None
        seen.clear()
        jo = ensure_customer(s, "jo@customer.example", "Jo", NOW)
        assert len(seen) == 1  # the insert
        assert "INSERT INTO customer_address" in seen[0]
        s.commit()
    assert customers_of(engine) == {"pat@customer.example": made, "jo@customer.example": jo}


def customers_of(engine: Engine) -> dict[str, int]:
    return {a: c for c, a in _rows(engine)[1]}
