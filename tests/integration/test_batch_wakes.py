"""What a pipeline batch wakes in the daemon (gateway/app.py `after_batch`).

The bundle and sender re-check workers sleep until their next due row; after a batch they
are woken only when it created a row due before then. That is only right if every such row
is reported: these tests pin that a bundled mail's item reaches the report with its due
moment, that the report crosses the pipe intact, and that the daemon's decision follows it.
The escalator, woken after every batch, passes at most once per `WAKE_GAP` and loses no
wake.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.escalation.escalator import WAKE_GAP
from gateway.pipeline.process import batch_word, read_batch_word
from gateway.pipeline.timed import Looks
from gateway.store.models import BundleItem, Message, Ticket
from gateway.store.plan_marks import BUNDLE, RECHECK, take_created
from tests.conftest import make_settings
from tests.support.gateway import make_mail, running_gateway, send
from tests.support.sla import SLA_RULES, make_escalator, new_ticket, sla_rules

PAT = "pat@customer.example"


@pytest.fixture
async def gw(tmp_path: Path, clock: FrozenClock, database_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(
        tmp_path,
        storage={"database_url": database_url, "spool_dir": str(tmp_path / "spool")},
    )
    async with running_gateway(settings, clock) as g:
        yield g


async def test_a_bundled_mail_reports_its_due_moment(gw: Gateway, clock: FrozenClock) -> None:
    take_created()  # what earlier tests of this process left
    await send(gw, make_mail(sender=PAT, subject="My refund is missing", body="Order 4711.\n"))
    await gw.pipeline.run_once()
    assert BUNDLE not in take_created()  # acknowledged at once: nothing waits
    clock.advance(timedelta(seconds=20))
    await send(gw, make_mail(sender=PAT, subject="My refund is missing!", body="Hello??\n"))
    await gw.pipeline.run_once()
    created = take_created()
    with Session(gw.engine) as s:
        first = s.exec(select(func.min(BundleItem.due_at))).one()
    assert first is not None
    assert created[BUNDLE] == (first if first.tzinfo else first.replace(tzinfo=UTC))
    assert created[BUNDLE] > clock.now()  # the window's close
    assert take_created() == {}  # taken once

    # The daemon wakes the bundle worker for it only if it would otherwise look later.
    gw.bundler.looks.next = created[BUNDLE]
    gw.after_batch(created)
    assert not gw.bundler_wakeup.is_set()
    gw.bundler.looks.next = created[BUNDLE] + timedelta(seconds=1)
    gw.after_batch(created)
    assert gw.bundler_wakeup.is_set()
    assert not gw.rechecker_wakeup.is_set()  # nothing new for it


async def test_only_a_committed_row_is_reported(gw: Gateway, clock: FrozenClock) -> None:
    await send(gw, make_mail(sender=PAT))
    await gw.pipeline.run_once()
    take_created()
    with Session(gw.engine) as s:
        ticket = s.exec(select(Ticket)).one()
        message = s.exec(select(Message).where(Message.direction == "in")).one()

    def item() -> BundleItem:
        return BundleItem(
            purpose="ack", recipient=PAT, ticket_id=ticket.id, message_id=message.id,
            created_at=clock.now(), due_at=clock.now() + timedelta(seconds=5),
        )  # fmt: skip

    with Session(gw.engine) as s:
        s.add(item())
        s.flush()
        s.rollback()
    assert take_created() == {}
    with Session(gw.engine) as s:
        s.add(item())
        s.commit()
    assert take_created() == {BUNDLE: clock.now() + timedelta(seconds=5)}


def test_the_batch_word_crosses_the_pipe() -> None:
    at = datetime(2026, 11, 23, 9, 1, tzinfo=UTC)
    tally = [[["pipeline_processed"], 2]]
    assert batch_word(None, {}) == b"1"
    assert read_batch_word(b"1") == (None, {})
    assert read_batch_word(batch_word(tally, {})) == (tally, {})
    assert read_batch_word(batch_word(tally, {BUNDLE: at})) == (tally, {BUNDLE: at})
    assert read_batch_word(batch_word(None, {RECHECK: at})) == (None, {RECHECK: at})
    assert read_batch_word(b"b12") is None  # a state beat
    # Unreadable moments read as due now: a wake too many, never one missed.
    (_, due) = read_batch_word(b'{"due": {"bundle": "soon"}}') or (None, {})
    assert due[BUNDLE] < at


def test_looks_wakes_only_for_rows_due_before_it_looks() -> None:
    looks = Looks()
    at = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert looks.wake_for(at)  # looking now (or not asleep yet): always wake
    looks.next = at
    assert looks.wake_for(at - timedelta(seconds=1))
    assert not looks.wake_for(at)  # that look finds it
    assert not looks.wake_for(at + timedelta(hours=1))


async def test_after_batch_without_a_report_wakes_both(gw: Gateway) -> None:
    gw.bundler.looks.next = gw.rechecker.looks.next = datetime(9000, 1, 1, tzinfo=UTC)
    gw.after_batch({})
    assert not gw.bundler_wakeup.is_set()
    assert not gw.rechecker_wakeup.is_set()
    assert gw.escalator_wakeup.is_set()
    assert gw.delivery.wakeup.is_set()
    gw.after_batch()  # the pipeline in a thread, or the supervisor: nothing said
    assert gw.bundler_wakeup.is_set()
    assert gw.rechecker_wakeup.is_set()


async def test_escalator_wakes_are_coalesced_and_none_is_lost(
    tmp_path: Path, clock: FrozenClock
) -> None:
    from gateway.store.db import open_database

    engine = open_database(f"sqlite:///{tmp_path}/sla.db")
    try:
        with Session(engine) as s:
            new_ticket(s, sla_rules(), at=clock.now())
            s.commit()
        esc = make_escalator(engine, make_settings(tmp_path, rules_dir=str(SLA_RULES)), clock)
        loop = asyncio.get_running_loop()
        passes: list[float] = []
        original = esc.run_once

        def counted() -> int:
            n = original()
            passes.append(loop.time())
            return n

        esc.run_once = counted  # type: ignore[method-assign]
        stopping, wakeup = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(esc.run(stopping, wakeup))
        while not passes:
            await asyncio.sleep(0.01)
        for _ in range(10):  # a burst of batches
            wakeup.set()
            await asyncio.sleep(0.02)
        await asyncio.sleep(WAKE_GAP + 1.0)
        assert len(passes) == 2, passes  # the burst: one more pass, not ten
        assert passes[1] - passes[0] >= WAKE_GAP * 0.9
        stopping.set()
        await asyncio.wait_for(task, 10)
    finally:
        engine.dispose()


@pytest.mark.slow  # a real `serve`: the pipeline in its own process, the report over the pipe
async def test_a_bundle_closes_on_time_with_the_pipeline_in_its_own_process(
    tmp_path: Path,
) -> None:
    import sqlite3
    import time

    import aiosmtplib

    from tests.integration.test_daemon_process import (
        free_port,
        start_daemon,
        wait_until_processed,
        write_config,
    )

    port = free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text() + '[outbound]\nack_window = "6s"\n')
    daemon = start_daemon(cfg)
    try:
        for subject in ("My refund is missing", "My refund is missing!"):
            m = make_mail(sender=PAT, subject=subject, body="Order 4711.\n")
            await aiosmtplib.send(m, hostname="127.0.0.1", port=port)
            wait_until_processed(tmp_path)
        # The second mail waits in a bundle until the window closes; the bundle worker,
        # asleep for its idle 30 s, must be woken for it (the batch's report) and close it
        # on time, not at its next idle look.
        end = time.monotonic() + 45
        rows: list[tuple[str, str, str]] = []
        while time.monotonic() < end:
            with sqlite3.connect(tmp_path / "gw.db") as c:
                rows = c.execute("SELECT state, due_at, sent_at FROM bundle_item").fetchall()
            if rows and all(state != "waiting" for state, _, _ in rows):
                break
            await asyncio.sleep(0.1)
        assert rows, daemon.output()
        for state, due_at, sent_at in rows:
            assert state == "sent", rows
            late = datetime.fromisoformat(sent_at) - datetime.fromisoformat(due_at)
            assert late < timedelta(seconds=5), rows
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait()
