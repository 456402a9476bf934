"""One installation of several nodes (docs/decisions.md D13): one key, checked; loop headers that
any node recognises; migrations that any number of nodes may start at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.security.dns import StaticResolver
from gateway.security.tokens import Signer
from gateway.settings import ConfigError
from gateway.store.models import Event
from tests.conftest import _pg_database, make_settings
from tests.support.gateway import make_mail, running_gateway, send
from tests.support.relay import CaptureRelay


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


def _psql(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.mark.postgres
def test_three_db_upgrades_at_once_on_an_empty_database_all_succeed(
    tmp_path: Path, pg_url: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[storage]\ndatabase_url = "{pg_url}"\nspool_dir = "{tmp_path}/spool"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), "db", "upgrade"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    with psycopg.connect(_psql(pg_url)) as c:
        row = c.execute("SELECT version_num FROM alembic_version").fetchall()
    assert row == [(_head(),)]


@pytest.mark.postgres
def test_postgres_without_a_configured_key_refuses_to_start(tmp_path: Path, pg_url: str) -> None:
    settings = make_settings(
        tmp_path, storage={"database_url": pg_url}, security={"secret_key": ""}
    )
    with pytest.raises(ConfigError) as err:
        Gateway(settings, clock=FrozenClock(), resolver=StaticResolver({}))
    assert "secret_key_file" in str(err.value)
    assert "the others" in str(err.value)
    # Nothing was generated beside the spool: the node did not invent a key of its own.
    assert not (settings.spool_path.parent / "secret_key").exists()


@pytest.mark.postgres
def test_the_database_records_a_fingerprint_never_the_key(tmp_path: Path, pg_url: str) -> None:
    settings = make_settings(tmp_path / "a", storage={"database_url": pg_url})
    gw = Gateway(settings, clock=FrozenClock(), resolver=StaticResolver({}))
    gw.spool.close()
    gw.engine.dispose()
    key = settings.security.secret_key
    with psycopg.connect(_psql(pg_url)) as c:
        rows = c.execute("SELECT key, value FROM installation").fetchall()
    assert rows == [("secret-fingerprint", Signer(key.encode()).fingerprint())]
    assert key not in rows[0][1]
    # A second node with the same key starts; one with another key is refused.
    same = make_settings(tmp_path / "b", storage={"database_url": pg_url})
    gw = Gateway(same, clock=FrozenClock(), resolver=StaticResolver({}))
    gw.spool.close()
    gw.engine.dispose()
    other = make_settings(
        tmp_path / "c",
        storage={"database_url": pg_url},
        security={"secret_key": "some-other-key-0123456789abcdefghij"},
    )
    with pytest.raises(ConfigError) as err:
        Gateway(other, clock=FrozenClock(), resolver=StaticResolver({}))
    assert "secret key differs" in str(err.value)
    assert "secret_key_file" in str(err.value)


async def test_an_ack_sent_by_one_node_is_our_loop_at_another(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """Nodes have their own host names; the loop header is the installation's (docs/decisions.md
    D13.7: before, node B read node A's header as a foreign gateway's)."""
    common = {
        "storage": {
            "database_url": f"sqlite:///{tmp_path}/gateway.db",
            "spool_dir": str(tmp_path / "spool"),
        },
        "outbound": {"relay": f"127.0.0.1:{relay.port}"},
    }
    a = make_settings(tmp_path, smtp={"hostname": "mx1.example.com"}, **common)
    async with running_gateway(a, clock) as gw:
        await send(gw, make_mail())
        assert await gw.pipeline.run_once() == 1
        await gw.delivery.run_once()
    [ack] = relay.to("pat@customer.example")
    b = make_settings(tmp_path, smtp={"hostname": "mx2.example.com"}, **common)
    async with running_gateway(b, clock) as gw:
        # The acknowledgement comes back (a customer's forwarding rule sends it to us).
        await send(gw, ack.data, sender="pat@customer.example", recipients=["help@example.com"])
        assert await gw.pipeline.run_once() == 1
        with Session(gw.engine) as s:
            events = s.exec(select(Event).where(Event.type == "classified")).all()
    assert [e.detail.split(":")[0] for e in events] == ["loop"], [e.detail for e in events]
    assert "our loop header" in events[0].detail


@pytest.mark.postgres
async def test_a_new_ticket_on_one_node_wakes_the_other_nodes_escalator(pg_url: str) -> None:
    """LISTEN/NOTIFY on `gateway_ticket`: an escalation never waits for another node's poll."""
    from gateway.store.db import open_database
    from gateway.store.notify import ClusterNotifier

    engine = open_database(pg_url)
    woken = {"a-outbox": 0, "a-ticket": 0, "b-outbox": 0, "b-ticket": 0}

    def bump(key: str) -> Callable[[], None]:
        return lambda: woken.__setitem__(key, woken[key] + 1)

    a = ClusterNotifier(engine, "a", bump("a-outbox"), on_ticket=bump("a-ticket"))
    b = ClusterNotifier(engine, "b", bump("b-outbox"), on_ticket=bump("b-ticket"))
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(n.run(stopping)) for n in (a, b)]
    try:
        # Each listener looks once when it (re)connects: wait for that, then measure.
        await wait_for(lambda: woken["a-ticket"] >= 1 and woken["b-ticket"] >= 1)
        before = dict(woken)
        a.notify_ticket()
        await wait_for(lambda: b.received_tickets == 1)
        await asyncio.sleep(0.2)  # anything else it would have woken is here by now
        assert woken["b-ticket"] == before["b-ticket"] + 1
        assert woken["b-outbox"] == before["b-outbox"]  # a ticket is not an outbox row
        assert woken["a-ticket"] == before["a-ticket"]  # a node ignores its own notes
    finally:
        stopping.set()
        for t in tasks:
            await t
        engine.dispose()


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a condition (bounded): the work is another connection's."""
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)


def _head() -> str:
    """The newest migration (one head: the chain must never fork)."""
    from alembic.script import ScriptDirectory

    from gateway.store.db import MIGRATIONS

    heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
    assert len(heads) == 1, heads
    return str(heads[0])


@pytest.mark.postgres
async def test_a_large_message_on_the_shared_spool_is_accepted_and_processed(
    tmp_path: Path, pg_url: str
) -> None:
    """A message the SMTP edge streams to disk (over 1 MiB) is committed to the node's spool
    in pieces, then moved into the shared database and processed by the pipeline: `250`,
    never a hang (the shared spool once left such a message to a writer that never ran)."""
    from gateway.store.models import Ticket

    settings = make_settings(tmp_path, storage={"database_url": pg_url})
    big = make_mail(subject="Large attachment", body="x" * 50 + "\n")
    big.add_attachment(os.urandom(3 * 1024 * 1024), maintype="application", subtype="zip")
    async with running_gateway(settings, FrozenClock()) as gw:
        code, _ = await asyncio.wait_for(send(gw, big), timeout=30)
        assert code == 250
        processed = 0

        async def ticketed() -> bool:
            nonlocal processed
            processed += await gw.pipeline.run_once()
            with Session(gw.engine) as s:
                return s.exec(select(Ticket)).first() is not None

        end = asyncio.get_running_loop().time() + 30
        while not await ticketed():  # bounded: the drain moves it within seconds
            assert asyncio.get_running_loop().time() < end, "never reached the database"
            await asyncio.sleep(0.2)
    assert processed == 1
