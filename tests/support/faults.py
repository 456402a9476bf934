"""Fault injection for tests: make a real component fail once, the way a broken disk would.

The production classes carry no test hooks; a test wraps the instance it runs instead.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.spool import Spool


def fail_next_batch(spool: Spool, error: BaseException) -> None:
    """The spool's writer raises `error` for its next batch (one shot, then it writes again);
    the SMTP session waiting for that batch answers 451, a transient local error (RFC 5321
    section 4.2.3), so the sender retries."""
    original = spool._commit_batch

    def failing(conn: sqlite3.Connection, batch: list[Any]) -> None:
        # Restore first: the writer thread retries nothing, the next batch must succeed.
        del spool.__dict__["_commit_batch"]
        raise error

    # An instance attribute shadows the method for this spool only.
    spool.__dict__["_commit_batch"] = failing
    assert spool._commit_batch is not original
