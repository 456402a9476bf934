"""The pure decisions behind fail-safe processing: which faults are the infrastructure's,
when to restart a crashing pipeline child, when it hangs, and the MIME depth bound."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from gateway.pipeline.faults import Backoff, DiskLow, classify_fault, database_folder
from gateway.pipeline.parse import MAX_MIME_DEPTH, ORIGINAL_NAME, degraded, parse
from gateway.pipeline.process import MAX_RESTART_DELAY, hung, next_to_wake, restart_delay


def _wrapped(orig: BaseException, cls: type[sa_exc.DBAPIError]) -> sa_exc.DBAPIError:
    return cls("SELECT 1", {}, orig)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            _wrapped(psycopg.OperationalError("connection refused"), sa_exc.OperationalError),
            "database",
        ),
        (_wrapped(psycopg.InterfaceError("connection closed"), sa_exc.InterfaceError), "database"),
        (sa_exc.DisconnectionError("gone"), "database"),
        (sa_exc.TimeoutError("QueuePool limit reached"), "database"),
        (
            _wrapped(sqlite3.OperationalError("database or disk is full"), sa_exc.OperationalError),
            "disk",
        ),
        (_wrapped(sqlite3.OperationalError("disk I/O error"), sa_exc.OperationalError), "disk"),
        (
            _wrapped(sqlite3.OperationalError("database is locked"), sa_exc.OperationalError),
            "database",
        ),
        (sqlite3.OperationalError("unable to open database file"), "database"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk"),
        (DiskLow("10 bytes free"), "disk"),
    ],
)
def test_infrastructure_faults(exc: BaseException, kind: str) -> None:
    fault = classify_fault(exc)
    assert fault is not None
    assert fault.kind == kind


def test_a_fault_raised_while_handling_an_outage_is_found_through_the_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not write the WAL") from inner
    except RuntimeError as exc:
        fault = classify_fault(exc)
    assert fault is not None
    assert fault.kind == "disk"


@pytest.mark.parametrize(
    "exc",
    [
        RecursionError("maximum recursion depth exceeded"),
        ValueError("prohibited control character"),
        KeyError("owner"),
        OSError(errno.ENOENT, "No such file"),
        _wrapped(sqlite3.IntegrityError("UNIQUE constraint failed"), sa_exc.IntegrityError),
        # PostgreSQL files "index row size exceeds maximum" (54000) under OperationalError:
        # caused by the message's data, so it stays a message fault.
        _wrapped(psycopg.errors.ProgramLimitExceeded("index row too big"), sa_exc.OperationalError),
        _wrapped(psycopg.errors.CharacterNotInRepertoire("bad byte"), sa_exc.DataError),
    ],
)
def test_message_faults(exc: BaseException) -> None:
    assert classify_fault(exc) is None


def test_postgres_sqlstate_classes_of_the_server() -> None:
    shutdown = _wrapped(psycopg.errors.AdminShutdown("terminating"), sa_exc.OperationalError)
    full = _wrapped(psycopg.errors.DiskFull("could not extend file"), sa_exc.OperationalError)
    assert classify_fault(shutdown) is not None
    assert classify_fault(full) is not None


def test_database_folder() -> None:
    assert database_folder("sqlite:////var/lib/gw/gateway.db") == Path("/var/lib/gw")
    assert database_folder("postgresql+psycopg://u@h/db") is None
    assert database_folder("sqlite:///:memory:") is None


def test_probe_backoff_is_bounded() -> None:
    b = Backoff()
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_restart_delay_doubles_then_gives_up_at_the_cap() -> None:
    kw = {"window": 300.0, "cap": 3, "backoff": 1.0}
    assert restart_delay([], 1000.0, **kw) == 1.0  # type: ignore[arg-type]
    assert restart_delay([990.0], 1000.0, **kw) == 2.0  # type: ignore[arg-type]
    assert restart_delay([980.0, 990.0], 1000.0, **kw) == 4.0  # type: ignore[arg-type]
    assert restart_delay([970.0, 980.0, 990.0], 1000.0, **kw) is None  # type: ignore[arg-type]
    # Restarts older than the window no longer count.
    assert restart_delay([100.0, 200.0, 990.0], 1000.0, **kw) == 2.0  # type: ignore[arg-type]
    many = restart_delay([], 0.0, window=1.0, cap=100, backoff=50.0)
    assert many == 50.0
    assert restart_delay([0.5] * 10, 1.0, window=10.0, cap=100, backoff=1.0) == MAX_RESTART_DELAY


def test_hang_is_busy_and_silent() -> None:
    assert hung("busy", 0.0, 301.0, 300.0)
    assert not hung("busy", 0.0, 299.0, 300.0)
    assert not hung("paused", 0.0, 10_000.0, 300.0)  # an outage is not a hang
    assert not hung("idle", 0.0, 10_000.0, 300.0)


def _nested(depth: int) -> bytes:
    out = "From: a@b.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
    for i in range(depth):
        out += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
    out += "Content-Type: text/plain\r\n\r\nbottom\r\n"
    for i in reversed(range(depth)):
        out += f"--b{i}--\r\n"
    return out.encode()


def test_mime_within_the_bound_is_read_normally() -> None:
    p = parse(_nested(MAX_MIME_DEPTH - 2))
    assert p.text.strip() == "bottom"
    assert not p.defects


@pytest.mark.parametrize("depth", [MAX_MIME_DEPTH + 1, 1000, 3000])
def test_mime_past_the_bound_degrades_to_the_raw_message_attached(depth: int) -> None:
    raw = _nested(depth)
    p = parse(raw)
    assert p.subject == "s"
    assert p.from_address == "a@b.example"
    assert [a.filename for a in p.attachments] == [ORIGINAL_NAME]
    assert p.defects
    assert p.defects[0].startswith("degraded: MIME nesting")
    [part] = list(p.msg.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_content() == raw  # the original bytes, untouched


def test_degraded_survives_garbage() -> None:
    p = degraded(b"\xff\xfe not a header at all", "test")
    assert p.attachments[0].filename == ORIGINAL_NAME


def test_a_child_crash_charges_only_the_entry_it_was_busy_with(tmp_path: Path) -> None:
    from gateway.clock import FrozenClock
    from gateway.spool import Envelope, Spool

    spool = Spool(tmp_path / "spool", max_attempts=2, clock=FrozenClock())
    spool.open()
    try:
        for i in range(3):
            spool.submit_sync(Envelope("a@b.example", ["support@example.com"]), b"m%d" % i)
        first, second, third = spool.claim(10)
        spool.release(first.id)
        # The child died while busy with the second: it pays, the third goes back free.
        assert spool.recover_crashed(second.id, "the pipeline process died (-9)") == "pending"
        assert [(e.id, e.attempts) for e in (spool.get(second.id), spool.get(third.id))] == [
            (second.id, 1),
            (third.id, 0),
        ]
        spool.conn.execute("UPDATE spool SET not_before=0")
        spool.claim(10)
        assert spool.recover_crashed(second.id, "died again") == "quarantined"
        assert [q["id"] for q in spool.quarantined()] == [second.id]
        assert spool.get(third.id).state == "pending"  # type: ignore[union-attr]
        assert spool.replay_all() == [second.id]
        assert spool.quarantined() == []
    finally:
        spool.close()


def test_new_mail_wakes_one_pipeline_process_an_idle_one_first() -> None:
    """One process is woken per spool commit (gateway/app.py `_wake_pipeline_processes`):
    the first idle one from the turn on, going round; none idle, the one whose turn it is,
    so that under load the wakes go round all of them."""
    assert next_to_wake(["idle", "idle"], 0) == 0
    assert next_to_wake(["idle", "idle"], 1) == 1
    assert next_to_wake(["idle", "idle"], 2) == 0
    assert next_to_wake(["busy", "idle"], 0) == 1
    assert next_to_wake(["idle", "busy"], 1) == 0
    assert next_to_wake(["busy", "busy"], 0) == 0
    assert next_to_wake(["busy", "busy"], 1) == 1
    assert next_to_wake(["starting", "busy", "paused"], 5) == 2
    turns, turn = [], 0
    for _ in range(4):
        turn = next_to_wake(["busy", "busy", "busy"], turn) + 1
        turns.append(turn - 1)
    assert turns == [0, 1, 2, 0]
