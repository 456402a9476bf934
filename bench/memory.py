"""Memory of the SMTP edge under large concurrent DATA (docs/decisions.md D10.7): idle RSS vs peak
RSS.

Runs `support-gateway serve` as an admin would (its own process, a temporary spool and
database), waits until it is idle, then N clients send one large message each at the same
time. While they do, the daemon's resident set (and its pipeline child's, reported apart:
the pipeline parses whole messages by design) is sampled every 10 ms from /proc. Printed:
the configured `smtp.inflight_budget`, idle RSS, peak RSS, the growth, the replies.

Usage::

    python bench/memory.py                              # 6 x 48 MB, budget 256MiB
    python bench/memory.py --clients 6 --size 48000000 --budget 64MiB
    python bench/memory.py --budget ""                  # no budget key (older daemons)
    python bench/memory.py --clients 200 --size 5000000 --per-ip 200   # many sessions

The target (docs/decisions.md D10): peak RSS of the daemon below 2 x the budget, whatever clients
send.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "tests" / "support" / "rules"
MiB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set of `pid` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(t) for t in text)
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak RSS of the daemon and, apart, of its children, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.child_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            self.child_peak = max(self.child_peak, sum(rss(c) for c in children(self.pid)))
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_BODIES: dict[int, bytes] = {}


def message(n: int, size: int) -> tuple[bytes, bytes]:
    """Head and body of message `n`; the body is shared by all clients (one copy here)."""
    head = (
        f"From: big{n}@customer.example\r\nTo: support@example.com\r\n"
        f"Subject: large file {n}\r\nMessage-ID: <mem.{n}.{time.time_ns()}@customer.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode()
    if size not in _BODIES:
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!? base64ish\r\n"
        _BODIES[size] = line * max(1, size // len(line))
    return head, _BODIES[size]


async def reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readline()).decode(errors="replace")
        if len(line) < 4:
            raise ConnectionError(f"closed: {line!r}")
        if line[3] != "-":
            return line.strip()


async def send_one(port: int, n: int, size: int) -> str:
    head, body = message(n, size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reply(reader)
        for cmd in (b"EHLO mem.bench.example", f"MAIL FROM:<big{n}@customer.example>".encode()):
            writer.write(cmd + b"\r\n")
            await reply(reader)
        writer.write(b"RCPT TO:<support@example.com>\r\n")
        await reply(reader)
        writer.write(b"DATA\r\n")
        await reply(reader)
        # The lines never begin with ".", so the bytes need no stuffing.
        writer.write(head)
        view = memoryview(body)
        for i in range(0, len(body), MiB):
            writer.write(view[i : i + MiB])
            await writer.drain()
        writer.write(b".\r\n")
        answer = await reply(reader)
        writer.write(b"QUIT\r\n")
        return answer
    finally:
        writer.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--size", type=int, default=48_000_000, help="bytes per message")
    p.add_argument("--budget", default="256MiB", help='smtp.inflight_budget; "" = not set')
    p.add_argument("--per-ip", type=int, default=50, help="smtp.max_connections_per_ip")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="gw-mem-") as tmp:
        port = free_port()
        cfg = Path(tmp) / "config.toml"
        budget_line = f'inflight_budget = "{args.budget}"\n' if args.budget else ""
        cfg.write_text(
            f'rules_dir = "{RULES}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.bench.example"\n'
            f'domains = ["example.com"]\nmin_free_disk = 0\n{budget_line}'
            f"max_connections_per_ip = {args.per_ip}\n"
            f'[storage]\ndatabase_url = "sqlite:///{tmp}/gw.db"\nspool_dir = "{tmp}/spool"\n'
            '[outbound]\nrelay = "127.0.0.1:9"\n'
            '[security]\nsecret_key = "bench-secret-key-0123456789abcdef"\n'
            "verify_senders = false\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while b"listening on" not in (Path(tmp) / "daemon.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((Path(tmp) / "daemon.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
            time.sleep(2.0)  # let start-up settle (pipeline child, first DB work)
            idle = rss(proc.pid)
            idle_child = sum(rss(c) for c in children(proc.pid))
            sampler = Sampler(proc.pid)
            sampler.start()
            t0 = time.monotonic()

            async def load() -> list[str]:
                return await asyncio.gather(
                    *(send_one(port, n, args.size) for n in range(args.clients)),
                    return_exceptions=False,
                )

            answers = asyncio.run(load())
            elapsed = time.monotonic() - t0
            time.sleep(1.0)  # the pipeline child picks the messages up meanwhile
            sampler.stop.set()
            sampler.join()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    budget = args.budget or "(not set)"
    print(f"{args.clients} concurrent messages of {args.size:,} bytes in {elapsed:.1f} s")
    print(f"smtp.inflight_budget   {budget}")
    print(f"daemon idle RSS        {idle / MiB:8.1f} MiB")
    print(f"daemon peak RSS        {sampler.peak / MiB:8.1f} MiB")
    print(f"daemon growth          {(sampler.peak - idle) / MiB:8.1f} MiB")
    if args.budget:
        from gateway.settings import parse_size

        b = parse_size(args.budget)
        print(f"peak / budget          {sampler.peak / b:8.2f}  (target < 2.00)")
        print(f"growth / budget        {(sampler.peak - idle) / b:8.2f}")
    child = f"{idle_child / MiB:8.1f} MiB idle, {sampler.child_peak / MiB:.1f} MiB peak"
    print(f"pipeline child RSS     {child}")
    codes = [a[:3] for a in answers]
    counts = ", ".join(f"{n} x {code}" for code, n in sorted(Counter(codes).items()))
    print(f"replies                {counts}")
    return 0 if all(c == "250" for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
