"""Relay connections kept between mails (gateway/outbound/pool.py) against a real relay.

Every test speaks SMTP over loopback to `CaptureRelay` (tests/support/relay.py), which counts
the sessions it saw and the QUITs it answered, closes sessions on demand and injects 421
replies. No mocks.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.outbound.deliver import SENT, TEMPORARY, DeliveryResult, deliver
from gateway.outbound.pool import ConnectionPool
from gateway.outbound.worker import DeliveryWorker, _Claimed
from gateway.store.models import Outbox
from tests.conftest import make_settings
from tests.integration.test_deliver import HELO, make_message
from tests.support.delivery import message_ids_at, queue_rows
from tests.support.relay import CaptureRelay


async def send(
    relay: CaptureRelay, pool: ConnectionPool, rcpt: str = "customer@example.org"
) -> DeliveryResult:
    return await deliver(
        make_message(), "", [rcpt], relay=relay.address, helo=HELO, timeout=5, pool=pool
    )


async def test_mails_one_after_another_share_one_connection(relay: CaptureRelay) -> None:
    pool = ConnectionPool()
    results = [await send(relay, pool, f"c{i}@example.org") for i in range(5)]
    assert [r.outcome for r in results] == [SENT] * 5
    assert [m.rcpt_tos for m in relay.messages] == [[f"c{i}@example.org"] for i in range(5)]
    assert all(m.null_sender for m in relay.messages)  # MAIL FROM:<> on a kept connection too
    assert relay.connections_seen == 1
    assert (pool.opened, pool.reused, len(pool)) == (1, 4, 1)
    await pool.close()
    await relay.idle()  # closed by us, with QUIT
    assert relay.quits == 1
    assert relay.open_connections == 0


async def test_parallel_mails_reuse_the_connections_of_earlier_ones(relay: CaptureRelay) -> None:
    pool = ConnectionPool(per_server=4)
    first = await asyncio.gather(*(send(relay, pool, f"a{i}@example.org") for i in range(4)))
    assert relay.connections_seen == 4
    second = await asyncio.gather(*(send(relay, pool, f"b{i}@example.org") for i in range(4)))
    assert {r.outcome for r in (*first, *second)} == {SENT}
    assert relay.connections_seen == 4  # the second round opened nothing
    assert len(relay.messages) == 8
    await pool.close()
    assert relay.quits == 4


async def test_idle_connections_beyond_the_bound_are_closed(relay: CaptureRelay) -> None:
    pool = ConnectionPool(per_server=2)
    await asyncio.gather(*(send(relay, pool, f"a{i}@example.org") for i in range(4)))
    await asyncio.sleep(0)  # let the QUITs of the two surplus connections start
    await pool.close()
    await relay.idle()
    assert relay.connections_seen == 4
    assert relay.quits == 4


async def test_a_connection_the_relay_closed_is_replaced(relay: CaptureRelay) -> None:
    """A relay's idle timeout closed the kept connection: the next mail still goes out."""
    pool = ConnectionPool()
    assert (await send(relay, pool, "one@example.org")).outcome == SENT
    await relay.drop_connections()
    result = await send(relay, pool, "two@example.org")
    assert result.outcome == SENT
    assert [m.rcpt_tos for m in relay.messages] == [["one@example.org"], ["two@example.org"]]
    assert relay.connections_seen == 2
    await pool.close()


async def test_a_kept_connection_that_dies_at_mail_is_replaced_for_that_mail(
    relay: CaptureRelay,
) -> None:
    """The kept connection looked open, but the relay hangs up when it is used: the mail is
    sent once more, on a fresh connection, and arrives once."""
    pool = ConnectionPool()
    assert (await send(relay, pool, "one@example.org")).outcome == SENT
    relay.hang_up_at_mail = 1
    result = await send(relay, pool, "two@example.org")
    assert result.outcome == SENT
    assert pool.reused == 1  # the kept connection was taken and failed ...
    assert relay.connections_seen == 2  # ... and a fresh one carried the mail
    assert [m.rcpt_tos for m in relay.messages] == [["one@example.org"], ["two@example.org"]]
    await pool.close()


async def test_idle_timeout_closes_kept_connections(relay: CaptureRelay) -> None:
    pool = ConnectionPool(idle_timeout=0.05)
    assert (await send(relay, pool)).outcome == SENT
    await relay.idle()  # the pool QUITs it after its idle time, nobody else does
    assert relay.quits == 1
    assert len(pool) == 0
    assert (await send(relay, pool)).outcome == SENT
    assert relay.connections_seen == 2
    await pool.close()


async def test_421_on_a_kept_connection_sends_that_mail_on_a_fresh_one(
    relay: CaptureRelay,
) -> None:
    """The relay closes the session with 421 (RFC 5321 §3.8) at MAIL, RCPT or the end of
    DATA: the mail was not taken, so it goes out at once on a new connection."""
    pool = ConnectionPool()
    assert (await send(relay, pool, "one@example.org")).outcome == SENT
    relay.fail_next(421, "4.3.2 closing this session", at="MAIL")
    assert (await send(relay, pool, "two@example.org")).outcome == SENT
    relay.fail_next(421, "4.3.2 going down", at="RCPT")
    assert (await send(relay, pool, "three@example.org")).outcome == SENT
    relay.fail_next(421, "4.3.2 too many messages in this session", at="DATA")
    assert (await send(relay, pool, "four@example.org")).outcome == SENT
    assert [r.stage for r in relay.rejected] == ["MAIL", "RCPT", "DATA"]
    assert [m.rcpt_tos for m in relay.messages] == [
        ["one@example.org"],
        ["two@example.org"],
        ["three@example.org"],
        ["four@example.org"],
    ]
    assert relay.connections_seen == 4
    await pool.close()


async def test_421_on_the_fresh_connection_too_is_a_temporary_failure(
    relay: CaptureRelay,
) -> None:
    pool = ConnectionPool()
    assert (await send(relay, pool)).outcome == SENT
    relay.fail_always(421)
    result = await send(relay, pool)
    assert (result.outcome, result.code) == (TEMPORARY, 421)
    assert relay.connections_seen == 2  # the kept one, then one fresh: no loop of retries
    assert len(pool) == 0  # neither is kept after a failure
    await pool.close()


async def test_refusals_on_a_kept_connection_are_reported_as_before(relay: CaptureRelay) -> None:
    pool = ConnectionPool()
    assert (await send(relay, pool)).outcome == SENT
    relay.refuse_recipient("gone@example.org")
    result = await deliver(
        make_message(),
        "",
        ["gone@example.org", "here@example.org"],
        relay=relay.address,
        helo=HELO,
        timeout=5,
        pool=pool,
    )
    assert result.outcome == SENT
    assert dict(result.refused) == {"gone@example.org": (550, "5.1.1 No such user here")}
    relay.fail_next(550, at="RCPT")
    result = await send(relay, pool)
    assert (result.outcome, result.code) == ("permanent", 550)
    relay.fail_next(451, at="DATA")
    result = await send(relay, pool)
    assert (result.outcome, result.code) == (TEMPORARY, 451)
    assert relay.connections_seen <= 2  # a refusal is an answer, not a dead connection
    await pool.close()


# -- the delivery worker ------------------------------------------------------------------


def outbox(db: Engine) -> list[Outbox]:
    with Session(db) as s:
        return list(s.exec(select(Outbox).order_by(Outbox.id)).all())  # type: ignore[arg-type]


async def test_worker_keeps_connections_while_running_and_quits_them_at_shutdown(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    worker = DeliveryWorker(db, settings, clock)
    worker.parallel = 1  # one mail at a time: one connection carries all of them
    stopping = asyncio.Event()
    running = asyncio.create_task(worker.run(stopping, worker.wakeup))
    mids = queue_rows(db, 3, clock.now())
    worker.wakeup.set()
    await relay.wait_for(3)
    mids += queue_rows(db, 2, clock.now())
    worker.wakeup.set()
    await relay.wait_for(5)
    assert relay.connections_seen == 1
    assert relay.open_connections == 1  # kept while the worker runs
    # /metrics: support_gateway_relay_connections_total{how="opened"|"reused"}
    assert worker.tally[("relay_connections", "opened")] == 1
    assert worker.tally[("relay_connections", "reused")] == 4
    stopping.set()
    await running
    await relay.idle()
    assert relay.quits == 1
    assert sorted(message_ids_at(relay)) == sorted(mids)
    assert {r.state for r in outbox(db)} == {"sent"}


async def test_worker_pass_closes_its_connections_and_requeues_a_421(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    worker = DeliveryWorker(db, settings, clock)
    worker.parallel = 1
    queue_rows(db, 2, clock.now())
    relay.fail_always(421, "4.3.2 shutting down")
    assert await worker.run_once() == 2
    rows = outbox(db)
    assert [(r.state, r.attempts) for r in rows] == [("queued", 1)] * 2
    assert all("421" in r.last_error for r in rows)
    assert all(r.next_attempt_at > clock.now() for r in rows)  # the retry schedule, as before
    relay.heal()
    clock.advance(timedelta(hours=1))
    assert await worker.run_once() == 2
    assert [r.state for r in outbox(db)] == ["sent", "sent"]
    await relay.idle()  # the pass QUIT what it kept
    assert relay.open_connections == 0
    assert relay.quits == relay.connections_seen


async def test_worker_run_coalesces_wakes_and_skips_the_empty_claim(
    tmp_path: Path, db: Engine, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """`run()`: a pass that claimed less than a batch and sent it all is over (no second,
    empty claim), and wakes that come within `pass_every` of a pass's start wait for it:
    the rows queued meanwhile go out in one pass. Nothing is lost on the way."""
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    worker = DeliveryWorker(db, settings, clock)
    worker.pass_every = 0.5  # wide, so that a slow machine still sees the wakes coalesce
    claims: list[int] = []
    claim = worker._claim

    def counting_claim() -> list[_Claimed]:
        claimed = claim()
        claims.append(len(claimed))
        return claimed

    worker._claim = counting_claim  # type: ignore[method-assign]
    stopping = asyncio.Event()
    running = asyncio.create_task(worker.run(stopping, worker.wakeup))
    mids = queue_rows(db, 2, clock.now())
    worker.wakeup.set()
    await relay.wait_for(2)
    for _ in range(3):  # three pipeline batches right after the first pass
        mids += queue_rows(db, 2, clock.now())
        worker.wakeup.set()
        await asyncio.sleep(0.01)
    await relay.wait_for(8)
    stopping.set()
    await running
    # The start-up claim may have found nothing (the rows came after it), then one claim
    # per pass: the first two mails, then the six of the three wakes together.
    assert [n for n in claims if n] == [2, 6]
    assert claims.count(0) <= 1
    assert sorted(message_ids_at(relay)) == sorted(mids)
    assert {r.state for r in outbox(db)} == {"sent"}
