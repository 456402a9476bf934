"""The simulated SLA week (tests/support/simweek.py) with many tickets: prints the promise
figures of docs/decisions.md D11.

Off-duty hours, absences, a 24x7 policy served by office-hours people plus an on-call
person, reassignments, merges and late mail, on a frozen clock in 10-minute ticks against
the real database and escalator. Printed: promises made, kept, broken, withdrawn; broken
customer promises with no notice (goal 0); statements naming a person who did not act on
that step (goal 0); notices within 60 s of each other to one customer (goal 0); and how
long the week took.

Usage::

    python bench/sla_week.py                    # 1,000 tickets on SQLite
    python bench/sla_week.py --tickets 300 --database postgresql+psycopg://postgres@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.store.db import open_database
from tests.support.simweek import SEED, run_week


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--database", help="SQLAlchemy URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database or f"sqlite:///{tmp}/sla_week.db"
        engine = open_database(url)
        report = run_week(engine, Path(tmp), args.tickets, args.seed)
        engine.dispose()
    width = max(len(k) for k in report.figures)
    for key, value in report.figures.items():
        print(f"{key:<{width}}  {value}")
    bad = {k: v[:5] for k, v in report.violations.items() if v}
    if bad:
        print("violations (first 5 of each):", json.dumps(bad, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
