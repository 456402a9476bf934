"""The spool in PostgreSQL: a `250` that does not depend on one node's disk (docs/decisions.md D13).

With several nodes on one PostgreSQL, a message accepted into one node's local spool was
stranded there when that node died (and lost with its disk). `SharedSpool` keeps the same
promise as the SQLite spool (gateway/spool.py: `250` only after a durable commit, group
commit, idempotent by envelope+bytes hash) but commits to the `spool_entry` table of the
shared database, so any node's pipeline can process any message:

- **Ingest**: SMTP sessions hand their message to one writer thread that takes everything
  queued and inserts it with one statement and one commit (PostgreSQL's own WAL flush,
  `synchronous_commit = on`, is the fsync). Same group commit as the SQLite spool.
- **Fallback**: if the database does not answer (connection refused, cut network: the
  writer's connection gives up after a few seconds, `tcp_user_timeout`), the batch is
  committed to the node's local SQLite spool instead, so a node whose disk works never
  answers 4xx for a database outage. While the database stays away only a probe every
  `RETRY` seconds tries it; the local entries are moved into the database (insert, commit,
  then delete locally) by this node when it answers again. Only those entries wait on
  this node's disk, and only while the database is unreachable.
- **Claims**: the pipeline claims with `FOR UPDATE SKIP LOCKED`, so nodes never claim the
  same entry at once; a claim names the node and carries a lease (`LEASE` seconds,
  renewed every third of it while the claiming process lives). The entries of a node that
  died are claimed again by any node when the lease has run out;
  a node that restarts takes back its own at once (`recover`). An entry processed twice
  (lease ran out on a slow node) is recognised by the ticket database (dedupe key,
  Message-ID, both under an advisory lock), as with the SQLite spool.

The class *is* a `Spool` (the local SQLite spool, used for the fallback and drained), with
the pipeline-facing methods answered from the database: the SMTP handler and the pipeline
worker use it through the same methods (`submit`, `claim`, `release`, `fail`, `unclaim`,
`quarantine`, `recover`, ...). Only the public methods of `Spool` are used for the local
part, so changes inside spool.py do not reach in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from gateway.clock import Clock
from gateway.node import pipeline_claimants
from gateway.spool import Envelope, Spool, SpoolEntry, dedupe_key, quarantine_row, resolver

log = logging.getLogger("gateway.spool")

_COLUMNS = "id, envelope, raw, attempts, state, last_error, received_at, dedupe_key"


@dataclass
class _Item:
    key: str
    envelope: Envelope
    raw: bytes
    done: Callable[[int | None, BaseException | None], None]
    id: int | None = field(default=None)


def _entry(r: Any) -> SpoolEntry:
    return SpoolEntry(
        id=r[0],
        envelope=Envelope.from_json(r[1]),
        raw=bytes(r[2]),
        attempts=r[3],
        state=r[4],
        last_error=r[5],
        received_at=r[6],
        dedupe_key=r[7],
    )


class SharedSpool(Spool):
    """The spool in the shared database, with the local SQLite spool as the fallback."""

    #: Seconds a claim holds an entry unless renewed; after that any node may take it (a
    #: dead node's). A live node renews its claims every LEASE/3 seconds.
    LEASE = 15.0
    #: At most this many entries per claim: few enough to finish well inside the lease.
    CLAIM_MAX = 10
    #: Seconds between attempts to reach the database while writing locally.
    RETRY = 2.0

    def __init__(
        self,
        directory: Path,
        *,
        engine: Engine,
        node: str,
        max_attempts: int = 5,
        min_free_disk: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            directory, max_attempts=max_attempts, min_free_disk=min_free_disk, clock=clock
        )
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.node = node
        self._url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._items: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._local_waiting = True  # look once at start: entries from before / a crash
        self.fallbacks = 0  # batches written locally because the database did not answer
        self.drained = 0  # local entries moved into the database
        self._renewer: threading.Thread | None = None
        self._closing = threading.Event()

    # Lifecycle ------------------------------------------------------------------------

    def start_writer(self) -> None:
        # The local spool's own writer too: a large message that the SMTP edge streamed to a
        # file (`submit_file`) is committed there in pieces, never held whole in memory, and
        # moved into the database by this writer's drain within RETRY seconds.
        Spool.start_writer(self)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="shared-spool-writer")
            self._thread.daemon = True
            self._thread.start()

    async def submit_file(self, envelope: Envelope, path: Path) -> int:
        """A large message: durable in the local spool first (`250` after its fsync, as on
        SQLite), then moved into the shared database by the drain (see `start_writer`)."""
        entry_id = await Spool.submit_file(self, envelope, path)
        self._local_waiting = True
        return entry_id

    def close(self) -> None:
        if self._thread is not None:
            self._items.put(None)
            self._thread.join()
            self._thread = None
        self._closing.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        super().close()

    def _renew_loop(self) -> None:
        """Extend this node's claims while this process lives (a slow message, a DNS
        budget spent on each of a batch, must not let another node take them)."""
        while not self._closing.wait(self.LEASE / 3):
            try:
                with self._one() as conn:
                    conn.execute(
                        text(
                            "UPDATE spool_entry SET lease_until=:until"
                            " WHERE state='claimed' AND claimed_by=:node"
                        ),
                        {"until": self._now() + self.LEASE, "node": self.node},
                    )
            except Exception as exc:  # the database is away: the pipeline pauses anyway
                log.debug("spool claims not renewed: %r", exc)

    # Writing --------------------------------------------------------------------------

    async def submit(self, envelope: Envelope, raw: bytes) -> int:
        """Make one message durable (database, else local disk); return its id."""
        self.check_disk()  # the fallback must be possible: refuse early, as before
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        done = resolver(loop, fut)

        if not envelope.received_at:
            envelope.received_at = self.clock.now().isoformat()
        self._items.put(_Item(dedupe_key(envelope, raw), envelope, raw, done))
        # Shielded: a client that disconnects mid-wait cancels its session, not the write.
        return await asyncio.shield(fut)

    def submit_sync(self, envelope: Envelope, raw: bytes) -> int:
        """One message, no writer thread (pipe mode): the database, else the local spool."""
        if not envelope.received_at:
            envelope.received_at = self.clock.now().isoformat()
        item = _Item(dedupe_key(envelope, raw), envelope, raw, lambda i, e: None)
        try:
            with self._pg() as conn:
                self._insert(conn, [item])
        except Exception as exc:
            log.warning("database unreachable (%r): message kept in the local spool", exc)
            return Spool.submit_sync(self, envelope, raw)
        assert item.id is not None
        return item.id

    def _connect(self) -> Any:
        import psycopg

        # Short timeouts: SMTP sessions wait on this connection. A refused connection fails
        # at once, an unanswered one after connect_timeout, and a connection whose peer
        # vanished mid-write after tcp_user_timeout (not the minute keepalives would take).
        # Autocommit: every use is `_insert`, one statement, durable when it returns (the
        # server commits, WAL flushed, before it reports the statement done). A BEGIN and a
        # COMMIT around it were two more round trips per group commit (docs/performance.md §9).
        return psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=3,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=5000,
        )

    @contextlib.contextmanager
    def _pg(self) -> Iterator[Any]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _insert(self, conn: Any, batch: list[_Item]) -> None:
        """Insert a batch in one statement, committed as it ends (the group commit; `conn`
        is in autocommit)."""
        keys = [i.key for i in batch]
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO spool_entry(dedupe_key, received_at, envelope, raw, accepted_by)"
                " SELECT k, r, e, b, %s FROM unnest(%s::text[], %s::text[], %s::text[],"
                " %s::bytea[]) AS t(k, r, e, b)"
                " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, dedupe_key",
                (
                    self.node,
                    keys,
                    [i.envelope.received_at for i in batch],
                    [i.envelope.to_json() for i in batch],
                    [i.raw for i in batch],
                ),
            )
            ids = {k: i for i, k in cur.fetchall()}
            missing = [k for k in keys if k not in ids]
            if missing:  # the same message again (a client retry): keep the first entry
                cur.execute(
                    "SELECT id, dedupe_key FROM spool_entry WHERE dedupe_key = ANY(%s)",
                    (missing,),
                )
                ids.update({k: i for i, k in cur.fetchall()})
        for item in batch:
            item.id = ids.get(item.key)
            if item.id is None:  # processed and released between insert and select
                item.id = 0

    def _write_loop(self) -> None:  # noqa: C901  (one writer loop: batch, write, drain, stop in that order)
        conn: Any = None
        try:
            while True:
                try:
                    first = self._items.get(timeout=self.RETRY)
                except queue.Empty:
                    # Idle: look at the local spool (cheap when empty), whatever put mail
                    # there (a fallback write, a crash, a path that bypassed `submit`).
                    first = _IDLE
                    self._local_waiting = True
                if first is None:
                    return
                batch: list[_Item] = [] if first is _IDLE else [first]
                stop = False
                while batch:  # take everything already waiting: one commit for all
                    try:
                        nxt = self._items.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                if batch:
                    conn = self._write(conn, batch)
                if self._local_waiting and time.monotonic() >= self._retry_at:
                    conn = self._drain(conn)
                if stop:
                    return
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _write(self, conn: Any, batch: list[_Item]) -> Any:
        if time.monotonic() >= self._retry_at:
            conn, stored = self._write_database(conn, batch)
            if stored:
                return conn
        # The fallback: this node's disk, exactly as without PostgreSQL.
        self.fallbacks += 1
        for item in batch:
            try:
                entry_id = Spool.submit_sync(self, item.envelope, item.raw)
            except BaseException as exc:  # disk full or failing: 452/451, the sender retries
                item.done(None, exc)
            else:
                self._local_waiting = True
                item.done(entry_id, None)
        return conn

    def _write_database(self, conn: Any, batch: list[_Item]) -> tuple[Any, bool]:
        """Insert and commit ``batch``: (connection, True), or on failure (None, False) with
        the retry time set, the batch left for the local spool."""
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            self._insert(conn, batch)
        except Exception as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._retry_at = time.monotonic() + self.RETRY
            log.warning(
                "database unreachable (%r): accepting into the local spool %s until it"
                " answers again",
                exc,
                self.directory,
            )
            return None, False
        self.batches += 1
        for item in batch:
            item.done(item.id, None)
        if self.on_commit is not None:
            self.on_commit()
        return conn, True

    def _drain(self, conn: Any) -> Any:
        """Move what waits in the local spool into the database (insert, commit, delete)."""
        moved = 0
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            while True:
                entries = Spool.claim(self, 200)
                if not entries:
                    break
                items = [_Item(e.dedupe_key, e.envelope, e.raw, lambda i, x: None) for e in entries]
                try:
                    self._insert(conn, items)
                except BaseException:
                    Spool.unclaim(self, [e.id for e in entries])
                    raise
                for e in entries:
                    Spool.release(self, e.id)
                moved += len(entries)
            self._local_waiting = False
        except Exception as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            self._retry_at = time.monotonic() + self.RETRY
            log.debug("local spool not drained yet: %r", exc)
        if moved:
            self.drained += moved
            log.warning("moved %d messages from the local spool into the database", moved)
            if self.on_commit is not None:
                self.on_commit()
        return conn

    def local_counts(self) -> dict[str, int]:
        return Spool.counts(self)

    # Claiming (pipeline side) ---------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _one(self) -> Iterator[Connection]:
        """For a single statement: autocommit, atomic by itself, where a transaction around
        it added a BEGIN and a COMMIT round trip (a claim every 0.1 s per idle pipeline
        process, and one per batch under load)."""
        with self._autocommit.connect() as conn:
            yield conn

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def recover(self) -> int:
        """At start: this node's claims from its previous run go back in line at once,
        those of each of its pipeline processes included (gateway/node.py)."""
        local = Spool.recover(self)
        with self._one() as conn:
            cur = conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', claimed_by='', lease_until=0"
                    " WHERE state='claimed' AND claimed_by = ANY(:names)"
                ),
                {"names": pipeline_claimants(self.node)},
            )
            return int(cur.rowcount) + local

    def recover_crashed(
        self, culprit: int | None, reason: str, claimant: str | None = None
    ) -> str | None:
        """As `Spool.recover_crashed`, for the pipeline process that claimed as `claimant`
        (default: this node's name): the node's other pipeline processes keep theirs."""
        state = None
        if culprit is not None:
            state = self.fail(culprit, reason)
        with self._db() as conn:
            conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', attempts=greatest(attempts-1, 0),"
                    " claimed_by='', lease_until=0 WHERE state='claimed' AND claimed_by=:node"
                ),
                {"node": claimant or self.node},
            )
        return state

    def claim(self, limit: int = 50) -> list[SpoolEntry]:
        if self._renewer is None:  # in the process that claims (the pipeline's)
            self._renewer = threading.Thread(
                target=self._renew_loop, name="spool-lease-renewer", daemon=True
            )
            self._renewer.start()
        now = self._now()
        # The waiting entries and those whose claimant's lease ran out, oldest first. Two
        # ordered index scans rather than one `... OR ...`: PostgreSQL answers the OR with
        # bitmap index scans, which never mark dead index entries, so every claim read all
        # the entries claimed and deleted since the last autovacuum (3.0 million index
        # entries read by 4,172 claims in 40 s at 50 messages a second; docs/performance.md
        # §8). A plain index scan marks them as it passes. The rows locked but left out by
        # the final LIMIT are free again at this transaction's commit, a moment later.
        with self._one() as conn:
            rows = conn.execute(
                text(
                    "WITH waiting AS (SELECT id FROM spool_entry"  # noqa: S608 (only constant SQL is formatted in; values are bound)
                    " WHERE state='pending' AND not_before <= :now"
                    " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED),"
                    " expired AS (SELECT id FROM spool_entry"
                    " WHERE state='claimed' AND lease_until < :now"
                    " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)"
                    " UPDATE spool_entry SET state='claimed', attempts=attempts+1,"
                    " claimed_by=:node, lease_until=:until WHERE id IN ("
                    " SELECT id FROM (SELECT id FROM waiting UNION ALL SELECT id FROM expired) due"
                    " ORDER BY id LIMIT :n)"
                    f" RETURNING {_COLUMNS}"
                ),
                {
                    "node": self.node,
                    "until": now + self.LEASE,
                    "now": now,
                    "n": min(limit, self.CLAIM_MAX),
                },
            ).fetchall()
        return sorted((_entry(r) for r in rows), key=lambda e: e.id)

    def unclaim(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._one() as conn:
            conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', attempts=attempts-1, claimed_by='',"
                    " lease_until=0 WHERE id = ANY(:ids) AND state='claimed' AND claimed_by=:node"
                ),
                {"ids": list(ids), "node": self.node},
            )

    releases_in_transaction = True

    def release_in(self, conn: Any, ids: list[int]) -> None:
        """Forget processed entries in the transaction that commits their tickets: one
        commit where there were two, and no moment at which a crash leaves a processed
        entry behind to be processed (and recognised as a duplicate) again."""
        conn.execute(text("DELETE FROM spool_entry WHERE id = ANY(:ids)"), {"ids": list(ids)})

    def release(self, entry_id: int) -> None:
        with self._one() as conn:
            conn.execute(text("DELETE FROM spool_entry WHERE id=:id"), {"id": entry_id})

    def release_many(self, ids: list[int]) -> None:
        with self._one() as conn:
            self.release_in(conn, ids)

    def fail(self, entry_id: int, reason: str) -> str:
        with self._db() as conn:
            row = conn.execute(
                text("SELECT attempts FROM spool_entry WHERE id=:id FOR UPDATE"), {"id": entry_id}
            ).first()
            if row is None:
                return "gone"
            if row[0] >= self.max_attempts:
                conn.execute(
                    text(
                        "UPDATE spool_entry SET state='quarantined', last_error=:r,"
                        " quarantined_at=:t, claimed_by='' WHERE id=:id"
                    ),
                    {"r": reason, "t": self.clock.now().isoformat(), "id": entry_id},
                )
                return "quarantined"
            delay = min(60 * 2 ** (row[0] - 1), 3600)
            conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', last_error=:r, not_before=:nb,"
                    " claimed_by='', lease_until=0 WHERE id=:id"
                ),
                {"r": reason, "nb": self._now() + delay, "id": entry_id},
            )
            return "pending"

    def quarantine(self, entry_id: int, reason: str) -> None:
        with self._db() as conn:
            conn.execute(
                text(
                    "UPDATE spool_entry SET state='quarantined', last_error=:r, quarantined_at=:t,"
                    " claimed_by='' WHERE id=:id"
                ),
                {"r": reason, "t": self.clock.now().isoformat(), "id": entry_id},
            )

    # Inspection and replay ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Entries by state in the database; `local` = waiting on this node's disk."""
        with self._db() as conn:
            rows = conn.execute(
                text("SELECT state, count(*) FROM spool_entry GROUP BY state")
            ).fetchall()
        out = {r[0]: int(r[1]) for r in rows}
        local = sum(Spool.counts(self).values())
        if local:
            out["local"] = local
        return out

    def quarantined(self) -> list[dict[str, Any]]:
        with self._db() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, received_at, envelope, length(raw), attempts, last_error,"
                    " quarantined_at FROM spool_entry WHERE state='quarantined' ORDER BY id"
                )
            ).fetchall()
        return [quarantine_row(r) for r in rows]

    def get(self, entry_id: int) -> SpoolEntry | None:
        with self._db() as conn:
            r = conn.execute(
                text(f"SELECT {_COLUMNS} FROM spool_entry WHERE id=:id"),  # noqa: S608 (a constant)
                {"id": entry_id},
            ).first()
        return _entry(r) if r is not None else None

    def replay(self, entry_id: int) -> bool:
        with self._db() as conn:
            cur = conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', attempts=0, quarantined_at=NULL,"
                    " not_before=0 WHERE id=:id AND state='quarantined'"
                ),
                {"id": entry_id},
            )
            return int(cur.rowcount) == 1

    def replay_all(self) -> list[int]:
        with self._db() as conn:
            rows = conn.execute(
                text(
                    "UPDATE spool_entry SET state='pending', attempts=0, quarantined_at=NULL,"
                    " not_before=0 WHERE state='quarantined' RETURNING id"
                )
            ).fetchall()
        return sorted(int(r[0]) for r in rows)


#: Sentinel for "the queue was idle for RETRY seconds" (time to try a drain).
_IDLE: Any = object()
