"""The loop shared by the workers that act at stored moments (the sender re-check and the
acknowledgement bundles): run what is due, then sleep until the next due moment, a wakeup
or the stop, whichever comes first, with a ceiling so that rows written by another node
are seen. Both workers keep `run_once()` for tests and the CLI; only the waiting is here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from gateway.clock import Clock

log = logging.getLogger("gateway.pipeline")

#: Never wake more often than this: a due moment just passed is caught by the next pass.
MIN_DELAY = 0.5


class Looks:
    """When a timed loop looks next on its own, so that a new row is a reason to wake it only
    if it is due before then (gateway/app.py `after_batch`)."""

    def __init__(self) -> None:
        #: The moment the loop's sleep ends; None while it looks (or before it first sleeps):
        #: a row committed then may be missed by the look under way, so it must wake.
        self.next: datetime | None = None

    def wake_for(self, due: datetime) -> bool:
        """True when a row due at `due` needs the loop woken: it would otherwise be due
        before the loop looks (a row due exactly then is found by that look)."""
        return self.next is None or due < self.next


async def run_timed(
    name: str,
    run_once: Callable[[], Awaitable[int]],
    next_due: Callable[[], datetime | None],
    clock: Clock,
    stopping: asyncio.Event,
    wakeup: asyncio.Event,
    idle: float,
    looks: Looks | None = None,
) -> None:
    """Loop until `stopping`: `run_once()`, then wait for `next_due()` (at most `idle` s).
    `looks`, when given, tells when the loop looks next (its sleep's end)."""
    while not stopping.is_set():
        if looks is not None:
            looks.next = None
        wakeup.clear()
        try:
            await run_once()
            nxt = await asyncio.to_thread(next_due)
        except Exception:
            log.exception("%s loop error", name)
            nxt = None
        delay = idle
        if nxt is not None:
            delay = max(MIN_DELAY, min(idle, (nxt - clock.now()).total_seconds()))
        if looks is not None:
            looks.next = clock.now() + timedelta(seconds=delay)
        waiter = asyncio.ensure_future(wakeup.wait())
        stopper = asyncio.ensure_future(stopping.wait())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait(
                {waiter, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
        waiter.cancel()
        stopper.cancel()
