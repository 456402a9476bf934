"""How long the SMTP event loop stalls while acknowledgements are signed and delivered
(docs/decisions.md D16.5), and what one DKIM signature costs.

Part 1, in this process: rsa-sha256 2048 signatures per second with dkimpy's pure-Python
RSA against the `cryptography` (OpenSSL) RSA the gateway uses (dkimpy canonicalises and
hashes in both), and ed25519-sha256; every signature is verified with dkimpy.

Part 2, against a real `support-gateway serve` (DKIM rsa-sha256, a capture relay in this
process): one SMTP connection sends `NOOP` every 5 ms and times each reply while new
customers' messages arrive at `--rate` for `--duration` seconds (each one a ticket, an
acknowledgement signed and delivered, an owner notification). A stall of the daemon's
event loop (signing, a database call, the escalator on the loop) shows as a late NOOP
reply: printed are the idle and loaded p50 / p99 / max NOOP round trips.

Usage::

    python bench/loop_stall.py                     # 30/s for 20 s
    python bench/loop_stall.py --rate 50 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("e2e", Path(__file__).parent / "e2e.py")
assert _spec is not None
assert _spec.loader is not None
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

MESSAGE = (
    b"From: Support <support@example.com>\r\nTo: pat@customer.example\r\n"
    b"Subject: [EX-123] We received your message\r\nDate: Thu, 03 Dec 2026 09:00:00 +0000\r\n"
    b"Message-ID: <ack.1@example.com>\r\nAuto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
) + b"Thank you for your message. We answer by Monday 14:00.\r\n" * 40


def signing(n: int) -> list[str]:
    import dkim

    from gateway.outbound import dkim as gd

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm, fast in (
            (gd.RSA_SHA256, False),
            (gd.RSA_SHA256, True),
            (gd.ED25519_SHA256, True),
        ):
            path = Path(tmp) / f"{algorithm}-{fast}.key"
            gd.keygen(path, domain="example.com", selector="s", algorithm=algorithm)
            key = gd.load_key(path, "example.com", "s")
            record = gd.public_txt_record(key).encode()
            gd.FAST_RSA = fast
            signed = gd.sign(MESSAGE, [key])
            ok = dkim.verify(signed, dnsfunc=lambda name, timeout=5, r=record: r)
            t = time.perf_counter()
            for _ in range(n):
                gd.sign(MESSAGE, [key])
            ms = (time.perf_counter() - t) / n * 1000
            how = "cryptography RSA" if fast else "dkimpy pure-Python RSA"
            if algorithm == gd.ED25519_SHA256:
                how = "PyNaCl"
            out.append(f"{algorithm:15} {how:24} {ms:6.2f} ms/signature  verifies: {ok}")
        gd.FAST_RSA = True
    return out


async def probe(port: int, stop: asyncio.Event, rtts: list[float]) -> None:
    """NOOP every 5 ms; a new connection whenever the daemon closes one (it limits the
    commands a session may send without a transaction)."""
    while not stop.is_set():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await e2e._reply(reader)
            writer.write(b"EHLO probe.example\r\n")
            await e2e._reply(reader)
            while not stop.is_set():
                t = time.monotonic()
                writer.write(b"NOOP\r\n")
                answer = await e2e._reply(reader)
                if not answer.startswith("250"):
                    break
                rtts.append(time.monotonic() - t)
                await asyncio.sleep(0.005)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def measure(port: int, rate: int, duration: float) -> tuple[list[float], list[float]]:
    idle: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(port, stop, idle))
    await asyncio.sleep(3)
    stop.set()
    await task
    loaded: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(port, stop, loaded))
    await e2e.load(port, rate, duration, "stall")
    await asyncio.sleep(5)  # the last acknowledgements are signed and delivered meanwhile
    stop.set()
    await task
    return idle, loaded


def figures(name: str, rtts: list[float]) -> str:
    ms = sorted(r * 1000 for r in rtts)
    p99 = statistics.quantiles(ms, n=100)[98] if len(ms) > 1 else ms[0]
    return (
        f"NOOP round trip {name:7} n={len(ms):5}  p50 {statistics.median(ms):6.1f} ms"
        f"  p99 {p99:6.1f} ms  max {ms[-1]:6.1f} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=30)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--signatures", type=int, default=100)
    args = p.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for line in signing(args.signatures):
        print(line)
    from gateway.outbound.dkim import keygen

    with tempfile.TemporaryDirectory(prefix="gw-stall-") as tmpdir:
        tmp = Path(tmpdir)
        key = tmp / "dkim.pem"
        keygen(key, domain="example.com", selector="bench")
        sink = e2e.Sink()
        relay = e2e.Controller(sink, hostname="127.0.0.1", port=e2e.free_port())
        relay.start()
        port = e2e.free_port()
        cfg = tmp / "config.toml"
        cfg.write_text(
            f'rules_dir = "{e2e.RULES}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.bench.example"\n'
            'domains = ["example.com"]\nmin_free_disk = 0\nmax_connections_per_ip = 1000\n'
            f'[storage]\ndatabase_url = "sqlite:///{tmp}/gw.db"\nspool_dir = "{tmp}/spool"\n'
            f'[outbound]\nrelay = "127.0.0.1:{relay.port}"\n'
            f'[outbound.dkim]\nselector = "bench"\nkey_file = "{key}"\ndomain = "example.com"\n'
            '[security]\nsecret_key = "bench-secret-key-0123456789abcdef"\n'
            "verify_senders = false\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = str(REPO)
        logf = open(tmp / "daemon.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while b"listening on" not in (tmp / "daemon.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.stderr.write((tmp / "daemon.log").read_text())
                    return 1
                time.sleep(0.05)
            time.sleep(1.0)
            idle, loaded = asyncio.run(measure(port, args.rate, args.duration))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
            relay.stop()
    sent = int(args.rate * args.duration)
    print(f"{sent} messages at {args.rate}/s; acknowledgements at the relay: {len(sink.arrived)}")
    print(figures("idle", idle))
    print(figures("loaded", loaded))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
