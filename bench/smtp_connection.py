"""Per-connection cost of the SMTP edge: constructing the protocol object (docs/decisions.md D16).

aiosmtpd 1.4.6 builds, for every connection, its AUTH mechanism table with
`inspect.getmembers` over the protocol and the handler, its hook tables with `dir()` and
the EHLO hook's signature (docs/performance.md, problem 2). This times constructing
`GatewaySMTP` (what `serve` does per accepted connection) against stock `aiosmtpd.smtp.SMTP`
with the same handler, interleaved, in one process.

    python bench/smtp_connection.py            # 5 x 2,000 constructions each
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP

from gateway.clock import SystemClock
from gateway.inbound.smtp import ConnectionLimits, GatewaySMTP, InboundHandler
from gateway.spool import Spool


async def main() -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp), max_attempts=3, min_free_disk=0)
        spool.open()
        handler = InboundHandler(
            spool=spool, domains=["example.com"], hostname="mx.example", clock=SystemClock()
        )
        limits = ConnectionLimits(100, 100)
        kinds = {
            "stock SMTP": lambda: SMTP(handler, hostname="mx.example", loop=loop),
            "GatewaySMTP": lambda: GatewaySMTP(
                handler,
                limits=limits,
                receive_limit=1 << 20,
                hostname="mx.example",
                enable_SMTPUTF8=True,
                command_call_limit={"NOOP": 100, "*": 100000},
                loop=loop,
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in kinds}
        n = 2000
        for _ in range(5):
            for name, make in kinds.items():
                t = time.perf_counter()
                for _ in range(n):
                    make()
                times[name].append((time.perf_counter() - t) / n * 1e6)
        for name, ts in times.items():
            print(f"{name:12s} min {min(ts):7.1f} us  median {statistics.median(ts):7.1f} us")
        spool.close()


if __name__ == "__main__":
    asyncio.run(main())
