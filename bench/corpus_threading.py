"""Threading benchmark on real mail: feed the fedora-devel January 2010 list archive (292
messages) over SMTP to an in-process gateway and compare its tickets with the archive's own
thread tree.

    python bench/corpus_threading.py [--batch N] [--keep DIR]

Prints reply placement (same ticket as the thread root, or a ticket linked to it), wrong
joins, and every miss with its reason. The corpus, the ground-truth mapping and the figures
are defined in tests/support/corpus.py (shared with tests/integration/test_corpus_threading.py).
Exit status: 0 when there are no wrong joins and every reply with a References chain to its
root was placed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.clock import FrozenClock  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.support.corpus import Report, evaluate, feed, load_corpus  # noqa: E402
from tests.support.gateway import running_gateway  # noqa: E402


async def run(workdir: Path, batch: int) -> tuple[Report, float]:
    """Feed the corpus to a fresh gateway in ``workdir``; return the report and seconds taken."""
    messages, mapping = load_corpus()
    settings = make_settings(workdir)
    started = time.perf_counter()
    async with running_gateway(settings, FrozenClock()) as gw:
        await feed(gw, messages, batch=batch)
        elapsed = time.perf_counter() - started
        report = evaluate(gw, messages, mapping)
    return report, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch", type=int, default=1, help="run the pipeline after every N messages (1)"
    )
    parser.add_argument("--keep", type=Path, help="keep the database and spool in this folder")
    args = parser.parse_args(argv)
    # The archive's DKIM keys are long gone; the resolver is static, so say so only once.
    logging.basicConfig(level=logging.CRITICAL)

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report, elapsed = asyncio.run(run(args.keep, args.batch))
    else:
        with tempfile.TemporaryDirectory(prefix="corpus-threading-") as tmp:
            report, elapsed = asyncio.run(run(Path(tmp), args.batch))
    print("\n".join(report.lines()))
    print(f"  time to feed and thread:     {elapsed:.1f} s ({report.total / elapsed:.0f} msg/s)")
    ok = not report.wrong_joins and not report.gateway_misses
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
