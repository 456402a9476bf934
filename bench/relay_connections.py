"""What delivering costs the daemon's event loop, with and without kept relay connections
(gateway/outbound/pool.py, docs/performance.md §5).

A sink relay (aiosmtpd's `Sink` handler) runs in its own process, so its CPU is not counted.
This process delivers the same acknowledgement-sized message with
`gateway.outbound.deliver.deliver()`, `--parallel` at a time as the delivery worker does,
first with a fresh connection per mail (as before) and then with a `ConnectionPool`,
alternating for `--rounds`; it prints mails per second and the CPU milliseconds this
process spent per mail (the figure to compare on a shared machine).

Usage::

    python bench/relay_connections.py                    # 3 rounds x 600 mails, 8 at a time
    python bench/relay_connections.py --tls              # the relay offers STARTTLS
    python bench/relay_connections.py --mails 1000 --parallel 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.outbound.deliver import SENT, deliver  # noqa: E402
from gateway.outbound.pool import ConnectionPool  # noqa: E402

MESSAGE = (
    (
        "From: Example Support <support@example.com>\r\nTo: c1@customer.example\r\n"
        "Subject: [ACME-1] printer on fire\r\nMessage-ID: <bench@example.com>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    + "We received your message and a person will answer.\r\n" * 60
).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_round(
    port: int, mails: int, parallel: int, pool: ConnectionPool | None, starttls: str
) -> float:
    gate = asyncio.Semaphore(parallel)

    async def send(i: int) -> None:
        async with gate:
            result = await deliver(
                MESSAGE,
                "",
                [f"c{i}@customer.example"],
                relay=("127.0.0.1", port),
                helo="gw.example.com",
                starttls=starttls,
                pool=pool,
            )
            assert result.outcome == SENT, result

    start = time.monotonic()
    await asyncio.gather(*(send(i) for i in range(mails)))
    if pool is not None:
        await pool.close()
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mails", type=int, default=600)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tls", action="store_true", help="the relay offers STARTTLS (opportunistic)")
    args = p.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    port = free_port()
    sink = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    starttls = "never"
    if args.tls:
        from tests.support.tls import self_signed

        cert, key = self_signed(Path(tempfile.mkdtemp(prefix="relay-bench-")), "127.0.0.1")
        sink += ["--tlscert", str(cert), "--tlskey", str(key)]
        starttls = "opportunistic"
    relay = subprocess.Popen(
        [*sink, "-c", "aiosmtpd.handlers.Sink"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
        asyncio.run(one_round(port, 20, args.parallel, None, starttls))  # warm-up
        for n in range(1, args.rounds + 1):
            for label, pooled in (("new connection per mail", False), ("kept connections", True)):
                pool = ConnectionPool(per_server=args.parallel) if pooled else None
                cpu = time.process_time()
                wall = asyncio.run(one_round(port, args.mails, args.parallel, pool, starttls))
                cpu = time.process_time() - cpu
                opened = f", {pool.opened} connections" if pool is not None else ""
                print(
                    f"round {n} {label:24s}: {args.mails / wall:7.1f} mails/s, "
                    f"{cpu / args.mails * 1000:5.2f} ms CPU per mail{opened}",
                    flush=True,
                )
    finally:
        relay.terminate()
        relay.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
