"""Threading-decision latency over a large ticket database (SQLite).

Builds (once; cached in /tmp, ``--rebuild`` to redo) a database with the real schema
(``gateway.store.db.open_database`` runs the migrations) holding about 1,000,000 stored
messages across 200,000 tickets: customers and their addresses, tickets with refs
(``ACME-1000``...), participants (requester, some Cc, the staff owner), inbound messages with
realistic Message-IDs and ``In-Reply-To``/``References``, and our outbound replies with
signed Message-IDs (``Signer.message_id``). Rows go in with SQLAlchemy core ``insert()``
executemany, in large transactions, with ``synchronous=OFF`` on the loading connection only.

Then it times ``gateway.pipeline.thread.decide`` with ``SqlLookup`` exactly as
``thread_stage`` calls it (one session per message, as the pipeline does), over a mix of:
replies naming a stored inbound Message-ID from a participant, replies to our signed
Message-IDs, signed reply tokens in the recipient, subject references from a participant and
from a stranger, brand-new messages, and duplicates (same bytes, or same Message-ID).
Messages are parsed before timing (``gateway.pipeline.parse.parse``); only the decision,
i.e. its database lookups, is timed. It prints p50/p95/p99 per case and overall, and the
SQLite query plan of every lookup the decision makes (to spot a missing index).

Usage::

    python bench/thread_lookup.py                  # build if needed, 2,000 decisions
    python bench/thread_lookup.py --rebuild --messages 1000000 --tickets 200000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from gateway.pipeline.parse import ParsedMessage, parse
from gateway.pipeline.thread import decide
from gateway.security.tokens import Signer
from gateway.spool import Envelope, dedupe_key
from gateway.store.db import open_database
from gateway.store.models import Customer, CustomerAddress, Message, Participant, Ticket
from gateway.store.queries import SqlLookup

DEFAULT_DB = Path("/tmp/gw-thread-bench.sqlite3")
SECRET = b"bench-secret-key-0123456789abcdef"
HOSTNAME = "mx.example.com"
SUPPORT = "support@example.com"
PREFIX = "ACME"
FIRST_NUMBER = 1000
STAFF = ["alice@example.com", "bob@example.com", "carol@example.com"]
DOMAINS = [
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "customer.example",
    "acme-corp.example",
    "example.org",
    "mail.example.net",
    "web.de",
    "icloud.com",
    "proton.me",
]
BATCH = 20_000
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)

# ----------------------------------------------------------------------------------------
# Population
# ----------------------------------------------------------------------------------------


def customer_address(n: int) -> str:
    return f"customer{n}@{DOMAINS[n % len(DOMAINS)]}"


def inbound_message_id(ticket: int, seq: int, rng: random.Random) -> str:
    """What real mail clients produce: a random left part at the sender's host."""
    host = rng.choice(["mail.gmail.com", "outlook.com", "customer.example", "mx.web.de"])
    return f"<{rng.getrandbits(64):016x}.{ticket}.{seq}@{host}>"


def fake_raw(headers: dict[str, str], size: int) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    body = b"Hello, this is a stored benchmark message body.\r\n"
    return head + b"\r\n" + body * max(1, (size - len(head)) // len(body))


@dataclass
class Stored:
    """What the sampler needs to know about the database it built (kept in a sidecar)."""

    tickets: int
    messages: int

    @staticmethod
    def sidecar(db: Path) -> Path:
        return db.with_suffix(".meta.json")


def populate(db: Path, tickets: int, messages: int, raw_size: int, seed: int) -> None:
    """Build the database: the real schema, then bulk inserts with executemany."""
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    Stored.sidecar(db).unlink(missing_ok=True)
    engine = open_database(f"sqlite:///{db}")  # migrations: the schema as deployed
    signer = Signer(SECRET)
    rng = random.Random(seed)
    customers = max(1, int(tickets * 0.75))  # some customers have several tickets
    t0 = time.perf_counter()
    with engine.connect() as conn:
        # Before SQLAlchemy begins a transaction (a pragma inside one is refused).
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        dbapi.execute("PRAGMA synchronous=OFF")  # loading only; the gateway uses FULL
        dbapi.execute("PRAGMA cache_size=-262144")  # 256 MiB while the indexes grow
        _insert(conn, Customer, _customers(customers))
        _insert(conn, CustomerAddress, _addresses(customers))
        _insert(conn, Ticket, _tickets(tickets, customers, rng))
        _insert(conn, Participant, _participants(tickets, customers, rng))
        _insert(conn, Message, _messages(tickets, customers, messages, raw_size, rng, signer))
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
        dbapi.execute("PRAGMA synchronous=FULL")
        n = conn.execute(text("SELECT count(*) FROM message")).scalar_one()
    engine.dispose()
    Stored.sidecar(db).write_text(json.dumps({"tickets": tickets, "messages": n, "seed": seed}))
    print(f"built {db}: {tickets} tickets, {n} messages in {time.perf_counter() - t0:.0f} s")


def _insert(conn: Connection, model: Any, rows: Iterator[dict[str, Any]]) -> None:
    table = model.__table__
    stmt = insert(table)
    batch: list[dict[str, Any]] = []
    done = 0
    t0 = time.perf_counter()
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH:
            conn.execute(stmt, batch)
            done += len(batch)
            batch = []
    if batch:
        conn.execute(stmt, batch)
        done += len(batch)
    conn.commit()
    print(f"  {table.name:<17} {done:>9} rows {time.perf_counter() - t0:6.1f} s", flush=True)


def _customers(n: int) -> Iterator[dict[str, Any]]:
    for i in range(1, n + 1):
        yield {"id": i, "name": f"Customer {i}", "created_at": EPOCH, "merged_into_id": None}


def _addresses(n: int) -> Iterator[dict[str, Any]]:
    for i in range(1, n + 1):
        yield {"id": i, "customer_id": i, "address": customer_address(i), "created_at": EPOCH}


def requester_of(ticket: int, customers: int) -> int:
    """Deterministic customer of a ticket (so the sampler can recompute it)."""
    return (ticket * 7919) % customers + 1


def _tickets(n: int, customers: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    for t in range(1, n + 1):
        at = EPOCH + timedelta(minutes=t)
        status = rng.choices(["open", "waiting", "closed"], [0.2, 0.1, 0.7])[0]
        cust = requester_of(t, customers)
        subject = f"Printer problem number {t}"
        yield {
            "id": t,
            "ref": f"{PREFIX}-{FIRST_NUMBER + t - 1}",
            "status": status,
            "subject": subject,
            "normalized_subject": subject.lower(),
            "requester": customer_address(cust),
            "customer_id": cust,
            "owner": STAFF[t % len(STAFF)].split("@")[0],
            "queue": "support",
            "priority": "normal",
            "tags": "[]",
            "sla": "standard",
            "route": "default",
            "created_at": at,
            "updated_at": at,
            "closed_at": at + timedelta(days=2) if status == "closed" else None,
            "acknowledged": True,
        }


def _participants(n: int, customers: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    pid = 0
    for t in range(1, n + 1):
        addrs = [(customer_address(requester_of(t, customers)), "requester")]
        if t % 4 == 0:  # a colleague in Cc on a quarter of the tickets
            addrs.append((customer_address((t * 31) % customers + 1), "cc"))
        addrs.append((STAFF[t % len(STAFF)], "staff"))
        seen = set()
        for addr, role in addrs:
            if addr in seen:
                continue
            seen.add(addr)
            pid += 1
            yield {"id": pid, "ticket_id": t, "address": addr, "role": role, "added_at": EPOCH}


def messages_per_ticket(tickets: int, messages: int, rng: random.Random) -> list[int]:
    """1..9 messages per ticket, skewed to short threads, summing to `messages`."""
    counts = [1] * tickets
    left = messages - tickets
    while left > 0:
        t = rng.randrange(tickets)
        if counts[t] < 9:
            counts[t] += 1
            left -= 1
    return counts


def _messages(
    tickets: int, customers: int, messages: int, raw_size: int, rng: random.Random, signer: Signer
) -> Iterator[dict[str, Any]]:
    counts = messages_per_ticket(tickets, max(messages, tickets), rng)
    mid = 0
    for t, count in enumerate(counts, start=1):
        cust = customer_address(requester_of(t, customers))
        ref = f"{PREFIX}-{FIRST_NUMBER + t - 1}"
        chain: list[str] = []
        for seq in range(count):
            mid += 1
            outbound = seq % 2 == 1  # customer, us, customer, us, ...
            if outbound:
                message_id = signer.message_id(HOSTNAME, t, kind="reply")
                sender, to, kind = SUPPORT, cust, "staff_reply"
            else:
                message_id = inbound_message_id(t, seq, rng)
                sender, to, kind = cust, SUPPORT, "customer"
            subject = f"Printer problem number {t}" if seq == 0 else f"Re: [{ref}] Printer"
            headers = {"From": sender, "To": to, "Subject": subject, "Message-ID": message_id}
            if chain:
                headers["In-Reply-To"] = chain[-1]
                headers["References"] = " ".join(chain[-10:])
            raw = fake_raw(headers, raw_size)
            env = Envelope(mail_from=sender, rcpt_tos=[to])
            yield {
                "id": mid,
                "ticket_id": t,
                "direction": "out" if outbound else "in",
                "kind": kind,
                "message_id": message_id,
                "dedupe_key": dedupe_key(env, raw),
                "raw_sha256": hashlib.sha256(raw).hexdigest(),
                "mail_from": sender,
                "from_address": sender,
                "to": json.dumps([to]),
                "subject": subject,
                "at": EPOCH + timedelta(minutes=t, seconds=seq),
                "size": len(raw),
                "raw": raw,
                "text": "Hello, this is a stored benchmark message body.",
                "in_reply_to": chain[-1] if chain else None,
                "references": " ".join(chain[-10:]),
                "robot": "",
                "auth": "{}",
                "not_kept": "[]",
                "spool_id": None,
            }
            chain.append(message_id)
        if t % 20_000 == 0:
            print(f"    ... {t} tickets, {mid} messages", flush=True)


# ----------------------------------------------------------------------------------------
# Sampling and timing
# ----------------------------------------------------------------------------------------

CASES = {
    "known-message-id": 0.30,  # In-Reply-To a stored inbound id, sender a participant
    "our-message-id": 0.20,  # In-Reply-To one of our signed ids
    "reply-token": 0.05,  # support+<token>@example.com
    "subject-ref": 0.10,  # [ACME-n] in the subject, sender a participant
    "stranger-ref": 0.05,  # [ACME-n] and a stored id, sender not a participant -> new+link
    "new": 0.15,  # no threading key
    "dup-bytes": 0.05,  # exactly the stored bytes and envelope
    "dup-message-id": 0.10,  # same Message-ID to another support address
}


@dataclass
class Sample:
    case: str
    parsed: ParsedMessage
    sender: str
    recipients: list[str]
    dedupe_key: str


def build_samples(engine: Engine, n: int, seed: int) -> list[Sample]:
    """Draw `n` incoming messages from the stored ones (random tickets), parse them."""
    rng = random.Random(seed)
    signer = Signer(SECRET)
    raw_conn = engine.raw_connection()
    try:
        cur = raw_conn.cursor()
        max_ticket = cur.execute("SELECT max(id) FROM ticket").fetchone()[0]
        max_msg = cur.execute("SELECT max(id) FROM message").fetchone()[0]
        samples: list[Sample] = []
        names = list(CASES)
        weights = list(CASES.values())
        while len(samples) < n:
            case = rng.choices(names, weights)[0]
            s = _sample(case, cur, rng, signer, max_ticket, max_msg)
            if s is not None:
                samples.append(s)
    finally:
        raw_conn.close()
    return samples


def _row(cur: Any, sql: str, *args: Any) -> Any:
    return cur.execute(sql, args).fetchone()


def _duplicate(case: str, cur: Any, m: int) -> Sample | None:
    """Stored inbound message ``m`` arriving again: the same bytes, or (dup-message-id) the
    same mail Bcc'd to another address; None when ``m`` is outbound."""
    row = _row(cur, 'SELECT raw, mail_from, "to", direction FROM message WHERE id=?', m)
    if row[3] != "in":
        return None
    raw = bytes(row[0])
    sender = row[1]
    rcpts = json.loads(row[2])
    if case == "dup-message-id":  # the same mail, Bcc'd to billing@ as well
        rcpts = ["billing@example.com"]
    parsed = parse(raw)
    key = dedupe_key(Envelope(mail_from=sender, rcpt_tos=rcpts), raw)
    return Sample(case, parsed, parsed.from_address or sender, rcpts, key)


def _sample(
    case: str, cur: Any, rng: random.Random, signer: Signer, max_ticket: int, max_msg: int
) -> Sample | None:
    t = rng.randint(1, max_ticket)
    ref = f"{PREFIX}-{FIRST_NUMBER + t - 1}"
    requester = _row(cur, "SELECT requester FROM ticket WHERE id=?", t)[0]
    stranger = f"stranger{rng.getrandbits(32)}@elsewhere.example"
    fresh_id = f"<{rng.getrandbits(64):016x}.new@mail.gmail.com>"
    headers: dict[str, str] = {
        "From": requester,
        "To": SUPPORT,
        "Message-ID": fresh_id,
        "Subject": "Still broken",
    }
    recipients = [SUPPORT]
    if case in ("known-message-id", "stranger-ref"):
        row = _row(
            cur,
            'SELECT message_id, "references" FROM message WHERE ticket_id=?'
            " AND direction='in' ORDER BY id DESC LIMIT 1",
            t,
        )
        headers["In-Reply-To"] = row[0]
        headers["References"] = (row[1] + " " + row[0]).strip()
        if case == "stranger-ref":
            # Quotes the customer's id and the ref (our signed ids from a stranger are
            # refused the same way (docs/decisions.md D10.3): they prove the ticket, not the
            # person).
            headers["From"] = stranger
            headers["Subject"] = f"Re: [{ref}] Printer"
            headers["References"] = row[0]
    elif case == "our-message-id":
        row = _row(
            cur,
            'SELECT message_id, "references" FROM message WHERE ticket_id=?'
            " AND direction='out' ORDER BY id DESC LIMIT 1",
            t,
        )
        if row is None:
            return None
        headers["In-Reply-To"] = row[0]
        headers["References"] = (row[1] + " " + row[0]).strip()
    elif case == "reply-token":
        recipients = [signer.reply_address("support", "example.com", t)]
        headers["To"] = recipients[0]
    elif case == "subject-ref":
        headers["Subject"] = f"Re: [{ref}] Printer"
    elif case == "new":
        headers["From"] = stranger
        headers["Subject"] = f"New problem {rng.getrandbits(20)}"
    elif case in ("dup-bytes", "dup-message-id"):
        return _duplicate(case, cur, rng.randint(1, max_msg))
    raw = fake_raw(headers, 1024)
    parsed = parse(raw)
    key = dedupe_key(Envelope(mail_from=headers["From"], rcpt_tos=recipients), raw)
    return Sample(case, parsed, parsed.from_address or headers["From"], recipients, key)


def time_decisions(engine: Engine, samples: list[Sample]) -> list[tuple[str, str, float]]:
    """(case, decision key, seconds) per sample; one session per message, like the pipeline."""
    signer = Signer(SECRET)
    out: list[tuple[str, str, float]] = []
    for s in samples:
        with Session(engine) as session:
            session.connection()  # begin the transaction outside the timed part
            lookup = SqlLookup(session)
            t0 = time.perf_counter()
            d = decide(
                s.parsed,
                sender=s.sender,
                recipients=s.recipients,
                dedupe_key=s.dedupe_key,
                signer=signer,
                lookup=lookup,
                ref_prefix=PREFIX,
                closed_followup="reopen",
            )
            out.append((s.case, d.disposition, time.perf_counter() - t0))
            session.rollback()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def query_plans(db: Path) -> list[tuple[str, str]]:
    """EXPLAIN QUERY PLAN of the lookups SqlLookup issues (a SCAN means a missing index)."""
    queries = {
        "duplicate_of (dedupe_key)": "SELECT id, ticket_id FROM message WHERE dedupe_key=?",
        "duplicate_of (Message-ID)": "SELECT id, ticket_id FROM message WHERE message_id=?"
        " AND direction='in' ORDER BY id LIMIT 1",
        "ticket_of_message_id": "SELECT ticket_id FROM message WHERE message_id=?"
        " AND ticket_id IS NOT NULL ORDER BY id LIMIT 1",
        "ticket (by id)": "SELECT * FROM ticket WHERE id=?",
        "ticket_by_ref": "SELECT * FROM ticket WHERE ref=?",
        "is_participant": "SELECT id FROM participant WHERE ticket_id=? AND address=?",
        "customer_of": "SELECT customer_id FROM customer_address WHERE address=?",
        "customer (merges)": "SELECT * FROM customer WHERE id=?",
        "ticket_of_outbound (outbox)": "SELECT ticket_id FROM outbox WHERE message_id=?"
        " AND ticket_id IS NOT NULL",
    }
    conn = sqlite3.connect(db)
    try:
        plans = []
        for name, sql in queries.items():
            n = sql.count("?")
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, ("x",) * n).fetchall()
            plans.append((name, "; ".join(r[-1] for r in rows)))
        return plans
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help="cached database file")
    p.add_argument("--rebuild", action="store_true", help="rebuild the database")
    p.add_argument("--tickets", type=int, default=200_000)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--raw-size", type=int, default=600, help="bytes of raw per stored message")
    p.add_argument("--decisions", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    meta = Stored.sidecar(args.db)
    want = {"tickets": args.tickets}
    if args.rebuild or not args.db.exists() or not meta.exists():
        populate(args.db, args.tickets, args.messages, args.raw_size, args.seed)
    else:
        have = json.loads(meta.read_text())
        if have.get("tickets") != want["tickets"]:
            print(f"cached {args.db} has {have}; use --rebuild for other sizes", file=sys.stderr)
        print(
            f"using cached {args.db} ({have['tickets']} tickets, {have['messages']} messages,"
            f" {args.db.stat().st_size / 1e6:.0f} MB); --rebuild to rebuild"
        )

    engine = open_database(f"sqlite:///{args.db}")  # as the gateway opens it
    t0 = time.perf_counter()
    samples = build_samples(engine, args.decisions, args.seed + 1)
    print(
        f"prepared and parsed {len(samples)} incoming messages in"
        f" {time.perf_counter() - t0:.1f} s (not timed)"
    )
    time_decisions(engine, samples[: min(200, len(samples))])  # warm-up: caches, statements
    results = time_decisions(engine, samples)
    engine.dispose()

    by_case: dict[str, list[float]] = defaultdict(list)
    keys: dict[str, Counter[str]] = defaultdict(Counter)
    for case, key, sec in results:
        by_case[case].append(sec)
        keys[case][key] += 1
    print(f"\nthreading decision (decide + SqlLookup), {len(results)} decisions, ms:")
    print(f"{'case':<18} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}  decided as")
    for case in CASES:
        v = by_case.get(case)
        if not v:
            continue
        how = ", ".join(f"{k} {n}" for k, n in keys[case].most_common())
        print(
            f"{case:<18} {len(v):>5} {pct(v, 0.5):7.3f} {pct(v, 0.95):7.3f} {pct(v, 0.99):7.3f}"
            f" {max(v) * 1000:7.3f}  {how}"
        )
    allv = [r[2] for r in results]
    print(
        f"{'all':<18} {len(allv):>5} {pct(allv, 0.5):7.3f} {pct(allv, 0.95):7.3f}"
        f" {pct(allv, 0.99):7.3f} {max(allv) * 1000:7.3f}  mean {statistics.mean(allv) * 1000:.3f}"
    )
    verdict = "meets" if pct(allv, 0.99) < 5.0 else "MISSES"
    print(f"goal p99 < 5 ms: {verdict}")

    print("\nquery plans of the lookups:")
    for name, plan in query_plans(args.db):
        flag = "  <-- no index" if "SCAN" in plan and "USING" not in plan else ""
        print(f"  {name:<28} {plan}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
