"""Named queries over the ticket database (one place for the SQL the stages need)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, Table, bindparam, event, func, literal, text, union_all
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.sql import Executable
from sqlmodel import Session, col, select

from gateway.store import core, fresh
from gateway.store.lookup import TicketView
from gateway.store.models import (
    AssignmentCursor,
    Customer,
    CustomerAddress,
    CustomerMerge,
    Event,
    Message,
    MessageRef,
    Outbox,
    Participant,
    Ticket,
    TicketLink,
)

# Prebuilt Core statements of the pipeline's hot path (gateway/store/core.py says why).
_message = core.table(Message)
_participant = core.table(Participant)
_customer_address = core.table(CustomerAddress)
_link = core.table(TicketLink)
_cursor = core.table(AssignmentCursor)

_DUPLICATE_BY_KEY = core_select(_message.c.id, _message.c.ticket_id).where(
    _message.c.dedupe_key == bindparam("key"), _message.c.kind != "junk"
)
_DUPLICATE_BY_MESSAGE_ID = (
    core_select(_message.c.id, _message.c.ticket_id)
    .where(
        _message.c.message_id == bindparam("mid"),
        _message.c.direction == "in",
        _message.c.kind != "junk",
    )
    .order_by(_message.c.id)
)
#: Both in one round trip: the key's row (precedence 0) and the Message-ID's first (1), each
#: by its own index; `duplicate_of` takes the lower precedence.
_DUPLICATE_BY_EITHER = union_all(
    core_select(_DUPLICATE_BY_KEY.add_columns(literal(0).label("p")).limit(1).subquery()),
    core_select(_DUPLICATE_BY_MESSAGE_ID.add_columns(literal(1).label("p")).limit(1).subquery()),
)
_TICKET_OF_MESSAGE_ID = (
    core_select(_message.c.ticket_id)
    .where(_message.c.message_id == bindparam("mid"), _message.c.ticket_id.is_not(None))
    .order_by(_message.c.id)
)
_PARTICIPANT = core_select(_participant.c.id).where(
    _participant.c.ticket_id == bindparam("ticket_id"),
    _participant.c.address == bindparam("address"),
)
_CUSTOMER_OF = core_select(_customer_address.c.customer_id).where(
    _customer_address.c.address == bindparam("address")
)
_LINK = core_select(_link.c.id).where(
    _link.c.ticket_id == bindparam("ticket_id"),
    _link.c.other_id == bindparam("other_id"),
    _link.c.relation == bindparam("relation"),
)
_CURSORS = core_select(_cursor.c.route, _cursor.c.person)
_message_ref = core.table(MessageRef)
_outbox = core.table(Outbox)
_TICKETS_REFERENCING = (
    core_select(_message.c.ticket_id)
    .join(_message_ref, _message_ref.c.message_id == _message.c.id)
    .where(_message_ref.c.ref == bindparam("ref"), _message.c.ticket_id.is_not(None))
    .distinct()
    .limit(20)
)
_MERGED_INTO = (
    core_select(_link.c.other_id)
    .where(_link.c.ticket_id == bindparam("ticket_id"), _link.c.relation == "merged-into")
    .order_by(_link.c.id)
)
_OUTBOX_TICKET = core_select(_outbox.c.ticket_id).where(
    _outbox.c.message_id == bindparam("mid"), _outbox.c.ticket_id.is_not(None)
)
_SENT_TICKET = core_select(_message.c.ticket_id).where(
    _message.c.message_id == bindparam("mid"),
    _message.c.direction == "out",
    _message.c.ticket_id.is_not(None),
)
_UNDELIVERABLE_SINCE = core_select(_customer_address.c.undeliverable_since).where(
    _customer_address.c.address == bindparam("address")
)


def _view(t: Ticket | None) -> TicketView | None:
    if t is None or t.id is None:
        return None
    return TicketView(t.id, t.ref, t.status)


class SqlLookup:
    """`ThreadLookup` over one database session."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def duplicate_of(
        self, dedupe_key: str, message_id: str | None
    ) -> tuple[int, int | None] | None:
        # A message a staff `#junk` moved to the junk folder (kind "junk") is no duplicate
        # of its release (docs/decisions.md D18: released mail is processed as if it had just
        # arrived).
        if message_id:
            # Mail to support@ and billing@ with one Message-ID is one message (§4).
            params = {"key": dedupe_key, "mid": message_id}
            rows = core.read(self.s, _DUPLICATE_BY_EITHER, params).all()
            row = min(rows, key=lambda r: r[2], default=None)
        else:
            row = core.read(self.s, _DUPLICATE_BY_KEY, {"key": dedupe_key}).first()
        if row is None:
            return None
        assert row[0] is not None
        return row[0], row[1]

    def ticket_of_message_id(self, message_id: str) -> int | None:
        row = core.read(self.s, _TICKET_OF_MESSAGE_ID, {"mid": message_id}).first()
        return None if row is None else int(row[0])

    def ticket(self, ticket_id: int) -> TicketView | None:
        return _view(self.s.get(Ticket, ticket_id))

    def ticket_by_ref(self, ref: str) -> TicketView | None:
        return _view(self.s.exec(select(Ticket).where(Ticket.ref == ref.upper())).first())

    def tickets_referencing(self, message_id: str) -> list[int]:
        rows = core.read(self.s, _TICKETS_REFERENCING, {"ref": message_id})
        return [r[0] for r in rows if r[0] is not None]

    def merged_into(self, ticket_id: int) -> TicketView | None:
        """The ticket this one was merged into (`#merge`, link ``merged-into``), if any."""
        row = core.read(self.s, _MERGED_INTO, {"ticket_id": ticket_id}).first()
        return self.ticket(row[0]) if row is not None else None

    def ticket_of_outbound(self, message_ids: Sequence[str]) -> int | None:
        return ticket_of_outbound(self.s, message_ids)

    def is_participant(self, ticket_id: int, address: str) -> bool:
        address = address.lower()
        if not address:
            return False
        params = {"ticket_id": ticket_id, "address": address}
        if core.read(self.s, _PARTICIPANT, params).first() is not None:
            return True
        # One person, several addresses: the ticket's customer under another address.
        ticket = self.s.get(Ticket, ticket_id)
        if ticket is None or ticket.customer_id is None:
            return False
        cust = customer_of(self.s, address)
        return cust is not None and cust == resolve_customer(self.s, ticket.customer_id)


def last_customer_message(session: Session, ticket_id: int) -> Message | None:
    """The customer's latest inbound message on a ticket (what staff answer, what an
    escalation quotes, what a relayed reply is threaded to)."""
    return session.exec(
        select(Message)
        .where(
            Message.ticket_id == ticket_id,
            Message.direction == "in",
            Message.kind == "customer",
        )
        .order_by(col(Message.at).desc(), col(Message.id).desc())
    ).first()


#: The transaction-scoped advisory lock named ``:m`` (`xact_lock`).
_ADVISORY_LOCK = core_select(
    func.pg_advisory_xact_lock(func.hashtext(bindparam("m", type_=String)))
)


def xact_lock(session: Session, name: str) -> None:
    """Hold the PostgreSQL advisory lock `name` until this transaction ends (no-op on
    SQLite, whose writers are serialised by BEGIN IMMEDIATE anyway).

    For check-then-act sequences of several nodes that no unique key can settle alone
    (docs/decisions.md D13.5): the second node waits, then its next statement sees what the
    first committed (READ COMMITTED takes a new snapshot per statement). Every transaction
    takes these locks in pipeline stage order (message, routing, customer, acknowledgement),
    so two of them cannot wait on each other in a cycle. The customer's "lock" is the unique
    key of its address, which a second node's insert waits on at the same point of the
    order (`_NEW_CUSTOMER`)."""
    if session.get_bind().dialect.name == "postgresql":
        # Prebuilt (gateway/store/core.py): three per new ticket, where the ORM's execute of
        # a text() cost several times the statement.
        core.read(session, _ADVISORY_LOCK, {"m": name}).all()


def lock_message_id(session: Session, message_id: str | None) -> None:
    """Serialise two nodes processing the same Message-ID (PostgreSQL advisory lock)."""
    if message_id:
        xact_lock(session, message_id)


#: `session.info` key: memos about customers that only a merge changes (`customer_memo`).
_CUSTOMER_MEMOS = "gateway_customer_memos"


def customer_memo(session: Session, name: str) -> dict[Any, Any]:
    """A memo `name` about customers for the session's transaction (customer id -> surviving
    customer, "roots"; whose tickets are one person's): `merge_customers` drops every one of
    them, the only change to those answers in the transaction, and its end drops them too
    (other transactions may change them from then on)."""
    memos: dict[str, dict[Any, Any]] = session.info.setdefault(_CUSTOMER_MEMOS, {})
    return memos.setdefault(name, {})


@event.listens_for(OrmSession, "after_transaction_end")
def _forget_customer_memos(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction: committed or rolled back
        session.info.pop(_CUSTOMER_MEMOS, None)


def resolve_customer(session: Session, customer_id: int) -> int:
    """Follow merges to the surviving customer.

    Memoised in the session (the pipeline asks four times per new ticket, and the
    identity map, holding objects weakly, had already forgotten the customer each time:
    a SELECT per question); `merge_customers` forgets the memo.
    """
    roots: dict[int, int] = customer_memo(session, "roots")
    known = roots.get(customer_id)
    if known is not None:
        return known
    start = customer_id
    seen = set()
    while customer_id not in seen:
        seen.add(customer_id)
        c = session.get(Customer, customer_id)
        if c is None:
            return customer_id
        if c.merged_into_id is None:
            break
        customer_id = c.merged_into_id
    roots[start] = customer_id
    return customer_id


#: PostgreSQL: a new customer and its address in one statement, unless the address has a
#: customer already (then nothing, and no row). The address goes first, under the sequence's
#: next customer id: ON CONFLICT settles two nodes with the first mails of one new customer
#: (the second waits for the first's transaction, then does nothing), where an advisory lock,
#: a second look and two INSERTs were four round trips; the customer row follows in the same
#: statement, so the foreign key (checked at its end) holds, and a conflict leaves no
#: customer without an address behind (only a sequence number unused).
_NEW_CUSTOMER = (
    text(
        "WITH n AS (SELECT nextval(pg_get_serial_sequence('customer', 'id')) AS id),"
        " a AS (INSERT INTO customer_address (customer_id, address, created_at,"
        " undeliverable_reason) SELECT id, :address, :now, '' FROM n"
        " ON CONFLICT (address) DO NOTHING RETURNING customer_id)"
        " INSERT INTO customer (id, name, created_at) SELECT customer_id, :name, :now FROM a"
        " RETURNING id"
    )
    .bindparams(
        bindparam("address", type_=String),
        bindparam("name", type_=String),
        bindparam("now", type_=core.table(Customer).c.created_at.type),
    )
    .columns(id=Integer)
)


def customer_of(session: Session, address: str) -> int | None:
    address = address.lower()
    row = core.read(session, _CUSTOMER_OF, {"address": address}).first()
    # Looked for in this transaction and not found: `ensure_customer` goes straight to its
    # insert, whose conflict handling covers a customer made meanwhile.
    customer_memo(session, "absent")[address] = row is None
    return resolve_customer(session, row[0]) if row is not None else None


def ensure_customer(session: Session, address: str, name: str, now: datetime) -> int | None:
    if not address:
        return None
    address = address.lower()
    if session.get_bind().dialect.name == "postgresql":
        return _ensure_customer_pg(session, address, name, now)
    # SQLite: one writer at a time (BEGIN IMMEDIATE), so a look and two INSERTs are safe.
    found = customer_of(session, address)
    if found is not None:
        return found
    # Written by Core: nothing later in the transaction changes either row as an object.
    customer_id = core.insert(session, Customer, name=name, created_at=now)
    core.insert(session, CustomerAddress, customer_id=customer_id, address=address, created_at=now)
    return _created(session, customer_id, address)


def _ensure_customer_pg(session: Session, address: str, name: str, now: datetime) -> int:
    """PostgreSQL: the customer of `address`, made now if it has none (`_NEW_CUSTOMER`); one
    round trip for a known customer (its look) and one for a new one (the insert, when this
    transaction has just looked for it: the known-customer stage)."""
    if not customer_memo(session, "absent").get(address):
        found = customer_of(session, address)
        if found is not None:
            return found
    row = core.read(session, _NEW_CUSTOMER, {"address": address, "name": name, "now": now}).first()
    if row is None:  # another transaction made it and committed meanwhile: it is visible now
        found = customer_of(session, address)
        assert found is not None, f"customer_address {address!r} conflicted but is not there"
        return found
    return _created(session, int(row[0]), address)


def _created(session: Session, customer_id: int, address: str) -> int:
    """This transaction has just made customer `customer_id` with `address`: the memos
    know it from now on (it is its own root, the address is no longer absent, and
    gateway.store.fresh answers for it)."""
    customer_memo(session, "absent")[address] = False
    customer_memo(session, "roots")[customer_id] = customer_id
    fresh.customer_created(session, customer_id)
    return customer_id


def mark_undeliverable(session: Session, address: str, reason: str, now: datetime) -> None:
    """A permanent bounce about our mail to `address` (docs/design.md §3 rule 7)."""
    row = session.exec(
        select(CustomerAddress).where(CustomerAddress.address == address.lower())
    ).first()
    if row is None:
        customer = ensure_customer(session, address, "", now)
        assert customer is not None
        row = session.exec(
            select(CustomerAddress).where(CustomerAddress.address == address.lower())
        ).one()
    row.undeliverable_since = row.undeliverable_since or now
    row.undeliverable_reason = reason[:500]
    session.add(row)


def mark_deliverable(session: Session, address: str) -> bool:
    """The address wrote to us: whatever bounced before, it reaches a person now."""
    # Nearly always nothing to do: ask by Core, load the row to change only if it bounced.
    known = core.read(session, _UNDELIVERABLE_SINCE, {"address": address.lower()}).first()
    if known is None or known[0] is None:
        return False
    row = session.exec(
        select(CustomerAddress).where(CustomerAddress.address == address.lower())
    ).first()
    if row is None or row.undeliverable_since is None:
        return False
    row.undeliverable_since = None
    row.undeliverable_reason = ""
    session.add(row)
    return True


def undeliverable(session: Session, addresses: list[str]) -> list[str]:
    if not addresses:
        return []
    rows = session.exec(
        select(CustomerAddress.address).where(
            col(CustomerAddress.address).in_([a.lower() for a in addresses]),
            col(CustomerAddress.undeliverable_since).is_not(None),
        )
    ).all()
    return list(rows)


def add_participant(
    session: Session, ticket_id: int, address: str, role: str, now: datetime
) -> bool:
    address = address.lower()
    if not address:
        return False
    # An upsert, which says itself whether the participant is new: another node may add the
    # same participant to the same ticket meanwhile, and a read first was one more round trip
    # per participant (docs/performance.md §9).
    stmt = core.per_dialect(session, "add_participant", _participant_upsert)
    values = {"ticket_id": ticket_id, "address": address, "role": role, "added_at": now}
    if session.get_bind().dialect.name == "postgresql":
        # The new row's id, or no row: psycopg reports -1 rows for such a statement.
        return core.read(session, stmt, values).first() is not None
    # SQLite: the row count (RETURNING would need SQLite 3.35).
    return bool(core.write(session, stmt, values))


def _upsert_insert(dialect: str) -> Callable[[Table], pg.Insert | sqlite.Insert]:
    """The dialect's own `insert`, the one that can say ON CONFLICT (spelled alike in both)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def _participant_upsert(dialect: str) -> Executable:
    insert = _upsert_insert(dialect)
    stmt = insert(_participant).on_conflict_do_nothing(index_elements=["ticket_id", "address"])
    return stmt.returning(_participant.c.id) if dialect == "postgresql" else stmt


def add_event(
    session: Session,
    ticket_id: int | None,
    type_: str,
    detail: str,
    now: datetime,
    *,
    message_id: int | None = None,
    data: Any = None,
) -> None:
    # A Core INSERT (core.insert flushes first, so events keep the order they are added
    # in): the audit trail is append-only, never read back as objects in this transaction.
    core.insert(
        session,
        Event,
        ticket_id=ticket_id,
        message_id=message_id,
        at=now,
        type=type_,
        detail=detail,
        data=json.dumps(data if data is not None else {}, default=str),
    )


def link(session: Session, ticket_id: int, other_id: int, relation: str, now: datetime) -> bool:
    params = {"ticket_id": ticket_id, "other_id": other_id, "relation": relation}
    if core.read(session, _LINK, params).first() is not None:
        return False
    core.insert(session, TicketLink, **params, created_at=now)
    return True


def open_ticket_counts(session: Session) -> Mapping[str, int]:
    """Open tickets per owner, counted lazily: only the people least-open routing asks
    about, each with one index range count (ticket_owner_status), instead of reading every
    ticket for every new one (docs/decisions.md D16.2)."""
    return OpenTicketCounts(session)


class OpenTicketCounts(Mapping[str, int]):
    """A read-only mapping person id -> open tickets, each count queried on first use."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._known: dict[str, int] = {}
        self._all: dict[str, int] | None = None

    def __getitem__(self, owner: str) -> int:
        if owner not in self._known:
            self._known[owner] = int(
                self.session.exec(
                    select(func.count()).where(
                        col(Ticket.owner) == owner,
                        col(Ticket.status).in_(("open", "waiting")),
                    )
                ).one()
            )
        return self._known[owner]  # 0 for a person with none (never a KeyError)

    def _everyone(self) -> dict[str, int]:
        if self._all is None:
            rows = self.session.exec(
                select(Ticket.owner, func.count())
                .where(Ticket.status != "closed")
                .group_by(Ticket.owner)
            ).all()
            self._all = {owner: n for owner, n in rows}
        return self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._everyone())

    def __len__(self) -> int:
        return len(self._everyone())


def assignment_cursors(session: Session) -> dict[str, str]:
    return {route: person for route, person in core.read(session, _CURSORS)}


def set_cursor(session: Session, route: str, person: str, now: datetime) -> None:
    # An upsert: the first ticket of a route on two nodes at once must not collide.
    stmt = core.per_dialect(session, "set_cursor", _cursor_upsert)
    core.write(session, stmt, {"route": route, "person": person, "updated_at": now})
    # The identity map may hold the row read before as an object: refresh it. Only then:
    # `session.get` would load a row nobody holds, to refresh it at once (two SELECTs).
    cur = session.identity_map.get(session.identity_key(AssignmentCursor, route))
    if cur is not None:
        session.refresh(cur)


def _cursor_upsert(dialect: str) -> Executable:
    stmt = _upsert_insert(dialect)(_cursor)
    return stmt.on_conflict_do_update(
        index_elements=["route"],
        set_={"person": stmt.excluded.person, "updated_at": stmt.excluded.updated_at},
    )


def find_ticket(session: Session, ref: str) -> Ticket | None:
    ref = ref.strip().upper()
    t = session.exec(select(Ticket).where(Ticket.ref == ref)).first()
    if t is None and ref.isdigit():
        t = session.exec(select(Ticket).where(col(Ticket.ref).endswith(f"-{ref}"))).first()
    return t


def ticket_of_outbound(session: Session, message_ids: Iterable[str]) -> int | None:
    """The ticket of an outbound message we sent (for attaching bounces)."""
    for mid in message_ids:
        for stmt in (_OUTBOX_TICKET, _SENT_TICKET):
            row = core.read(session, stmt, {"mid": mid}).first()
            if row is not None:
                return int(row[0])
    return None


def merge_customers(
    session: Session, source: int, target: int, now: datetime, by: str = ""
) -> CustomerMerge:
    """Join customer `source` into `target`: addresses and tickets move, history is kept."""
    session.info.pop(_CUSTOMER_MEMOS, None)
    fresh.forget_customers(session)  # tickets move between customers below
    source = resolve_customer(session, source)
    target = resolve_customer(session, target)
    session.info.pop(_CUSTOMER_MEMOS, None)  # the roots change below
    if source == target:
        raise ValueError("both addresses already belong to one customer")
    addrs = session.exec(select(CustomerAddress).where(CustomerAddress.customer_id == source)).all()
    tickets = session.exec(select(Ticket).where(Ticket.customer_id == source)).all()
    for a in addrs:
        a.customer_id = target
        session.add(a)
    for t in tickets:
        t.customer_id = target
        session.add(t)
        add_event(session, t.id, "customer-merged", f"customer {source} merged into {target}", now)
    src = session.get(Customer, source)
    assert src is not None
    src.merged_into_id = target
    session.add(src)
    record = CustomerMerge(
        source_id=source,
        target_id=target,
        addresses=json.dumps([a.address for a in addrs]),
        tickets=json.dumps([t.ref for t in tickets]),
        at=now,
        by=by,
    )
    session.add(record)
    session.flush()
    return record
