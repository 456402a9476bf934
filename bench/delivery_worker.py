"""What the delivery worker costs the daemon per mail: claim, DKIM sign, send, record.

The daemon's CPU per new-customer message (bench/e2e.py) is mostly two outgoing mails, each
claimed from the outbox, DKIM rsa-sha256 signed, handed to the relay over a kept connection
and recorded. This bench isolates that: `--mails` acknowledgement-sized rows are queued
directly in a fresh SQLite database (or `--database-url` PostgreSQL), a sink relay runs in
its own process (its CPU not counted), and one `DeliveryWorker.run_once()` sends them all,
as the daemon's worker does (claims of `batch` rows, 8 sends in flight). It prints the CPU
milliseconds this process spent per mail (all threads), the figure to compare on a shared
machine, alternating `--rounds` times between this checkout and `--code` when given.

Usage::

    python bench/delivery_worker.py                          # 3 rounds x 1000 mails
    python bench/delivery_worker.py --code /tmp/before       # before/after, alternating
    python bench/delivery_worker.py --mails 600 --trickle 100   # then 600 more at 100/s

With ``--trickle`` the queued mails only warm up the worker's `run()`; the figure is for
the mails that follow in pairs, each pair committed and woken as the pipeline does for a new
ticket (the daemon at 50 messages/s): claims of a few rows, not of 50.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SINK = "aiosmtpd.handlers.Sink"
ACK_BODY = "We received your message and a person will answer.\r\n" * 30

#: Run in a child process with the checkout under test first on sys.path.
CHILD = r"""
import asyncio, sys, time, json
from datetime import UTC, datetime
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from gateway.clock import SystemClock
from gateway.outbound.dkim import keygen
from gateway.outbound.worker import DeliveryWorker, enqueue
from gateway.store.db import make_engine, session_scope, upgrade
from tests.conftest import make_settings

tmp, relay_port, mails, url = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
key = tmp / "dkim.pem"
if not key.exists():
    keygen(key, domain="example.com", selector="gw")
db_url = url or f"sqlite:///{tmp}/gw.db"
settings = make_settings(
    tmp,
    storage={"database_url": db_url, "spool_dir": str(tmp / "spool")},
    outbound={
        "relay": f"127.0.0.1:{relay_port}",
        "dkim": {"key_file": str(key), "domain": "example.com", "selector": "gw"},
    },
)
engine = make_engine(db_url)
upgrade(engine)
now = datetime.now(UTC)

def queue_ack(s, tag, rcpt, when):
    # one acknowledgement-sized mail to rcpt (the body is argv[6])
    mid = f"<{tag}.{time.time_ns()}@example.com>"
    raw = (
        "From: Example Support <support@example.com>\r\n"
        f"To: {rcpt}\r\nSubject: [ACME-{tag}] We got your message\r\n"
        f"Date: Fri, 04 Dec 2026 15:00:00 +0000\r\nMessage-ID: {mid}\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + sys.argv[6]
    ).encode()
    enqueue(s, ticket_id=None, kind="ack", raw=raw, message_id=mid, rcpt_tos=[rcpt], now=when)

with session_scope(engine) as s:
    for i in range(mails):
        queue_ack(s, f"bench{i}", f"c{i}@customer.example", now)
worker = DeliveryWorker(engine, settings, SystemClock())
worker.warm_up()
trickle = float(sys.argv[7])
if not trickle:
    cpu, wall = time.process_time(), time.monotonic()
    sent = asyncio.run(worker.run_once())
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert sent == mails, (sent, mails)
    print(json.dumps({"cpu_ms": cpu / mails * 1000, "rate": mails / wall}))
    raise SystemExit(0)

# Trickle: the queued rows were the warm-up; now pairs of rows arrive at `trickle` mails/s
# from a thread (the pipeline process's part, its CPU not counted) that wakes the worker as
# the pipeline's batch commit does, and the worker's `run()` sends them as the daemon does.
import threading

async def trickled() -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    stopping, wake = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stopping, wake))
    while worker.sent < mails:
        await asyncio.sleep(0.05)
    feeder_cpu = [0.0]

    def feed() -> None:
        t0 = time.thread_time()
        start = time.monotonic()
        for i in range(mails // 2):
            time.sleep(max(0.0, start + 2 * i / trickle - time.monotonic()))
            with session_scope(engine) as s:
                for j in range(2):
                    queue_ack(s, f"t{i}.{j}", f"c{i}.{j}@customer.example", datetime.now(UTC))
            loop.call_soon_threadsafe(wake.set)
        feeder_cpu[0] = time.thread_time() - t0

    cpu, wall = time.process_time(), time.monotonic()
    feeder = threading.Thread(target=feed)
    feeder.start()
    while worker.sent < 2 * mails or feeder.is_alive():
        await asyncio.sleep(0.05)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    stopping.set()
    wake.set()
    await task
    return cpu - feeder_cpu[0], wall, feeder_cpu[0]

cpu, wall, feeder = asyncio.run(trickled())
print(json.dumps({"cpu_ms": cpu / mails * 1000, "rate": mails / wall}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_round(
    code: Path, relay_port: int, mails: int, url: str, trickle: float = 0.0
) -> dict[str, float]:
    import json

    with tempfile.TemporaryDirectory(prefix="gw-dw-") as tmp:
        argv = [str(code), tmp, str(relay_port), str(mails), url, ACK_BODY, str(trickle)]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *argv],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mails", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--code", help="also run this checkout (e.g. /tmp/before), alternating")
    p.add_argument("--database-url", default="", help="PostgreSQL (default a fresh SQLite)")
    p.add_argument(
        "--trickle",
        type=float,
        default=0.0,
        help="after the queued mails, as many more arrive in pairs at this many mails/s "
        "(woken per pair, as bench/e2e.py's new tickets wake the daemon's worker); "
        "CPU per trickled mail",
    )
    args = p.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", SINK],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    codes = [REPO] + ([Path(args.code)] if args.code else [])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the sink relay did not start") from None
                time.sleep(0.1)
        for n in range(1, args.rounds + 1):
            for code in codes:
                r = one_round(code, port, args.mails, args.database_url, args.trickle)
                print(
                    f"round {n} {code!s:24s}: {r['cpu_ms']:5.2f} ms CPU per mail, "
                    f"{r['rate']:6.1f} mails/s",
                    flush=True,
                )
    finally:
        relay.terminate()
        relay.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
