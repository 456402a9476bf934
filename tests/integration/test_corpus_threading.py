"""Threading measured on real mail: the fedora-devel January 2010 list archive (292 messages)
fed over SMTP to the running gateway, compared with the archive's own thread tree
(tests/support/corpus.py documents the corpus, the ground-truth mapping and the figures).

- reply placement: every reply whose ground-truth parent exists and whose References or
  In-Reply-To name an earlier corpus message lands in its thread root's ticket, or in a ticket
  linked to it (links followed both ways, transitively);
- wrong joins: no message shares a ticket with a message of another ground-truth thread.

The benchmark script bench/corpus_threading.py prints the same report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.clock import FrozenClock
from tests.conftest import make_settings
from tests.support.corpus import MBOX, THREAD_HTML, evaluate, feed, load_corpus
from tests.support.gateway import running_gateway

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MBOX.exists() and THREAD_HTML.exists()),
        reason="threads-fedora-devel corpus not present",
    ),
]

# Goal 1.0. Measured 226/227. Replies that name an ancestor we never received are linked to
# the tickets naming the same ancestor (the "ABRT considered painful" thread, whose root
# predates the archive). The one miss, msg00248, sits below msg00153, which names nothing:
# the archive threaded it by subject alone, so no header-based engine can place it.
# Replies with a References chain to their root (within the corpus) are placed at 100%.
PLACEMENT_FLOOR = 226 / 227


def test_ground_truth_maps_every_message() -> None:
    messages, mapping = load_corpus()
    assert len(messages) == 292
    assert mapping.mapped == mapping.verified == 292, mapping.mismatches
    assert not mapping.unmapped_index
    assert not mapping.unmapped_mbox
    assert len(mapping.truth.threads()) == 60
    assert all(m.raw.count(b"\n") == m.raw.count(b"\r\n") for m in messages)


async def test_corpus_threading(tmp_path: Path, clock: FrozenClock) -> None:
    messages, mapping = load_corpus()
    async with running_gateway(make_settings(tmp_path), clock) as gw:
        await feed(gw, messages)
        report = evaluate(gw, messages, mapping)
    print("\n".join(report.lines()))
    assert report.total == 292
    assert not report.unplaced, report.unplaced
    assert report.wrong_joins == [], "\n".join(report.lines())
    assert report.eligible > 0
    assert report.placement_share >= PLACEMENT_FLOOR, "\n".join(report.lines())
    assert report.connected_eligible > 0
    assert report.gateway_misses == [], "\n".join(report.lines())
    assert report.connected_placed == report.connected_eligible
