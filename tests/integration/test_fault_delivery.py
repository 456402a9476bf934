"""Delivery under faults: a node killed mid-delivery, two nodes sharing one outbox, a dead
node's claims, and mail that must leave at once (issues 10.12, 11.3, 13.2/13.3, 16.1).

Real sockets everywhere: the capture relay (tests/support/relay.py) is made slow with
`data_delay`, the daemon is a real `serve` process killed with SIGKILL, the two-node test
runs two `DeliveryWorker`s with their own node identities on one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock, SystemClock
from gateway.factories import build_spool
from gateway.node import NodeIdentity
from gateway.outbound.worker import DeliveryWorker
from gateway.sla.clocks import utc
from gateway.spool import Envelope
from gateway.store.db import open_database
from gateway.store.models import Outbox
from gateway.store.notify import ClusterNotifier
from tests.conftest import _pg_database, make_settings
from tests.support.delivery import (
    SUPPORT,
    ServeProcess,
    free_port,
    message_ids_at,
    outbox_states,
    queue_rows,
    write_serve_config,
)
from tests.support.gateway import all_tickets, make_mail, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

# -- helpers ---------------------------------------------------------------------------------


def _text(m: Captured) -> str:
    """Headers and decoded plain-text body of a captured mail."""
    body = m.message().get_body(preferencelist=("plain",))
    head = m.data.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    return head + "\n\n" + (str(body.get_content()) if body is not None else "")


def outbox_rows(engine: Engine) -> list[Outbox]:
    with Session(engine) as s:
        return list(s.exec(select(Outbox)).all())


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


# -- claims: fencing, restart, takeover (FrozenClock, SQLite and PostgreSQL) ----------------


async def test_stale_claim_records_nothing(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """A claim whose lease ran out and was taken over cannot record: the fencing token."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    a = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "a1"))
    b = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-b", "b1"))
    queue_rows(db, 1, clock.now())
    (item_a,) = a._claim()
    clock.advance(timedelta(seconds=31))  # node A stopped renewing: its lease is over
    (item_b,) = b._claim()
    assert item_b.token == item_a.token + 1
    result_a, signed_a = await a._send(item_a)
    a._record(item_a, result_a, signed_a)  # too late: B holds the row now
    assert a.stale_records == 1
    assert a.sent == 0
    (row,) = outbox_rows(db)
    assert (row.state, row.claimed_by, row.claim_token) == ("sending", "node-b", item_b.token)
    result_b, signed_b = await b._send(item_b)
    b._record(item_b, result_b, signed_b)
    (row,) = outbox_rows(db)
    assert row.state == "sent"
    assert b.sent == 1


async def test_a_batch_records_only_the_rows_still_claimed(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """A batch sent to every recipient is recorded in one go (one statement on PostgreSQL,
    `outbox_sql.SENT_ALL`): each row still under this claim becomes sent with the signed
    bytes that went out; a row another node claimed meanwhile is left to it (stale)."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    a = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "a1"))
    b = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-b", "b1"))
    queue_rows(db, 3, clock.now())
    claimed = a._claim()
    assert len(claimed) == 3
    finished = [(item, *(await a._send(item))) for item in claimed]
    with Session(db) as s:  # the last row's lease ran out and node B took it over
        taken = s.get(Outbox, claimed[2].id)
        assert taken is not None
        taken.claimed_until = clock.now() - timedelta(seconds=1)
        s.add(taken)
        s.commit()
    (item_b,) = b._claim()
    assert item_b.id == claimed[2].id
    clock.advance(timedelta(seconds=5))
    a._record_many(finished)
    assert (a.sent, a.stale_records) == (2, 1)
    rows = {r.id: r for r in outbox_rows(db)}
    for item, _, signed in finished[:2]:
        row = rows[item.id]
        assert (row.state, row.attempts, row.last_error) == ("sent", 1, "")
        assert row.raw == signed
        assert utc(row.sent_at) == clock.now()
    row = rows[claimed[2].id]
    assert (row.state, row.claimed_by, row.claim_token) == ("sending", "node-b", item_b.token)


async def test_restarted_node_takes_back_its_rows_at_once(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """docs/decisions.md D10.12 / 13.2: rows claimed by a node's previous run go out at its restart,
    with no lease to wait out; another node cannot take them before the lease ends."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    mids = queue_rows(db, 3, clock.now())
    first_run = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "run1"))
    assert len(first_run._claim()) == 3  # ... and then the process is killed
    other = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-b", "b1"))
    assert other._claim() == []  # the lease still holds
    second_run = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "run2"))
    assert second_run.take_back_own() == 3
    assert await second_run.run_once() == 3  # same instant: no lease waited out
    assert sorted(message_ids_at(relay)) == sorted(mids)
    assert {r.state for r in outbox_rows(db)} == {"sent"}


async def test_dead_node_rows_taken_over_within_30s(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    queue_rows(db, 2, clock.now())
    dead = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "a1"))
    assert len(dead._claim()) == 2  # node A dies holding both rows
    live = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-b", "b1"))
    clock.advance(timedelta(seconds=29))
    assert await live.run_once() == 0
    clock.advance(timedelta(seconds=2))  # 31 s after A's last claim or renewal
    assert await live.run_once() == 2
    assert len(relay.messages) == 2


async def test_lease_running_out_mid_send_abandons_the_send(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """docs/decisions.md D13.3: a node that cannot renew stops sending before its lease is over, so
    the node that takes the row over is the only one that sends it."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    a = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "a1"))
    b = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-b", "b1"))
    (mid,) = queue_rows(db, 1, clock.now())
    relay.rcpt_delay = 2.0  # A's transaction stalls before DATA
    sending = asyncio.create_task(a.run_once())
    while relay.connections_seen == 0:  # A is talking to the relay now
        await asyncio.sleep(0.01)
    # 31 s pass without a renewal (A lost the database): the lease is over for everyone.
    clock.advance(timedelta(seconds=31))
    (taken,) = b._claim()
    assert await sending == 0  # A gave up the send and records nothing
    relay.rcpt_delay = 0.0
    outcome = await b._send_within_lease(taken)
    assert outcome is not None
    b._record(taken, *outcome)
    assert message_ids_at(relay) == {mid: 1}
    (row,) = outbox_rows(db)
    assert (row.state, row.claimed_by) == ("sent", "node-b")
    assert a.sent == 0
    assert a.stale_records == 0


# -- two delivery workers, slow relay, short lease (PostgreSQL) ------------------------------


@pytest.mark.postgres
async def test_two_nodes_slow_relay_short_lease_each_message_once(
    tmp_path: Path, pg_url: str, relay: CaptureRelay
) -> None:
    """docs/decisions.md D13.3: a batch takes longer than the lease (6 x 0.5 s > 2 s); renewals keep
    the claims, so the other node never sends the same mail again."""
    engine = open_database(pg_url)
    try:
        settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
        clock = SystemClock()
        mids = queue_rows(engine, 12, clock.now())
        relay.data_delay = 0.5
        lease = timedelta(seconds=2)
        workers = [
            DeliveryWorker(
                engine, settings, clock, node=NodeIdentity(name, "boot"), lease=lease, batch=6
            )
            for name in ("node-a", "node-b")
        ]
        counts = await asyncio.gather(*(w.run_once() for w in workers))
        at_relay = message_ids_at(relay)
        duplicates = sum(n - 1 for n in at_relay.values())
        print(f"deliveries: {sum(at_relay.values())}, duplicates: {duplicates}, per node {counts}")
        assert sorted(at_relay) == sorted(mids)
        assert duplicates == 0
        assert sum(counts) == 12
        assert all(counts)
        assert [w.stale_records for w in workers] == [0, 0]
        rows = outbox_rows(engine)
        assert {r.state for r in rows} == {"sent"}
        assert {r.claimed_by for r in rows} == {"node-a", "node-b"}
    finally:
        engine.dispose()


@pytest.mark.postgres
async def test_new_rows_wake_another_node_at_once(
    tmp_path: Path, pg_url: str, relay: CaptureRelay
) -> None:
    """docs/decisions.md D13 / 11.3 across nodes: node A queues mail and NOTIFYs; node B's delivery
    worker, asleep for up to 60 s, is woken by its LISTEN and sends it at once."""
    engine_a, engine_b = open_database(pg_url), open_database(pg_url, migrate=False)
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    clock = SystemClock()
    worker_b = DeliveryWorker(engine_b, settings, clock, node=NodeIdentity("node-b", "b1"))
    node_a = ClusterNotifier(engine_a, "node-a", lambda: None)
    node_b = ClusterNotifier(engine_b, "node-b", worker_b.wakeup.set)
    stopping = asyncio.Event()
    tasks = [
        asyncio.create_task(node_a.run(stopping)),
        asyncio.create_task(node_b.run(stopping)),
        asyncio.create_task(worker_b.run(stopping)),
    ]
    try:
        # B is listening and its worker asleep (nothing queued): wait for that state.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            worker_b.wakeup.is_set() or not _listening(engine_a)
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let B's worker finish its pass and go to sleep
        mids = queue_rows(engine_a, 3, clock.now())
        queued = time.monotonic()
        node_a.notify()
        await relay.wait_for(3, timeout=10)
        took = time.monotonic() - queued
        print(f"node B delivered node A's mail {took:.2f} s after A queued it")
        assert sorted(message_ids_at(relay)) == sorted(mids)
        assert took < 5
        assert node_b.received >= 1
    finally:
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        engine_a.dispose()
        engine_b.dispose()


def _listening(engine: Engine) -> bool:
    with engine.connect() as c:
        n = c.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                " AND datname = current_database()"
            )
        ).scalar_one()
    return int(n) >= 2


# -- a real `serve` killed mid-delivery ------------------------------------------------------


@pytest.mark.slow
async def test_sigkill_during_delivery_duplicates_only_in_flight(
    tmp_path: Path, relay: CaptureRelay
) -> None:
    """docs/decisions.md D10.12: SIGKILL while the relay holds a message it has not confirmed; after
    the restart every row goes out at once (no lease waited out), and the only duplicates are
    the messages that were in flight at the kill."""
    relay.data_delay = 0.1  # the 250 to each DATA comes 0.1 s after the relay has the mail
    port = free_port()
    cfg = write_serve_config(tmp_path, port, relay.port)
    db_path = tmp_path / "gw.db"
    daemon = ServeProcess(cfg)
    await daemon.started()
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
            for i in range(15):
                m = make_mail(sender=f"kill{i}@customer.example", subject=f"Crash test {i}")
                await smtp.send_message(m)
        await relay.wait_for(5, timeout=60)
    except BaseException:
        daemon.kill()
        raise
    daemon.kill()  # SIGKILL, with the 5th message captured and not yet confirmed
    # Deliveries run in parallel (docs/decisions.md D16): mail the dead daemon had already written
    # into its sockets is still being read by the relay; count it as in flight too.
    await relay.idle()
    states = outbox_states(db_path)
    at_kill = message_ids_at(relay)
    in_flight = sum(1 for mid in at_kill if states.get(mid) != "sent")
    left_sending = sum(1 for s in states.values() if s == "sending")
    assert left_sending > 0, states

    restarted = time.monotonic()
    daemon = ServeProcess(cfg)
    try:
        await daemon.started()
        # Waiting for work to finish (not for a deadline): bounded poll of the database.
        while time.monotonic() - restarted < 60:
            states = outbox_states(db_path)
            if len(states) >= 30 and set(states.values()) == {"sent"}:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - restarted
        log = daemon.output()
    finally:
        assert daemon.stop() == 0
    at_relay = message_ids_at(relay)
    duplicates = sum(n - 1 for n in at_relay.values())
    print(
        f"duplicates at relay: {duplicates}, in flight at kill: {in_flight}; "
        f"rows left in sending: {left_sending}, all delivered {took:.1f} s after restart"
    )
    assert set(states.values()) == {"sent"}, states
    assert len(states) == 30  # an acknowledgement and an owner notification per message
    assert set(at_relay) == set(states)  # every row reached the relay
    assert duplicates <= in_flight
    assert "took back" in log
    # The claim lease is 30 s (it was 10 minutes): the rows went out on the restart's
    # take-back, not on a lease running out.
    assert took < 25, f"{took:.1f} s"


# -- production wiring on the real clock -----------------------------------------------------


@pytest.mark.slow
async def test_escalation_mail_leaves_within_seconds_of_its_moment(
    tmp_path: Path, relay: CaptureRelay
) -> None:
    """docs/decisions.md D11.3: a 5 s first-response policy on the real clock, pipeline in its own
    process as in production; the breach notice to the owner and the manager's handover
    reach the relay within 5 s of their moments (the delivery worker used to sleep up to
    60 s after the escalator fired)."""
    settings = make_settings(
        tmp_path,
        rules_dir=str(SUPPORT / "rules_blink"),
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        security={"secret_key": "test-secret-key-0123456789abcdef", "verify_senders": False},
    )
    gw = Gateway(settings)  # SystemClock; pipeline.process = true: a child process
    await gw.start()
    try:
        child = gw.pipeline_process
        assert child is not None
        # The policy is 5 s long: on a busy machine the child's start-up alone (imports) can
        # take that, and a message processed after its deadline gets the late letter instead
        # (docs/decisions.md D11.8). What is measured here is the escalation mail, so the mail
        # arrives once the child has said it is ready.
        ready_by = time.monotonic() + 60
        while child.state == "starting" and time.monotonic() < ready_by:  # bounded poll
            await asyncio.sleep(0.05)
        assert child.state != "starting", "the pipeline child did not start within 60 s"
        await send(gw, make_mail(body="Nothing works.\nPat\n"))
        await relay.wait_for(2, timeout=30)  # acknowledgement and owner notification
        (ticket,) = all_tickets(gw)
        due = datetime.fromisoformat(
            ticket_json(gw, ticket.ref)["deadlines"]["first_response"].replace("Z", "+00:00")
        )
        # The breach is due 5 s after arrival, the manager's step 3 s later.
        await relay.wait_for(5, timeout=60)
        breach = [m for m in relay.to("alice@example.com") if "escalation:" in _text(m)]
        handover = [m for m in relay.to("carol@example.com") if "escalated to you" in _text(m)]
        assert breach, [str(m) for m in relay.messages]
        assert handover, [str(m) for m in relay.messages]
        delay_breach = (breach[0].received_at - due).total_seconds()
        delay_handover = (handover[0].received_at - (due + timedelta(seconds=3))).total_seconds()
        print(
            f"escalation mail delay after its moment: breach {delay_breach:.2f} s, "
            f"manager step {delay_handover:.2f} s"
        )
        assert 0 <= delay_breach < 5
        assert 0 <= delay_handover < 5
    finally:
        await gw.stop()


@pytest.mark.slow
async def test_acknowledgement_leaves_while_the_pipeline_is_never_idle(
    tmp_path: Path, relay: CaptureRelay
) -> None:
    """docs/decisions.md D16.1: the pipeline process signalled "batch done" only when its spool was
    empty; under sustained load the delivery worker slept its 60 s. With a backlog in the
    spool and mail still arriving, an acknowledgement reaches the relay while the spool
    still holds work."""
    settings = make_settings(
        tmp_path,
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        security={"secret_key": "test-secret-key-0123456789abcdef", "verify_senders": False},
    )
    # A backlog, as after a burst: 300 messages accepted before the pipeline gets to them.
    spool = build_spool(settings)
    for i in range(300):
        m = make_mail(sender=f"backlog{i}@customer.example", subject=f"Backlog {i}")
        spool.submit_sync(
            Envelope(f"backlog{i}@customer.example", ["support@example.com"]), m.as_bytes()
        )
    spool.close()

    gw = Gateway(settings)  # SystemClock; the pipeline in its own process
    await gw.start()
    assert gw.pipeline_process is not None
    assert gw.port is not None
    port = gw.port
    stop = asyncio.Event()

    async def feed(n: int) -> None:  # and mail keeps coming
        i = 0
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
            while not stop.is_set():
                m = make_mail(sender=f"load{n}-{i}@customer.example", subject=f"Load {n} {i}")
                await smtp.send_message(m)
                i += 1

    feeders = [asyncio.create_task(feed(n)) for n in range(2)]
    try:
        started = time.monotonic()
        await relay.wait_for(1, timeout=30)
        waited = time.monotonic() - started
        waiting = _spool_waiting(settings.spool_path)
        print(f"first mail at the relay after {waited:.2f} s; {waiting} spool entries waiting")
        assert waiting > 0  # the pipeline had not run dry: it was never idle
    finally:
        stop.set()
        await asyncio.gather(*feeders, return_exceptions=True)
        await gw.stop()


def _spool_waiting(spool_dir: Path) -> int:
    with sqlite3.connect(spool_dir / "spool.sqlite3") as c:
        return int(
            c.execute("SELECT count(*) FROM spool WHERE state != 'quarantined'").fetchone()[0]
        )


async def test_next_due_is_not_read_when_mail_was_queued_during_the_pass(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """A pass that ends with the daemon's wakeup already set (mail queued meanwhile) does not
    read `next_due()`: the loop goes round again at once. Without the wakeup it is read, and
    says when the row queued for later is due (docs/performance.md §9)."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    worker = DeliveryWorker(db, settings, clock, node=NodeIdentity("node-a", "a1"))
    queue_rows(db, 1, clock.now() + timedelta(minutes=5))
    reads: list[str] = []

    def count(_conn: object, _cur: object, statement: str, *_args: object) -> None:
        if "min(outbox.next_attempt_at)" in statement:
            reads.append(statement)

    event.listen(worker._reader, "before_cursor_execute", count)
    try:
        wake = asyncio.Event()
        wake.set()
        assert await worker._pass(then_due=True, wake=wake) == (0, None)
        assert reads == []
        wake.clear()
        done, due = await worker._pass(then_due=True, wake=wake)
        assert (done, len(reads)) == (0, 1)
        assert due == clock.now() + timedelta(minutes=5)
    finally:
        event.remove(worker._reader, "before_cursor_execute", count)
