"""Several pipeline processes in one node (`pipeline.workers`, PostgreSQL's shared spool).

On PostgreSQL a message's statements are round trips to the server: one pipeline process
spends more time waiting than computing, and a second one overlaps those waits. What must
hold, as for several nodes (test_multinode.py):

- each process claims under a name of its own (`<node>`, `<node>.p1`, ...), so a process
  that dies gives back what it held, and only that: its siblings keep their messages;
- a restart of the node takes back what all of its processes held;
- with two processes every accepted message becomes exactly one ticket, both take part,
  and SIGKILL of one loses nothing (the supervisor restarts it);
- SQLite, or a node's own spool, refuses `workers > 1` with a clear message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from pydantic import ValidationError
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.factories import build_spool
from gateway.node import pipeline_claimant
from gateway.settings import Settings
from gateway.spool import Envelope
from gateway.store.db import open_database
from gateway.store.models import Ticket
from tests.conftest import _pg_database, make_settings
from tests.integration.test_multinode import Node, db, inbound_counts, write_config
from tests.support.gateway import make_mail, running_gateway, send
from tests.support.relay import CaptureRelay

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def pg_url(pg_migrated_template: str) -> Iterator[str]:
    yield from _pg_database(pg_migrated_template)


def claimed_by(url: str) -> dict[int, str]:
    with db(url) as c:
        rows = c.execute("SELECT id, claimed_by FROM spool_entry WHERE state='claimed'")
        return {int(r[0]): str(r[1]) for r in rows.fetchall()}


def test_a_dead_process_gives_back_only_its_own_claims(tmp_path: Path, pg_url: str) -> None:
    settings = make_settings(
        tmp_path, storage={"database_url": pg_url}, node={"id": "mx1"}, pipeline={"workers": 2}
    )
    engine = open_database(pg_url, migrate=False)
    node = build_spool(settings, engine=engine)  # the daemon's: submits, recovers
    first = build_spool(settings, engine=engine, worker=0)
    second = build_spool(settings, engine=engine, worker=1)
    try:
        for i in range(4):
            node.submit_sync(
                Envelope(f"c{i}@customer.example", ["support@example.com"]), f"m{i}".encode()
            )
        mine = [e.id for e in first.claim(2)]
        theirs = [e.id for e in second.claim(2)]
        assert claimed_by(pg_url) == {
            **dict.fromkeys(mine, "mx1"),
            **dict.fromkeys(theirs, pipeline_claimant("mx1", 1)),
        }
        assert pipeline_claimant("mx1", 1) == "mx1.p1"

        # The second process died busy with its first entry: that one is charged the
        # attempt, its other entry goes back in line; the first process keeps both of its.
        node.recover_crashed(theirs[0], "the pipeline process died (-9)", "mx1.p1")
        assert claimed_by(pg_url) == dict.fromkeys(mine, "mx1")

        # Its other entry is back in line at once; the culprit waits out its retry delay.
        again = second.claim(4)
        assert [e.id for e in again] == [theirs[1]]
        # A restart of the node takes back what any of its processes held.
        assert set(claimed_by(pg_url).values()) == {"mx1", "mx1.p1"}
        assert node.recover() == 3
        assert claimed_by(pg_url) == {}
    finally:
        for s in (first, second, node):
            s.close()
        engine.dispose()


def test_more_than_one_worker_needs_the_shared_spool(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"pipeline\.workers = 2 needs PostgreSQL"):
        Settings(pipeline={"workers": 2})
    with pytest.raises(ValidationError, match=r"storage\.shared_spool = true"):
        Settings(
            pipeline={"workers": 3},
            storage={"database_url": "postgresql+psycopg://u@h/d", "shared_spool": False},
        )
    ok = Settings(pipeline={"workers": 2}, storage={"database_url": "postgresql+psycopg://u@h/d"})
    assert ok.pipeline.workers == 2


def pipeline_pids(pid: int) -> list[int]:
    """The node's pipeline processes (spawned children; not the resource tracker)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
    return sorted(out)


def processed_by(log: str) -> dict[str, int]:
    """How many messages each pipeline process logged as processed, by its log tag."""
    out: dict[str, int] = {}
    for line in log.splitlines():
        if "processed " in line and "[pipeline" in line:
            tag = line.split("[pipeline", 1)[1].split("]", 1)[0]
            out["pipeline" + tag] = out.get("pipeline" + tag, 0) + 1
    return out


@pytest.mark.slow
async def test_two_pipeline_processes_share_the_work_and_survive_a_kill(
    tmp_path: Path, pg_url: str
) -> None:
    async with CaptureRelay() as relay:
        await _two_processes(tmp_path, pg_url, relay)


async def _two_processes(tmp_path: Path, pg_url: str, relay: CaptureRelay) -> None:
    cfg = write_config(tmp_path / "mx1", pg_url, relay.port)
    cfg.write_text(cfg.read_text() + "[pipeline]\nworkers = 2\n")
    node = Node(cfg)
    sent: list[str] = []
    try:
        await node.started()
        deadline = time.monotonic() + 60
        while len(pipeline_pids(node.proc.pid)) < 2:  # bounded: both children start
            assert time.monotonic() < deadline, node.output()[-2000:]
            await asyncio.sleep(0.1)
        workers = pipeline_pids(node.proc.pid)

        async def feed(n: int, count: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=node.port, timeout=30) as c:
                for i in range(count):
                    m = make_mail(sender=f"w{n}-{i}@customer.example", subject=f"Case {n}-{i}")
                    refused, _ = await c.send_message(m)
                    assert refused == {}  # 250
                    sent.append(str(m["Message-ID"]))

        # Mail arrives until both processes have taken some (the second may still be
        # importing when the first messages come: which one claims them is a race).
        rounds, deadline = 0, time.monotonic() + 90
        while set(processed_by(node.output())) != {"pipeline", "pipeline.p1"}:
            assert time.monotonic() < deadline, node.output()[-3000:]  # bounded wait
            await asyncio.gather(*(feed(100 + rounds * 4 + n, 5) for n in range(4)))
            rounds += 1
            await asyncio.sleep(0.2)
        # A backlog, and one of the two processes is killed while it is worked off.
        await asyncio.gather(*(feed(n, 15) for n in range(4)))
        os.kill(workers[1], signal.SIGKILL)
        await asyncio.gather(*(feed(n, 5) for n in range(4, 6)))

        # Bounded wait for the work: the entry the killed process was busy with is charged
        # the attempt and waits out its first retry delay (60 s), as with one process.
        deadline = time.monotonic() + 120
        while sum(inbound_counts(pg_url).values()) < len(sent):
            assert time.monotonic() < deadline, node.output()[-3000:]
            await asyncio.sleep(0.3)
        counts = inbound_counts(pg_url)
        assert sorted(counts) == sorted(sent)
        assert set(counts.values()) == {1}  # exactly once each, the killed one's included
        log = node.output()
        assert "pipeline process exited (-9); recovering and restarting it" in log
        deadline = time.monotonic() + 60
        while len(pipeline_pids(node.proc.pid)) < 2:  # bounded: the killed one is back
            assert time.monotonic() < deadline, log[-2000:]
            await asyncio.sleep(0.1)
    finally:
        node.stop()


async def test_a_ticket_with_a_named_owner_does_not_wait_for_the_routing_lock(
    tmp_path: Path, pg_url: str
) -> None:
    """The "routing" advisory lock serialises team assignment across nodes and processes;
    a ticket whose route (here the defaults) names its owner reads no assignment state and
    must not wait for it. Before, every new ticket took it and held it to its commit: with
    another process holding it, this message would wait (the bounded wait below fails)."""

    settings = make_settings(tmp_path, storage={"database_url": pg_url})
    async with running_gateway(settings, FrozenClock()) as gw:
        code, _ = await send(gw, make_mail(sender="named@customer.example"))
        assert code == 250
        with db(pg_url) as holder:  # another pipeline, in the middle of a team assignment
            holder.execute("SELECT pg_advisory_lock(hashtext('routing'))")
            try:
                done = await asyncio.wait_for(gw.pipeline.run_once(), timeout=30)
            finally:
                holder.execute("SELECT pg_advisory_unlock(hashtext('routing'))")
        assert done == 1
        with Session(gw.engine) as s:
            ticket = s.exec(select(Ticket)).one()
        assert ticket.requester == "named@customer.example"


def test_a_claim_takes_waiting_and_expired_entries_oldest_first(
    tmp_path: Path, pg_url: str
) -> None:
    """What is due (waiting and due, or claimed by someone whose lease ran out) in id order,
    at most the limit; never an entry not due yet, nor one another claimant still holds."""
    from gateway.shared_spool import SharedSpool

    clock = FrozenClock()
    engine = open_database(pg_url)
    spool = SharedSpool(tmp_path / "spool", engine=engine, node="n1", clock=clock)
    try:
        env = Envelope(mail_from="a@example.net", rcpt_tos=["support@example.com"])
        ids = [spool.submit_sync(env, make_mail(subject=f"m{i}").as_bytes()) for i in range(6)]
        now = clock.now().timestamp()
        with db(pg_url) as c:
            # ids[0]: another node's claim whose lease ran out; ids[1]: one still held;
            # ids[2]: waiting but not due yet (a retry's backoff).
            c.execute(
                "UPDATE spool_entry SET state='claimed', claimed_by='n2', lease_until=%s"
                " WHERE id=%s",
                (now - 1, ids[0]),
            )
            c.execute(
                "UPDATE spool_entry SET state='claimed', claimed_by='n2', lease_until=%s"
                " WHERE id=%s",
                (now + 60, ids[1]),
            )
            c.execute("UPDATE spool_entry SET not_before=%s WHERE id=%s", (now + 60, ids[2]))
        first = spool.claim(2)
        assert [e.id for e in first] == [ids[0], ids[3]]
        rest = spool.claim(10)
        assert [e.id for e in rest] == [ids[4], ids[5]]
        assert claimed_by(pg_url) == {
            ids[0]: "n1",
            ids[1]: "n2",
            ids[3]: "n1",
            ids[4]: "n1",
            ids[5]: "n1",
        }
    finally:
        spool.close()
        engine.dispose()
