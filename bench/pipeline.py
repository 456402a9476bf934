"""Pipeline throughput alone: spooled new-customer messages -> committed tickets (docs/decisions.md
D16).

bench/e2e.py measures what a customer feels, but on a shared 2-core machine its figures
swing with whatever else runs. This bench isolates the part that limits it: the pipeline
(parse, classify, thread, route, record, respond, notify; what the pipeline child runs).
It spools N messages exactly like bench/e2e.py's (a new customer each, so every one opens a
ticket and queues an acknowledgement and an owner notification), optionally pre-loads open
tickets as bench/e2e.py does, then times `PipelineWorker.run_once_sync()` in this process
and prints messages per second and the process CPU time per message (the CPU figure is what
to compare between runs: it does not depend on what else the machine does).

Usage::

    python bench/pipeline.py                            # 600 messages, SQLite, 0 open tickets
    python bench/pipeline.py --preload 100000           # with 100,000 open tickets
    python bench/pipeline.py --profile /tmp/p.prof      # cProfile of the run (pstats file)
    python bench/pipeline.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.e2e import RULES, preload  # noqa: E402
from bench.mail import customer_message  # noqa: E402

# `--code DIR` (before anything imports gateway; bench.e2e puts this checkout first): time
# another checkout's pipeline, e.g. /work/main, for a before/after pair with the same bench.
if "--code" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))


def watch_sql(engine: Any, stats: dict[str, list[float]]) -> None:
    """Time every statement the engine runs, by SQL text."""
    from sqlalchemy import event

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        conn.info["t0"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        stats.setdefault(statement, []).append(time.perf_counter() - conn.info["t0"])


def run(args: argparse.Namespace, db_url: str, tmp: Path) -> None:
    from gateway.clock import SystemClock
    from gateway.factories import build_spool
    from gateway.pipeline.context import Services
    from gateway.pipeline.worker import PipelineWorker
    from gateway.routing.holder import RulesHolder
    from gateway.security.tokens import Signer
    from gateway.settings import Settings
    from gateway.spool import Envelope
    from gateway.store.db import open_database

    settings = Settings(
        rules_dir=str(RULES),
        smtp={"listen": "127.0.0.1:0", "hostname": "mx.bench.example", "domains": ["example.com"]},
        storage={"database_url": db_url, "spool_dir": str(tmp / "spool")},
        outbound={"relay": "127.0.0.1:9", "from_address": "support@example.com"},
        security={"secret_key": "bench-secret-key-0123456789abcdef", "verify_senders": False},
    )
    engine = open_database(db_url)
    took = preload(db_url, args.preload, datetime.now(UTC) + timedelta(days=1))
    if args.preload:
        print(f"preloaded {args.preload:,} open tickets in {took:.1f} s")
    clock = SystemClock()
    spool = build_spool(settings, clock, engine)
    services = Services(
        settings=settings,
        clock=clock,
        signer=Signer(settings.secret()),
        rules=RulesHolder(settings.rules_path).current,
        resolver=None,
    )
    worker = PipelineWorker(engine=engine, spool=spool, services=services)
    stats: dict[str, list[float]] = {}
    if args.sql:
        watch_sql(engine, stats)
    sizes = [int(n) for n in args.tx_batch.split(",") if n]
    for rnd in range(args.rounds):
        worker.tx_batch = sizes[rnd % len(sizes)]
        for i in range(args.messages):
            addr = f"c{rnd}-{i}@customer.example"
            env = Envelope(
                mail_from=addr,
                rcpt_tos=["support@example.com"],
                peer="127.0.0.1",
                helo="client.customer.example",
                received_at=datetime.now(UTC).isoformat(),
            )
            spool.submit_sync(env, customer_message(i, addr))
        prof = cProfile.Profile() if args.profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        done = worker.run_once_sync()
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"round {rnd + 1} (tx_batch {worker.tx_batch}): {done} messages in {wall:.2f} s:"
            f" {done / wall:.1f} msg/s,"
            f" {wall / done * 1000:.2f} ms wall and {cpu / done * 1000:.2f} ms CPU per message"
            f" (failures {worker.failures})",
            flush=True,
        )
    if args.sql:
        total = sum(len(v) for v in stats.values())
        print(f"SQL statements: {total / (args.messages * args.rounds):.1f} per message; top 25:")
        top = sorted(stats.items(), key=lambda kv: -sum(kv[1]))[:25]
        for sql, times in top:
            print(f"{sum(times) * 1000:9.1f} ms {len(times):6d}x  {' '.join(sql.split())[:150]}")
    with engine.connect() as conn:
        queued = conn.execute(text("SELECT count(*) FROM outbox")).scalar()
    print(f"outbox rows: {queued}")
    spool.close()
    engine.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=600, help="messages per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds (the first one warms up)")
    p.add_argument("--preload", type=int, default=0, help="open tickets pre-loaded")
    p.add_argument(
        "--tx-batch",
        default="8",
        help="entries per transaction; a list alternates between rounds (A/B in one run)",
    )
    p.add_argument("--profile", default="", help="write a cProfile of the last round here")
    p.add_argument("--code", default="", help="import gateway from this checkout instead")
    p.add_argument("--sql", action="store_true", help="time each SQL statement; print the top")
    p.add_argument("--database-url", default="", help="PostgreSQL server (default SQLite)")
    args = p.parse_args()
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    import gateway

    print(f"gateway from {Path(gateway.__file__).parent.parent}")
    with tempfile.TemporaryDirectory(prefix="gw-pipe-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.database_url:
            run(args, f"sqlite:///{tmp}/gw.db", tmp)
            return 0
        base = make_url(args.database_url)
        name = f"gw_pipe_{os.getpid()}"
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            run(args, base.set(database=name).render_as_string(hide_password=False), tmp)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
