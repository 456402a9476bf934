"""SQLite's writers take turns: a kernel file lock in front of `BEGIN IMMEDIATE`.

SQLite has one write lock per database. A writer that finds it taken does not queue: its
busy handler sleeps and tries again, 1, 2, 5, 10 ... then 50 and 100 ms at a time. Under
sustained load the pipeline process commits and begins its next transaction within a
millisecond or two, so a writer asleep in that handler (the delivery worker's claim and
outcome record, the escalator's plan) wakes to find the lock taken again, and again: at
100 new tickets a second with 100,000 open tickets they waited up to 1.6 s, and the
acknowledgements queued behind them in the outbox (docs/performance.md §8).

The turnstile makes the wait a queue the kernel keeps: every write transaction first takes
an exclusive `flock` on ``<database>.writer`` (one open file per pooled connection, so the
threads of one process exclude each other too) and gives it back when the transaction ends.
A writer that has to wait says so with a shared `flock` on ``<database>.waiting``; a writer
about to begin while someone waits steps aside for a moment (`YIELD`), so a busy pipeline
can no longer take every turn. SQLite's own lock still guards the data: the turnstile only
orders who asks for it, and its release comes as the transaction ends (before SQLite's
COMMIT returns), so the next writer may spend a few milliseconds in the busy handler.

Never longer than SQLite would have waited: a writer that does not get its turn within the
busy timeout fails with the same "database is locked" error SQLite raises (an
infrastructure fault, docs/decisions.md D10), as does a thread that already holds a write
transaction on another connection and asks for a second one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from pathlib import Path

__all__ = ["Turnstile"]

#: How long a writer that sees another one waiting steps aside before taking its turn.
YIELD = 0.005
#: Polling pace of a waiting writer (flock has no timeout; polling keeps the busy timeout).
POLL = 0.0005
POLL_MAX = 0.002


class Turnstile:
    """The turnstile of one connection (its own open files of the two lock files)."""

    __slots__ = ("_turn", "_waiting", "held", "timeout")

    def __init__(self, database: Path, timeout: float) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._turn = os.open(f"{database}.writer", flags, 0o600)
        self._waiting = os.open(f"{database}.waiting", flags, 0o600)
        self.timeout = timeout
        self.held = False

    def acquire(self) -> None:
        """Wait for this connection's turn to write (at most `timeout` seconds)."""
        if self._others_waiting():
            time.sleep(YIELD)
        try:
            fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the files (which also gives back a turn still held). Once: a closed
        descriptor's number may already belong to another file."""
        self.held = False
        fds, self._turn, self._waiting = (self._turn, self._waiting), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _others_waiting(self) -> bool:
        try:
            fcntl.flock(self._waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting, fcntl.LOCK_UN)
        return False

    def _wait(self) -> None:
        fcntl.flock(self._waiting, fcntl.LOCK_SH)
        try:
            deadline = time.monotonic() + self.timeout
            pause = POLL
            while True:
                time.sleep(pause)
                try:
                    fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        # What SQLite's busy handler says when its timeout runs out.
                        raise sqlite3.OperationalError("database is locked") from None
                pause = min(pause * 2, POLL_MAX)
        finally:
            fcntl.flock(self._waiting, fcntl.LOCK_UN)

    def __del__(self) -> None:
        self.close()
