"""Pipe-mode ingest: time from process start to exit (the message durable), per message.

Postfix's pipe(8) starts `support-gateway ingest` once per message, so this is the delivery
latency an MTA sees. Each run spawns `python -m gateway --config C ingest --sender S
--recipient R` with a small message on stdin, exactly as pipe(8) would, and times spawn to
exit; exit status 0 means the message is committed (fsynced) to the spool. The spool is
counted at the end: it must hold every message.

Usage::

    python bench/pipe_ingest.py                     # 50 messages, this checkout
    python bench/pipe_ingest.py --n 50 --code DIR   # another checkout (e.g. an older commit)

`python -c pass` is timed the same way, as the floor that interpreter start-up sets on this
machine (site packages, .pth hooks).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGE = (
    b"From: Pat <pat@customer.example>\r\nTo: support@example.com\r\n"
    b"Subject: printer on fire\r\nMessage-ID: <%d@customer.example>\r\n\r\nHelp!\r\n"
)


def _time(cmd: list[str], env: dict[str, str], stdin: bytes, cwd: str) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, input=stdin, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="messages (default 50)")
    ap.add_argument(
        "--code",
        default=str(Path(__file__).resolve().parents[1]),
        help="checkout whose gateway package runs (default: this one)",
    )
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = a.code
    with tempfile.TemporaryDirectory(prefix="pipe-bench-") as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[storage]\nspool_dir = "{tmp}/spool"\ndatabase_url = "sqlite:///{tmp}/gw.db"\n'
            '[smtp]\ndomains = ["example.com"]\nmin_free_disk = "10MiB"\n'
            '[security]\nsecret_key = "bench-secret-0123456789abcdef"\n'
        )
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(cfg),
            "ingest",
            "--sender",
            "pat@customer.example",
            "--recipient",
            "support@example.com",
        ]
        floor: list[float] = []
        times: list[float] = []
        for i in range(a.n):  # interleaved, so both see the same machine load
            floor.append(_time([sys.executable, "-c", "pass"], env, b"", tmp))
            times.append(_time(cmd, env, MESSAGE % i, "/"))
        with sqlite3.connect(Path(tmp) / "spool" / "spool.sqlite3") as c:
            stored = c.execute("SELECT count(*) FROM spool").fetchone()[0]
    assert stored == a.n, f"spool holds {stored} of {a.n} messages"
    ms = sorted(t * 1000 for t in times)
    print(f"code: {a.code}")
    print(f"python -c pass:     median {statistics.median(floor) * 1000:7.1f} ms")
    print(
        "ingest minus interpreter start-up (median - median): "
        f"{statistics.median(ms) - statistics.median(floor) * 1000:7.1f} ms"
    )
    print(
        f"ingest per message: median {statistics.median(ms):7.1f} ms, "
        f"p90 {ms[int(0.9 * len(ms)) - 1]:7.1f} ms, min {ms[0]:7.1f} ms  (n={a.n}, all durable)"
    )


if __name__ == "__main__":
    main()
