"""Delivery under faults, with figures (issues 10.12 and 13.2/13.3).

    python bench/delivery_faults.py [--kills 3] [--mails 40] [--skip-pg]

1. **Two nodes, short lease, slow relay** (PostgreSQL): 12 outbox rows, two
   `DeliveryWorker`s with their own node identities, the lease scaled down to 4 s and a relay
   that takes 1 s per message (so one node's batch outlasts its lease, as a 12 s/message
   relay would at a 30 s lease). Before the fix: 21 deliveries, 9 duplicates.
   Prints deliveries, duplicates and the claims each node recorded.
2. **SIGKILL during delivery**: a real `serve` process (SQLite) with a capture relay that
   confirms each message 0.05 s after receiving it; `--mails` new customers (an
   acknowledgement and an owner notification each); the daemon is SIGKILLed `--kills`
   times while delivering and restarted. Prints, per kill, the rows left in `sending`, the
   messages in flight (at the relay but not recorded) and, at the end, the duplicates at
   the relay and the seconds from the last restart until every row was sent.
   Before the fix the rows left in `sending` waited out a 10-minute lease.

Exit status 0 when duplicates <= messages in flight in both scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.clock import SystemClock  # noqa: E402
from gateway.node import NodeIdentity  # noqa: E402
from gateway.outbound.worker import DeliveryWorker  # noqa: E402
from gateway.store.db import open_database  # noqa: E402
from tests.conftest import _pg_database, make_settings  # noqa: E402
from tests.support.delivery import (  # noqa: E402
    ServeProcess,
    free_port,
    message_ids_at,
    outbox_states,
    queue_rows,
    write_serve_config,
)
from tests.support.gateway import make_mail  # noqa: E402
from tests.support.relay import CaptureRelay  # noqa: E402


async def two_nodes(workdir: Path) -> bool:
    gen = _pg_database()
    url = next(gen)
    engine = open_database(url)
    try:
        async with CaptureRelay() as relay:
            relay.data_delay = 1.0
            settings = make_settings(workdir, outbound={"relay": f"127.0.0.1:{relay.port}"})
            clock = SystemClock()
            queue_rows(engine, 12, clock.now())
            workers = [
                DeliveryWorker(
                    engine,
                    settings,
                    clock,
                    node=NodeIdentity(name, "bench"),
                    lease=timedelta(seconds=4),
                )
                for name in ("node-a", "node-b")
            ]
            started = time.monotonic()
            counts = await asyncio.gather(*(w.run_once() for w in workers))
            took = time.monotonic() - started
            at_relay = message_ids_at(relay)
            deliveries = sum(at_relay.values())
            duplicates = deliveries - len(at_relay)
            print(
                f"two nodes, lease 4 s, relay 1 s/message, 12 rows: deliveries {deliveries}, "
                f"duplicates {duplicates}, recorded per node {counts}, stale outcomes "
                f"{[w.stale_records for w in workers]}, {took:.1f} s"
            )
            return duplicates == 0 and len(at_relay) == 12
    finally:
        engine.dispose()
        gen.close()


async def kills(workdir: Path, n_kills: int, mails: int) -> bool:
    workdir.mkdir(parents=True, exist_ok=True)
    async with CaptureRelay() as relay:
        relay.data_delay = 0.05
        port = free_port()
        cfg = write_serve_config(workdir, port, relay.port)
        db = workdir / "gw.db"
        expected = 2 * mails  # an acknowledgement and an owner notification per mail
        in_flight: set[str] = set()  # at the relay but not recorded, at any kill
        daemon = ServeProcess(cfg)
        await daemon.started()
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
            for i in range(mails):
                m = make_mail(sender=f"bench{i}@customer.example", subject=f"Bench {i}")
                await smtp.send_message(m)
        step = max(1, expected // (n_kills + 1))
        for k in range(n_kills):
            await relay.wait_for(min(expected, len(relay.messages) + step), timeout=120)
            daemon.kill()
            states = outbox_states(db)
            here = {mid for mid in message_ids_at(relay) if states.get(mid) != "sent"}
            in_flight |= here
            sending = sum(1 for s in states.values() if s == "sending")
            print(f"kill {k + 1}: rows left in sending {sending}, in flight {len(here)}")
            daemon = ServeProcess(cfg)
            restarted = time.monotonic()
            await daemon.started()
        while time.monotonic() - restarted < 300:
            states = outbox_states(db)
            if len(states) >= expected and set(states.values()) == {"sent"}:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - restarted
        daemon.stop()
        at_relay = message_ids_at(relay)
        duplicates = sum(at_relay.values()) - len(at_relay)
        delivered = len(set(at_relay) & set(states))
        print(
            f"SIGKILL during delivery x{n_kills}: duplicates at relay: {duplicates}, "
            f"in flight at kill: {len(in_flight)}; delivered {delivered}/{expected}, all sent "
            f"{took:.1f} s after the last restart"
        )
        return duplicates <= len(in_flight) and delivered == expected


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--mails", type=int, default=40)
    ap.add_argument("--skip-pg", action="store_true", help="only the SIGKILL scenario")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_pg:
            ok &= await two_nodes(Path(d) / "two")
        ok &= await kills(Path(d) / "kills", args.kills, args.mails)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
