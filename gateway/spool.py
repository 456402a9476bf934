"""The durable spool: what `250` promises (RFC 5321 §4.2.5, §6.1).

A message is acknowledged only after its raw bytes and envelope are committed to a SQLite
file in WAL mode with `synchronous=FULL` (every commit is fsynced; the spool directory is
fsynced once after the database files are created, so their directory entries are durable).

Group commit (docs/design.md §2): SMTP sessions hand their message to one writer thread, which
takes *everything* queued, inserts it in one transaction and commits once. It never waits a
fixed window: when idle it flushes at once, and whatever arrives during a flush forms the
next batch. One fsync thus serves every session of a burst.

Life of an entry: `pending` -> claimed by the pipeline (`claimed`, attempts + 1) -> deleted
after the ticket database has committed it (`release`), or back to `pending` on failure, or
`quarantined` with the reason after `max_attempts` failures. A failed entry waits before its
next attempt (1 min, doubling, at most 1 h; by the injected clock) so one poison message
cannot spin the worker. On start, `recover()` puts
claimed entries (a crash mid-processing) back to `pending`. Nothing is deleted before the
database has it; the database dedupes if an entry is processed twice.

A large message (streamed to a file by the SMTP edge, docs/smtp.md) is copied into the
spool in 1 MiB pieces (table `spool_part`, the entry's `raw` left empty) so that neither
the session nor the writer ever holds it whole; `claim` and `get` put it back together.
Everything here is created private (0700 folders, 0600 files, WAL and SHM included),
whatever the umask: the spool holds customers' mail.

The write is idempotent: an entry is keyed by a hash of envelope and bytes, so a client that
disconnected before seeing `250` and sends again does not create a second entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.clock import Clock, SystemClock

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    envelope TEXT NOT NULL,
    raw BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    quarantined_at TEXT,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spool_state ON spool(state, id);
CREATE TABLE IF NOT EXISTS spool_part (
    entry_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (entry_id, seq)
);
CREATE TRIGGER IF NOT EXISTS spool_part_gc AFTER DELETE ON spool BEGIN
    DELETE FROM spool_part WHERE entry_id = old.id;
END;
"""
# What one `claim` hands the pipeline at most (beyond its first entry).
CLAIM_BYTES = 64 * 1024 * 1024
# Pieces of a large message: small enough that the writer thread never holds much at once.
PART_SIZE = 1024 * 1024
# Sizes for SELECTs that report an entry's size (raw, or the sum of its parts).
_SIZE_SQL = (
    "length(raw) + coalesce((SELECT sum(length(data)) FROM spool_part p"
    " WHERE p.entry_id = spool.id), 0)"
)


class SpoolFull(Exception):
    """Not enough free disk to accept more mail: answer `452 4.3.1`, the sender retries."""


@dataclass
class Envelope:
    """What the SMTP session knew about a message besides its bytes."""

    mail_from: str
    rcpt_tos: list[str]
    peer: str = ""
    helo: str = ""
    received_at: str = ""  # ISO 8601 UTC
    smtputf8: bool = False
    # Bytes that arrived beyond smtp.max_receive_size and were not kept (0: complete).
    truncated_bytes: int = 0
    source: str = "smtp"  # smtp | pipe | junk-release
    # The junk folder entry `junk release` put back in line (docs/decisions.md D18): processed as if
    # it had just arrived, never sent back to the junk folder by a route or the block list.
    released_from: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Envelope:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class SpoolEntry:
    id: int
    envelope: Envelope
    raw: bytes
    attempts: int
    state: str
    last_error: str | None = None
    received_at: str = ""
    dedupe_key: str = ""


def _envelope_hash(envelope: Envelope) -> Any:
    h = hashlib.sha256()
    h.update(envelope.mail_from.lower().encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    for r in sorted(x.lower() for x in envelope.rcpt_tos):
        h.update(r.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h


def dedupe_key(envelope: Envelope, raw: bytes) -> str:
    """Hash of the envelope (sender, recipients) and the raw bytes (docs/design.md §2)."""
    h = _envelope_hash(envelope)
    h.update(raw)
    return str(h.hexdigest())


def file_dedupe_key(envelope: Envelope, path: Path) -> str:
    """`dedupe_key` of a message held in a file, read piece by piece."""
    h = _envelope_hash(envelope)
    with open(path, "rb") as f:
        while piece := f.read(PART_SIZE):
            h.update(piece)
    return str(h.hexdigest())


def resolver(loop: Any, fut: Any) -> Callable[[int | None, BaseException | None], None]:
    """The writer thread's "done" callback for one waiting session: it settles `fut` (an
    asyncio future on `loop`) with the spool id or the error, from any thread."""

    def done(entry_id: int | None, error: BaseException | None) -> None:
        def resolve() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                assert entry_id is not None
                fut.set_result(entry_id)

        loop.call_soon_threadsafe(resolve)

    return done


def quarantine_row(r: Any) -> dict[str, Any]:
    """One quarantined entry for `quarantine list`: (id, received_at, envelope JSON, size,
    attempts, last_error, quarantined_at) as a dict (the SQLite and the shared spool)."""
    env = Envelope.from_json(r[2])
    return {
        "id": r[0],
        "received_at": r[1],
        "mail_from": env.mail_from,
        "rcpt_tos": env.rcpt_tos,
        "size": r[3],
        "attempts": r[4],
        "reason": r[5],
        "quarantined_at": r[6],
    }


def _private(path: Path, mode: int) -> None:
    """chmod what we own; an admin's CLI run as another user leaves it as it is."""
    with contextlib.suppress(PermissionError):
        os.chmod(path, mode)


def _private_file(path: Path) -> None:
    """Create `path` 0600 if missing, else make it 0600: SQLite gives its WAL and SHM
    files the mode of the database file, so this makes all three private."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    _private(path, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so a committed entry survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@dataclass
class _Pending:
    key: str
    envelope: Envelope
    raw: bytes
    done: Callable[[int | None, BaseException | None], None]
    id: int | None = field(default=None)
    path: Path | None = None  # the bytes are in this file instead (a large message)


class Spool:
    """The spool database plus its group-commit writer thread."""

    FILE = "spool.sqlite3"

    def __init__(
        self,
        directory: Path,
        *,
        max_attempts: int = 5,
        min_free_disk: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clock: Clock = clock or SystemClock()
        self.path = self.directory / self.FILE
        # Large DATA is streamed here before it is copied in (gateway/inbound/smtp.py).
        self.tmp_dir = self.directory / "tmp"
        self.max_attempts = max_attempts
        self.min_free_disk = min_free_disk
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None  # for claim/release (one caller thread)
        self._lock = threading.Lock()
        self.on_commit: Callable[[], None] | None = None
        self.batches = 0

    # Lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(self.directory, 0o700)
        with contextlib.suppress(PermissionError):  # a CLI run by another user
            self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
            _private(self.tmp_dir, 0o700)
        for name in (self.FILE, self.FILE + "-wal", self.FILE + "-shm"):
            if name == self.FILE or (self.directory / name).exists():
                _private_file(self.directory / name)
        conn = _connect(self.path)
        conn.executescript(SCHEMA)
        conn.close()
        # The database and WAL files exist now; make their directory entries durable.
        _fsync_dir(self.directory)
        self._conn = _connect(self.path)

    def start_writer(self) -> None:
        if self._writer is None:
            # Files left by a session that was streaming when the daemon stopped: nothing
            # was promised for them (no `250`), the senders send them again.
            for leftover in self.tmp_dir.glob("data-*"):
                leftover.unlink(missing_ok=True)
            # Spool's own loop, also in a subclass with a writer of its own (SharedSpool).
            self._writer = threading.Thread(
                target=Spool._write_loop, args=(self,), name="spool-writer"
            )
            self._writer.daemon = True
            self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("spool is not open")
        return self._conn

    # Writing (group commit) -----------------------------------------------------------

    def check_disk(self) -> None:
        if self.min_free_disk:
            st = os.statvfs(self.directory)
            if st.f_bavail * st.f_frsize < self.min_free_disk:
                raise SpoolFull(f"less than {self.min_free_disk} bytes free in {self.directory}")

    async def submit(self, envelope: Envelope, raw: bytes) -> int:
        """Make one message durable; return its spool id once the commit is fsynced."""
        import asyncio  # here, not at the top: pipe-mode ingest never needs it (start-up time)

        self.check_disk()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        done = resolver(loop, fut)

        self._queue.put(_Pending(dedupe_key(envelope, raw), envelope, raw, done))
        # Shielded: a client that disconnects mid-wait cancels its session, not the write.
        return await asyncio.shield(fut)

    async def submit_file(self, envelope: Envelope, path: Path) -> int:
        """Like `submit`, for a message held in a file; the spool removes the file.

        The file is the spool's from the call on, whatever happens: it is deleted once the
        commit is done or has failed (never while the writer may still read it).
        """
        import asyncio  # not at the top: pipe-mode ingest never needs it (start-up time)

        return await asyncio.shield(self._submit_file(envelope, path))

    async def _submit_file(self, envelope: Envelope, path: Path) -> int:
        try:
            self.check_disk()
            import asyncio  # not at the top: pipe-mode ingest never needs it (start-up time)

            key = await asyncio.to_thread(file_dedupe_key, envelope, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        done = resolver(loop, fut)

        self._queue.put(_Pending(key, envelope, b"", done, path=path))
        return await fut

    def submit_sync(self, envelope: Envelope, raw: bytes) -> int:
        """Durable write without the writer thread (pipe mode: one message per process)."""
        self.check_disk()
        item = _Pending(dedupe_key(envelope, raw), envelope, raw, lambda i, e: None)
        with self._lock:
            self._commit_batch(self.conn, [item])
        assert item.id is not None
        return item.id

    def _write_loop(self) -> None:  # noqa: C901  (one group-commit writer loop; splitting hides the fsync order)
        conn = _connect(self.path)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                # Take everything that is already waiting: the group for this one fsync.
                while True:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                error: BaseException | None = None
                try:
                    self._commit_batch(conn, batch)
                except BaseException as exc:  # report to every waiting session: 451
                    error = exc
                for item in batch:  # streamed files are copied in (or failed): remove them
                    if item.path is not None:
                        item.path.unlink(missing_ok=True)
                if error is not None:
                    for item in batch:
                        item.done(None, error)
                else:
                    for item in batch:
                        item.done(item.id, None)
                    if self.on_commit is not None:
                        self.on_commit()
                if stop:
                    return
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        self.batches += 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in batch:
                env = item.envelope
                if not env.received_at:
                    env.received_at = self.clock.now().isoformat()
                cur = conn.execute(
                    "INSERT INTO spool(dedupe_key, received_at, envelope, raw) VALUES (?,?,?,?)"
                    " ON CONFLICT(dedupe_key) DO NOTHING",
                    (item.key, env.received_at, env.to_json(), item.raw),
                )
                if cur.rowcount:
                    item.id = cur.lastrowid
                    if item.path is not None:
                        self._insert_parts(conn, cur.lastrowid, item.path)
                else:  # the same message again (client retry): keep the first entry
                    row = conn.execute(
                        "SELECT id FROM spool WHERE dedupe_key=?", (item.key,)
                    ).fetchone()
                    item.id = row[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _insert_parts(conn: sqlite3.Connection, entry_id: int | None, path: Path) -> None:
        with open(path, "rb") as f:
            seq = 0
            while piece := f.read(PART_SIZE):
                conn.execute(
                    "INSERT INTO spool_part(entry_id, seq, data) VALUES (?,?,?)",
                    (entry_id, seq, piece),
                )
                seq += 1

    @staticmethod
    def _full_raw(conn: sqlite3.Connection, entry_id: int, raw: bytes) -> bytes:
        """The entry's bytes: `raw`, or (a large message) its pieces in order."""
        if raw:
            return bytes(raw)
        parts = conn.execute(
            "SELECT data FROM spool_part WHERE entry_id=? ORDER BY seq", (entry_id,)
        ).fetchall()
        return b"".join(bytes(p[0]) for p in parts)

    # Claiming (pipeline side) ---------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def recover(self) -> int:
        """After a crash: entries claimed but never released go back to `pending`."""
        with self._tx() as conn:
            cur = conn.execute("UPDATE spool SET state='pending' WHERE state='claimed'")
            return cur.rowcount

    def recover_crashed(
        self, culprit: int | None, reason: str, claimant: str | None = None
    ) -> str | None:
        """The pipeline process died: entries it had claimed go back in line without cost,
        except `culprit` (the entry it was busy with), which is charged the attempt like a
        failure and quarantined after `max_attempts` (a message that kills the process must
        not take the pipeline down for good). Returns the culprit's new state. `claimant`
        names the process on a shared spool; this one has a single pipeline process."""
        state = None
        if culprit is not None:
            state = self.fail(culprit, reason)
        with self._tx() as conn:
            conn.execute(
                "UPDATE spool SET state='pending', attempts=max(attempts-1, 0)"
                " WHERE state='claimed'"
            )
        return state

    def claim(self, limit: int = 50) -> list[SpoolEntry]:
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT id, envelope, {_SIZE_SQL}, attempts, state, last_error, received_at,"  # noqa: S608 (_SIZE_SQL is a constant)
                " dedupe_key FROM spool WHERE state='pending' AND not_before <= ?"
                " ORDER BY id LIMIT ?",
                (self.clock.now().timestamp(), limit),
            ).fetchall()
            # At most CLAIM_BYTES of mail per batch (at least one entry): fifty 100 MiB
            # messages must not all be held at once by the pipeline (docs/decisions.md D10.7).
            total = 0
            for n, r in enumerate(rows):
                total += r[2]
                if n and total > CLAIM_BYTES:
                    rows = rows[:n]
                    break
            if rows:
                conn.executemany(
                    "UPDATE spool SET state='claimed', attempts=attempts+1 WHERE id=?",
                    [(r[0],) for r in rows],
                )
            raws = {
                r[0]: self._full_raw(
                    conn,
                    r[0],
                    conn.execute("SELECT raw FROM spool WHERE id=?", (r[0],)).fetchone()[0],
                )
                for r in rows
            }
        return [
            SpoolEntry(
                id=r[0],
                envelope=Envelope.from_json(r[1]),
                raw=raws[r[0]],
                attempts=r[3] + 1,
                state="claimed",
                last_error=r[5],
                received_at=r[6],
                dedupe_key=r[7],
            )
            for r in rows
        ]

    def unclaim(self, ids: list[int]) -> None:
        """Put claimed entries back in line untouched (the attempt does not count)."""
        with self._tx() as conn:
            conn.executemany(
                "UPDATE spool SET state='pending', attempts=attempts-1"
                " WHERE id=? AND state='claimed'",
                [(i,) for i in ids],
            )

    #: Does the spool live in the ticket database, so that `release_in` forgets processed
    #: entries in the transaction that commits their tickets? (The shared spool does; this
    #: file is a database of its own, released after the ticket database's commit.)
    releases_in_transaction = False

    def release_in(self, conn: Any, ids: list[int]) -> None:
        """Forget `ids` on `conn`, the ticket database's transaction (only when
        `releases_in_transaction`)."""
        raise NotImplementedError("this spool is released after the ticket database commits")

    def release(self, entry_id: int) -> None:
        """The ticket database has committed the message: the spool may forget it."""
        with self._tx() as conn:
            conn.execute("DELETE FROM spool WHERE id=?", (entry_id,))

    def release_many(self, ids: list[int]) -> None:
        """`release` for a group committed in one database transaction: one spool commit."""
        with self._tx() as conn:
            conn.executemany("DELETE FROM spool WHERE id=?", [(i,) for i in ids])

    def fail(self, entry_id: int, reason: str) -> str:
        """Record a processing failure; quarantine after `max_attempts`. Returns the new state."""
        with self._tx() as conn:
            row = conn.execute("SELECT attempts FROM spool WHERE id=?", (entry_id,)).fetchone()
            if row is None:
                return "gone"
            if row[0] >= self.max_attempts:
                conn.execute(
                    "UPDATE spool SET state='quarantined', last_error=?, quarantined_at=?"
                    " WHERE id=?",
                    (reason, self.clock.now().isoformat(), entry_id),
                )
                return "quarantined"
            delay = min(60 * 2 ** (row[0] - 1), 3600)
            conn.execute(
                "UPDATE spool SET state='pending', last_error=?, not_before=? WHERE id=?",
                (reason, self.clock.now().timestamp() + delay, entry_id),
            )
            return "pending"

    def quarantine(self, entry_id: int, reason: str) -> None:
        """Move straight to the quarantine (a message no retry can help)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE spool SET state='quarantined', last_error=?, quarantined_at=? WHERE id=?",
                (reason, self.clock.now().isoformat(), entry_id),
            )

    # Inspection and replay ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, count(*) FROM spool GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def quarantined(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT id, received_at, envelope, {_SIZE_SQL}, attempts, last_error, quarantined_at"  # noqa: S608 (_SIZE_SQL is a constant)
            " FROM spool WHERE state='quarantined' ORDER BY id"
        ).fetchall()
        return [quarantine_row(r) for r in rows]

    def get(self, entry_id: int) -> SpoolEntry | None:
        r = self.conn.execute(
            "SELECT id, envelope, raw, attempts, state, last_error, received_at, dedupe_key"
            " FROM spool WHERE id=?",
            (entry_id,),
        ).fetchone()
        if r is None:
            return None
        return SpoolEntry(
            id=r[0],
            envelope=Envelope.from_json(r[1]),
            raw=self._full_raw(self.conn, r[0], r[2]),
            attempts=r[3],
            state=r[4],
            last_error=r[5],
            received_at=r[6],
            dedupe_key=r[7],
        )

    def replay(self, entry_id: int) -> bool:
        """Put a quarantined entry back in line with a fresh attempt counter."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE spool SET state='pending', attempts=0, quarantined_at=NULL, not_before=0"
                " WHERE id=? AND state='quarantined'",
                (entry_id,),
            )
            return cur.rowcount == 1

    def replay_all(self) -> list[int]:
        """Put every quarantined entry back in line (`quarantine replay --all`)."""
        with self._tx() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM spool WHERE state='quarantined' ORDER BY id"
                ).fetchall()
            ]
            conn.executemany(
                "UPDATE spool SET state='pending', attempts=0, quarantined_at=NULL, not_before=0"
                " WHERE id=? AND state='quarantined'",
                [(i,) for i in ids],
            )
        return ids
