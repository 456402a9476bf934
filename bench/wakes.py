"""CPU of the work one pipeline batch wakes in the daemon, with nothing due.

After every batch the pipeline process commits, the daemon wakes its delivery worker, the
escalator, the sender re-check worker and the bundle worker (gateway/app.py `after_batch`).
This measures, on SQLite, the CPU (this process, `time.process_time`) of one pass of each
of the last three with nothing due: the escalator's `run_once()` + `next_due()` (what its
loop runs per wake), and the re-check and bundle workers' `run_once_sync()` + `next_due()`,
at 0 and at N open tickets (bulk-inserted like bench/e2e.py, then planned by one pass).

Run it against another checkout with that checkout first on PYTHONPATH::

    PYTHONPATH=$PWD python bench/wakes.py --open 0,100000
    PYTHONPATH=/work/main python bench/wakes.py --open 0,100000

The figure per wake is what each batch cost before the daemon stopped waking the re-check
and bundle workers for batches that created nothing for them, and coalesced the escalator's
wakes to one pass per `WAKE_GAP` (gateway/escalation/escalator.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

try:
    import gateway  # noqa: F401  (the checkout on PYTHONPATH, if any)
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.clock import SystemClock
from gateway.escalation.escalator import Escalator
from gateway.pipeline.bundle import BundleWorker
from gateway.pipeline.context import Services
from gateway.pipeline.recheck import AuthRechecker
from gateway.routing.loader import load_rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.store.db import open_database

RULES = Path(__file__).resolve().parent.parent / "tests" / "support" / "rules"


def preload(engine: Any, count: int) -> None:
    """`count` open tickets with SLA clocks due days ahead: bench/e2e.py's `preload`, its one
    due ticket a month ahead (nothing is due while this measures)."""
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH's gateway
    from bench.e2e import preload as e2e_preload

    url = engine.url.render_as_string(hide_password=False)
    e2e_preload(url, count, datetime.now(UTC) + timedelta(days=30))


def cpu_per_call(fn: Any, rounds: int) -> float:
    """Mean CPU milliseconds of `fn()` over `rounds` calls (after one warm-up call)."""
    fn()
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) * 1000 / rounds


def measure(open_tickets: int, rounds: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            rules_dir=str(RULES),
            storage={"database_url": f"sqlite:///{tmp}/wakes.db", "spool_dir": f"{tmp}/spool"},
            security={"secret_key": "bench-secret-key-0123456789abcdef"},
        )
        engine = open_database(settings.storage.database_url)
        preload(engine, open_tickets)
        rules = load_rules(RULES)
        clock = SystemClock()
        signer = Signer(settings.secret())
        services = Services(
            settings=settings, clock=clock, signer=signer, rules=rules, resolver=None
        )
        esc = Escalator(engine, settings, clock, lambda: rules, signer)
        while True:  # plan every preloaded ticket first: steady state, nothing due
            esc.run_once()
            if not esc.planner.busy:
                break
        rechecker = AuthRechecker(engine, services)
        bundler = BundleWorker(engine, services)

        def escalator_wake() -> None:
            esc.run_once()
            esc.next_due()

        def recheck_wake() -> None:
            rechecker.run_once_sync()
            rechecker.next_due()

        def bundle_wake() -> None:
            bundler.run_once_sync()
            bundler.next_due()

        figures = {
            "escalator": cpu_per_call(escalator_wake, rounds),
            "re-check": cpu_per_call(recheck_wake, rounds),
            "bundle": cpu_per_call(bundle_wake, rounds),
        }
        engine.dispose()
    parts = ", ".join(f"{name} {ms:.3f} ms" for name, ms in figures.items())
    return f"{open_tickets:>7,} open tickets: CPU per wake with nothing due: {parts}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--open", default="0,100000", help="open tickets, comma-separated")
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args()
    print(f"gateway from {Path(sys.modules['gateway'].__file__ or '').parent.parent}")
    for n in (int(x) for x in args.open.split(",") if x):
        print(measure(n, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
