"""Infrastructure faults are not message faults (docs/decisions.md D10.5, 6 and 8).

Each fault is real: PostgreSQL cut by a TCP proxy (tests/support/proxy.py), the SQLite
database on a small tmpfs filled to the last byte, a MIME bomb nested 1,000 levels deep, a
message that breaks a stage, a pipeline child whose database path has become unusable.
Mail goes in over SMTP; results are read as a user would (tickets in the database, mail at
the capture relay, the spool's own file, the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib
import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.pipeline.context import Context
from gateway.pipeline.faults import Backoff
from gateway.pipeline.parse import ORIGINAL_NAME
from gateway.security.dns import StaticResolver
from gateway.store.db import open_database
from gateway.store.models import Message, Ticket
from tests.conftest import PG_URL, _pg_database, make_settings
from tests.support.cli import run as run_cli
from tests.support.gateway import make_mail, running_gateway, send, ticket_json
from tests.support.proxy import TcpProxy
from tests.support.relay import CaptureRelay

ADMIN = "ops@example.com"


async def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll a condition (bounded); for work done by other threads and processes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0.05)


def spool_rows(spool_dir: Path) -> list[tuple[str, int]]:
    """(state, attempts) of every spool entry, read from the spool's own file."""
    with contextlib.closing(sqlite3.connect(spool_dir / "spool.sqlite3")) as c:
        return [(r[0], r[1]) for r in c.execute("SELECT state, attempts FROM spool ORDER BY id")]


def ticket_count(url: str) -> int:
    engine = open_database(url, migrate=False)
    try:
        with Session(engine) as s:
            return len(s.exec(select(Ticket)).all())
    finally:
        engine.dispose()


def nested_mime(depth: int, subject: str = "deep") -> bytes:
    out = (
        "From: Pat <pat@customer.example>\r\nTo: support@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <deep-{depth}@customer.example>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
    )
    for i in range(depth):
        out += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
    out += "Content-Type: text/plain\r\n\r\nhello from the bottom\r\n"
    for i in reversed(range(depth)):
        out += f"--b{i}--\r\n"
    return out.encode()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


# (a) PostgreSQL cut for a simulated 20 minutes ---------------------------------------------


@pytest.mark.postgres
async def test_database_outage_pauses_costs_no_attempts_and_alerts_once(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay, pg_url: str
) -> None:
    target = PG_URL.split("@", 1)[1].split("/", 1)[0]
    host, port = target.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        proxied = pg_url.replace(target, f"127.0.0.1:{proxy.port}")
        settings = make_settings(
            tmp_path,
            storage={"database_url": proxied},
            outbound={"relay": f"127.0.0.1:{relay.port}"},
            alerts={"admins": [ADMIN]},
        )
        async with running_gateway(settings, clock, workers=True) as gw:
            await send(gw, make_mail(subject="before the outage"))
            await wait_until(lambda: gw.pipeline.processed == 1, what="first message")

            proxy.cut()
            # Probes paced fast while the simulated 20 minutes pass (real seconds matter
            # only for the recovery, measured below with the production backoff).
            gw.pipeline.backoff = Backoff(0.02, 0.1)
            sent = 0
            for minute in range(20):
                if minute % 2 == 0:
                    await send(gw, make_mail(subject=f"during the outage {minute}"))
                    sent += 1
                clock.advance(60)
                gw.pipeline.wakeup.set()
                probes = gw.pipeline.probes
                await wait_until(lambda p=probes: gw.pipeline.probes > p, what="a probe")  # type: ignore[misc]
                assert gw.pipeline.outage is not None, "the worker did not notice the outage"
            rows = spool_rows(settings.spool_path)
            assert len(rows) == sent
            # Twenty minutes of outage cost no message a single attempt.
            assert rows == [("pending", 0)] * sent, rows
            assert relay.to(ADMIN) == []  # one alert per outage, when it is over

            # Production pacing (0.5 s doubling to 4 s), at its longest interval as after a
            # long outage; the database returns just after a probe: the worst case.
            gw.pipeline.backoff = Backoff()
            for _ in range(4):
                gw.pipeline.backoff.next()
            probes = gw.pipeline.probes
            await wait_until(lambda: gw.pipeline.probes > probes, what="a probe")
            before = gw.pipeline.processed
            proxy.restore()
            restored = time.monotonic()
            await wait_until(lambda: gw.pipeline.processed > before, what="first after recovery")
            first = time.monotonic() - restored
            await wait_until(lambda: gw.pipeline.processed == 1 + sent, what="the backlog")
            await wait_until(lambda: len(relay.to(ADMIN)) >= 1, what="the admin alert")
            await asyncio.sleep(0.5)  # a second alert would have been queued by now

            quarantined = sum(1 for s, _ in spool_rows(settings.spool_path) if s == "quarantined")
            lost = 1 + sent - ticket_count(pg_url)
            print(
                f"\n20-minute database outage (simulated clock), {sent} messages arriving:"
                f" quarantined {quarantined}, lost {lost},"
                f" seconds from recovery to first processed message: {first:.2f}"
                " (worst case: the database returned just after a probe)"
            )
            assert quarantined == 0
            assert lost == 0
            assert spool_rows(settings.spool_path) == []
            [alert] = relay.to(ADMIN)
            text = alert.message().get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "database was unavailable from 2026-11-23T09:0" in text
            assert "to 2026-11-23T09:20" in text
            assert f"{sent} messages waited" in text


# (b) SQLite on a full tmpfs ------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs as root)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the filesystem is full (ENOSPC); return the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        chunk = b"\0" * 65536
        while True:
            f.write(chunk)
            f.flush()
    return filler


@pytest.mark.parametrize("guard", ["floor", "enospc"])
async def test_full_disk_pauses_the_pipeline_child_without_crash_loop(
    tmp_path: Path, small_tmpfs: Path, relay: CaptureRelay, guard: str
) -> None:
    """The database's disk full: the pipeline child pauses (no crash, no restarts, no
    quarantine) and resumes when space returns. `floor`: below half of smtp.min_free_disk
    (the guard); `enospc`: no guard, SQLite itself finds the disk full."""
    db = small_tmpfs / "gateway.db"
    settings = make_settings(
        tmp_path,
        storage={"database_url": f"sqlite:///{db}"},
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        smtp={"min_free_disk": "2MiB" if guard == "floor" else 0},
        alerts={"admins": [ADMIN]},
        pipeline={"restart_backoff": 0.1},
    )
    gw = Gateway(settings, resolver=StaticResolver({}))
    await gw.start()
    try:
        assert gw.pipeline_process is not None
        child = gw.pipeline_process.proc.pid
        await send(gw, make_mail(subject="before the disk filled"))
        await wait_until(lambda: spool_rows(settings.spool_path) == [], what="first message")

        filler = fill(small_tmpfs)
        for i in range(3):  # mail keeps arriving: the spool is on another disk
            await send(gw, make_mail(subject=f"while the disk is full {i}", body="x" * 20000))
        await wait_until(lambda: gw.pipeline_process.state == "paused", what="the pause")  # type: ignore[union-attr]
        await asyncio.sleep(1.5)  # the old child crashed within this and restarted every 2 s
        rows = spool_rows(settings.spool_path)
        assert [s for s, _ in rows] == ["pending"] * 3, rows
        assert all(a == 0 for _, a in rows), rows  # the outage cost no attempt
        assert gw.pipeline_process.restarts == 0
        assert gw.pipeline_process.proc.pid == child

        filler.unlink()
        await wait_until(lambda: spool_rows(settings.spool_path) == [], what="the backlog")
        assert ticket_count(f"sqlite:///{db}") == 4
        await wait_until(lambda: len(relay.to(ADMIN)) == 1, what="the admin alert")
        assert "disk was unavailable" in relay.to(ADMIN)[0].message()["Subject"] or (
            "disk" in str(relay.to(ADMIN)[0].message()["Subject"])
        )
        assert gw.pipeline_process.restarts == 0
    finally:
        await gw.stop()


# (c) a MIME bomb nested 1,000 levels -----------------------------------------------------------


async def test_mime_nested_1000_levels_gets_a_ticket_and_an_ack_with_the_raw_attached(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    raw = nested_mime(1000, subject="Invoice question (deep)")
    async with running_gateway(settings, clock) as gw:
        await send(gw, raw, sender="pat@customer.example", recipients=["support@example.com"])
        assert await gw.pipeline.run_once() == 1
        assert gw.spool.counts() == {}  # not failed, not quarantined
        with Session(gw.engine) as s:
            [ticket] = s.exec(select(Ticket)).all()
            [msg] = s.exec(select(Message).where(Message.direction == "in")).all()
        assert ticket.subject == "Invoice question (deep)"
        assert msg.raw == raw  # the original bytes, untouched
        assert "could not be read normally" in msg.text
        assert ORIGINAL_NAME in msg.text
        events = ticket_json(gw, ticket.ref)["events"]
        assert any("degraded: MIME nesting" in e["detail"] for e in events), events
        await gw.delivery.run_once()
        [ack] = relay.to("pat@customer.example")
        assert "Invoice question (deep)" in str(ack.message()["Subject"])


# (d) a message that fails on its own -----------------------------------------------------------


async def test_message_failing_on_its_own_is_quarantined_and_alerted_then_replayed_by_cli(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    settings = make_settings(
        tmp_path,
        storage={"max_attempts": 2},
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        alerts={"admins": [ADMIN]},
    )
    async with running_gateway(settings, clock) as gw:
        stages = gw.pipeline.prefix

        def explodes_on_poison(ctx: Context) -> None:
            # A bug that one message's content triggers (in every form of it).
            if b"POISON" in ctx.entry.raw:
                raise ValueError("stage exploded on this message")

        gw.pipeline.prefix = (explodes_on_poison, *stages)
        await send(gw, make_mail(subject="POISON pill", body="POISON\n"))
        await send(gw, make_mail(subject="ordinary", sender="kim@customer.example"))
        assert await gw.pipeline.run_once() == 2
        clock.advance(61)
        assert await gw.pipeline.run_once() == 1  # the last attempt: quarantined
        [q] = gw.spool.quarantined()
        assert "stage exploded" in q["reason"]
        await gw.delivery.run_once()
        # The admins and the default owner are told, with the reason and the original.
        [alert] = relay.to(ADMIN)
        m = alert.message()
        assert "quarantined" in str(m["Subject"])
        body = m.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "pat@customer.example" in body
        assert "POISON pill" in body
        assert "stage exploded on this message" in body
        names = [p.get_filename() for p in m.iter_attachments()]
        assert names == [f"quarantined-{q['id']}.eml"]
        owner = gw.rules.current.people[gw.rules.current.defaults.owner].email
        assert owner in alert.rcpt_tos
        spool_dir = settings.spool_path

    # The bug is fixed (the stage is gone): `quarantine replay --all` processes everything.
    cfg = tmp_path / "replay.toml"
    cfg.write_text(
        f'rules_dir = "{settings.rules_dir}"\n'
        f'[storage]\ndatabase_url = "{settings.storage.database_url}"\n'
        f'spool_dir = "{spool_dir}"\n'
        '[security]\nsecret_key = "test-secret-key-0123456789abcdef"\nverify_senders = false\n'
        '[smtp]\nmin_free_disk = 0\n[outbound]\nrelay = ""\n'
    )
    r = run_cli(["--config", str(cfg), "quarantine", "replay", "--all"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replaying 1 quarantined message" in r.stdout
    assert spool_rows(spool_dir) == []
    r = run_cli(["--config", str(cfg), "tickets", "list", "--json"])
    subjects = sorted(t["subject"] for t in json.loads(r.stdout))
    assert subjects == ["POISON pill", "ordinary"]


async def test_last_attempt_in_degraded_form_still_makes_a_ticket(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """A bug in reading the structure (here: the classifier chokes on one message): the
    last attempt keeps the headers and attaches the original, and the customer is answered."""
    settings = make_settings(
        tmp_path, storage={"max_attempts": 1}, outbound={"relay": f"127.0.0.1:{relay.port}"}
    )
    async with running_gateway(settings, clock) as gw:
        stages = gw.pipeline.prefix

        def chokes_on_structure(ctx: Context) -> None:
            assert ctx.parsed is not None
            if any(a.filename == "weird.bin" for a in ctx.parsed.attachments):
                raise RecursionError("maximum recursion depth exceeded")

        gw.pipeline.prefix = (stages[0], chokes_on_structure, *stages[1:])
        mail = make_mail(subject="with a weird file")
        mail.add_attachment(b"\0" * 10, maintype="application", subtype="x", filename="weird.bin")
        await send(gw, mail)
        assert await gw.pipeline.run_once() == 1
        assert gw.spool.counts() == {}
        with Session(gw.engine) as s:
            [ticket] = s.exec(select(Ticket)).all()
            [msg] = s.exec(select(Message).where(Message.direction == "in")).all()
        assert ticket.subject == "with a weird file"
        assert ORIGINAL_NAME in msg.text
        events = ticket_json(gw, ticket.ref)["events"]
        assert any(e["type"] == "degraded" for e in events), events
        await gw.delivery.run_once()
        assert len(relay.to("pat@customer.example")) == 1


# (e) the pipeline child crashing: backoff, cap, alert; SMTP goes on -----------------------------


@pytest.mark.slow
async def test_crashing_pipeline_child_backs_off_stops_at_the_cap_and_alerts(
    tmp_path: Path, relay: CaptureRelay
) -> None:
    dbdir = tmp_path / "db"
    settings = make_settings(
        tmp_path,
        storage={"database_url": f"sqlite:///{dbdir}/gateway.db"},
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        alerts={"admins": [ADMIN]},
        pipeline={"restart_backoff": 0.2, "max_restarts": 3, "restart_window": 120},
    )
    gw = Gateway(settings, resolver=StaticResolver({}))
    await gw.start()
    try:
        pp = gw.pipeline_process
        assert pp is not None
        await wait_until(lambda: pp.state == "idle", what="the child's first word")
        # A real fault: the database's folder is replaced by a file, so a new child cannot
        # open its database (the parent keeps its open connection).
        shutil.move(dbdir, tmp_path / "db.moved")
        dbdir.write_text("not a folder\n")
        os.kill(pp.proc.pid, signal.SIGKILL)
        await wait_until(lambda: pp.down is not None, timeout=60, what="the restart cap")
        assert pp.restarts == 3
        gaps = [b - a for a, b in zip(pp.restart_times, pp.restart_times[1:], strict=False)]
        assert gaps[0] >= 0.4, gaps
        assert gaps[1] >= 0.8, gaps  # 0.2 s doubling, plus the child's life
        await wait_until(lambda: len(relay.to(ADMIN)) == 1, what="the alert")
        assert "pipeline stopped" in str(relay.to(ADMIN)[0].message()["Subject"])
        restarts = pp.restarts
        # SMTP goes on accepting into the spool; nothing restarts any more.
        await send(gw, make_mail(subject="while the pipeline is down"))
        assert [s for s, _ in spool_rows(settings.spool_path)] == ["pending"]
        await asyncio.sleep(1.5)
        assert pp.restarts == restarts
        assert not pp.alive
    finally:
        await gw.stop()


@pytest.mark.slow
async def test_hung_pipeline_child_is_killed_and_restarted(tmp_path: Path) -> None:
    """Hang detection: another process holds the SQLite write lock, so the child waits inside
    one message (busy_timeout 30 s) saying nothing; past `hang_timeout` it is killed and a new
    child started; the message stays in the spool, charged one attempt."""
    settings = make_settings(
        tmp_path, pipeline={"hang_timeout": 1.5, "restart_backoff": 0.1, "max_restarts": 5}
    )
    gw = Gateway(settings, resolver=StaticResolver({}))
    await gw.start()
    try:
        pp = gw.pipeline_process
        assert pp is not None
        await wait_until(lambda: pp.state == "idle", what="the child's first word")
        first_child = pp.proc.pid
        db = settings.storage.database_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as locker:
            locker.execute("BEGIN IMMEDIATE")  # the write lock, held
            await send(gw, make_mail(subject="stuck behind a lock"))
            await wait_until(lambda: pp.restarts >= 1, timeout=30, what="the restart")
            assert pp.proc.pid != first_child
            assert spool_rows(settings.spool_path) == [("pending", 1)]
            locker.execute("ROLLBACK")
        await wait_until(lambda: pp.alive and pp.state == "idle", what="the new child")
        await send(gw, make_mail(subject="after the lock", sender="kim@customer.example"))
        await wait_until(lambda: ticket_count(settings.storage.database_url) == 1, what="ticket")
        assert pp.down is None
    finally:
        await gw.stop()


async def test_spool_that_cannot_commit_answers_4xx_never_250_and_recovers(
    tmp_path: Path, small_tmpfs: Path, clock: FrozenClock
) -> None:
    """The `250` promise: while the spool's disk is full the answer is temporary (the
    sender retries), and once space returns the same mail is accepted and processed."""
    settings = make_settings(tmp_path, storage={"spool_dir": str(small_tmpfs / "spool")})
    async with running_gateway(settings, clock) as gw:
        await send(gw, make_mail(subject="before"))
        filler = fill(small_tmpfs)
        mail = make_mail(subject="while the spool disk is full", body="y" * 200_000)
        with pytest.raises(aiosmtplib.SMTPResponseException) as err:
            await send(gw, mail)
        assert 400 <= err.value.code < 500, err.value
        filler.unlink()
        code, _ = await send(gw, mail)  # the sender's retry
        assert code == 250
        assert await gw.pipeline.run_once() == 2
        assert ticket_count(settings.storage.database_url) == 2


async def test_transient_database_error_is_retried_at_once_and_a_disguised_one_is_not_forever(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """A connection dropped once (the probe right after finds the database healthy) is
    retried at once: no attempt, no pause, no alert. The same "database" error raised by one
    message every time is that message's own fault after a few tries: it costs attempts and
    the rest of the queue flows."""
    settings = make_settings(
        tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"}, alerts={"admins": [ADMIN]}
    )
    dropped = sa_exc.OperationalError(
        "SELECT 1", {}, psycopg.OperationalError("server closed the connection unexpectedly")
    )
    seen: list[bytes] = []

    def flaky(ctx: Context) -> None:
        if b"FLAKY" in ctx.entry.raw and not seen:
            seen.append(ctx.entry.raw)
            raise dropped
        if b"DISGUISED" in ctx.entry.raw:
            raise dropped

    async with running_gateway(settings, clock) as gw:
        gw.pipeline.prefix = (flaky, *gw.pipeline.prefix)
        await send(gw, make_mail(subject="FLAKY once"))
        await send(gw, make_mail(subject="DISGUISED poison", sender="kim@customer.example"))
        await send(gw, make_mail(subject="ordinary", sender="lee@customer.example"))
        await gw.pipeline.run_once()
        assert gw.pipeline.outage is None
        assert gw.pipeline.outages == 0
        assert ticket_count(settings.storage.database_url) == 2  # FLAKY and ordinary
        assert spool_rows(settings.spool_path) == [("pending", 1)]  # the disguised one paid
        await gw.delivery.run_once()
        assert relay.to(ADMIN) == []
