"""Infrastructure faults are not message faults (docs/decisions.md D10.5 and 6).

A message that fails on its own (a bug its content triggers) should cost attempts and end
in the quarantine; a database that refuses connections, a full disk or a broken filesystem
says nothing about the message in hand, and counting it against the message quarantines
everything that arrives during an outage. `classify_fault` is the pure decision; `probe`
asks the infrastructure whether it is back (a `SELECT 1` and the free-space check of every
folder the pipeline writes to).

Classification follows what the error *is*, never its text alone, except for SQLite, whose
single `OperationalError` class carries "database or disk is full", "disk I/O error",
"unable to open database file" and "database is locked" alike (all infrastructure; the text
only tells disk from database). PostgreSQL errors carry
an SQLSTATE: class 08 (connection), 53 (insufficient resources: disk full, out of memory,
too many connections), 57P (operator intervention: shutdown, cannot connect now) and 58
(system error, I/O) are infrastructure; class 54 (program limit exceeded, e.g. an index row
too large) and 22 (data exception) are caused by the message and stay message faults.
A misclassified message fault cannot stall the pipeline for ever: the worker counts, per
entry, infrastructure faults that the probe right after found healthy, and after a few of
them treats the entry's fault as its own (`PipelineWorker`).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

#: errno values that mean "the disk", not "the message".
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
#: SQLSTATE classes of PostgreSQL that mean the server or its storage, not the data.
PG_INFRA_CLASSES = ("08", "53", "57", "58")
#: SQLSTATE classes caused by the data we sent: message faults even when raised as
#: OperationalError (psycopg files 54000 program_limit_exceeded under it).
PG_MESSAGE_CLASSES = ("54", "22", "23")


@dataclass(frozen=True)
class Fault:
    """An infrastructure fault: `kind` is "database" or "disk"."""

    kind: str
    reason: str


class DiskLow(OSError):
    """Free space below the configured minimum in a folder the pipeline writes to."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        if isinstance(cur, sa_exc.DBAPIError) and cur.orig is not None:
            yield cur.orig
        cur = cur.__cause__ or cur.__context__


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return state if isinstance(state, str) else None


def classify_fault(exc: BaseException) -> Fault | None:
    """`Fault` when `exc` (or what caused it) is an infrastructure fault, else None."""
    reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:300]
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return Fault("disk", reason)
        state = _sqlstate(e)
        if state is not None:
            if state.startswith(PG_MESSAGE_CLASSES):
                return None
            if state.startswith(PG_INFRA_CLASSES):
                return Fault("database", reason)
        if isinstance(e, sqlite3.OperationalError):
            # SQLite's one class for storage trouble, locks and a schema that is not there
            # (a broken installation fails every message alike).
            text_ = str(e).lower()
            kind = "disk" if ("full" in text_ or "i/o" in text_) else "database"
            return Fault(kind, reason)
        if isinstance(e, sqlite3.Error):  # integrity, data, programming: the message's own
            return None
    for e in _chain(exc):
        if isinstance(
            e,
            sa_exc.OperationalError
            | sa_exc.InterfaceError
            | sa_exc.DisconnectionError
            | sa_exc.TimeoutError,
        ):
            # The driver's error was neither a known message fault nor SQLite's: the server
            # went away, refused us, or the pool ran dry.
            return Fault("database", reason)
    return None


def database_folder(url: str) -> Path | None:
    """The folder of a SQLite database file (None for PostgreSQL or :memory:)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).resolve().parent


def check_free_space(folders: Iterable[Path], minimum: int) -> None:
    """Raise `DiskLow` when any folder has less than `minimum` bytes free (0: no check)."""
    if not minimum:
        return
    for folder in folders:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < minimum:
            raise DiskLow(f"{free} bytes free in {folder}, less than the {minimum} required")


#: Space a disk probe reserves at least: a full disk answers reads (`SELECT 1` works) and
#: frees a few pages now and then, so "some bytes free" is no proof that work can resume.
PROBE_BYTES = 1024 * 1024


def check_writable(folders: Iterable[Path], size: int) -> None:
    """Reserve `size` bytes in each folder (posix_fallocate: no data written) and free them;
    raises OSError(ENOSPC) when the space is not there."""
    for folder in folders:
        path = folder / f".gateway-probe-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)


def probe(engine: Engine, folders: Iterable[Path], minimum: int, reserve: int = 0) -> None:
    """Raise if the infrastructure is still away: free space (and, after a disk fault,
    `reserve` bytes that can really be allocated), then a `SELECT 1`."""
    folders = list(folders)
    check_free_space(folders, minimum)
    if reserve:
        check_writable(folders, reserve)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@dataclass
class Backoff:
    """Bounded doubling delay between probes: 0.5 s, 1 s, 2 s, then `maximum` (4 s).

    The maximum bounds how late the pipeline notices a recovery (docs/decisions.md D10: resume
    within seconds); a `SELECT 1` every few seconds costs nothing.
    """

    initial: float = 0.5
    maximum: float = 4.0
    current: float = 0.0

    def next(self) -> float:
        self.current = self.initial if not self.current else min(self.current * 2, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
