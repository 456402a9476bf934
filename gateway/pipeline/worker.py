"""The pipeline worker: claims spooled messages and runs the stages in one transaction.

`run_once()` processes what is waiting (tests and the CLI call it directly); the daemon
loops it, woken by an `asyncio.Event` that the spool sets after each group commit.
The spool entry is released only after the database commit; a crash in between means
the entry is processed again and the database dedupes it (same envelope+bytes hash).
A message that fails `storage.max_attempts` times moves to the quarantine with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from sqlalchemy.engine import Engine

from gateway.logs import kv
from gateway.metrics import is_database_error
from gateway.pipeline.context import Context, Services
from gateway.pipeline.stages import STAGES, Stage, run_stages, summary
from gateway.spool import Spool, SpoolEntry
from gateway.store.db import session_scope

log = logging.getLogger("gateway.pipeline")


class Stopping(Protocol):
    """An asyncio, threading or multiprocessing Event: only `is_set()` is used."""

    def is_set(self) -> bool: ...


class PipelineWorker:
    def __init__(
        self,
        *,
        engine: Engine,
        spool: Spool,
        services: Services,
        stages: tuple[Stage, ...] = STAGES,
        batch: int = 50,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.services = services
        self.stages = stages
        self.batch = batch
        self.wakeup = asyncio.Event()
        self.processed = 0
        self.failures = 0
        # Prometheus tallies (gateway/metrics.py); the pipeline process ships them home.
        self.tally: Counter[tuple[str, ...]] = Counter()
        self.after_batch: Callable[[], None] | None = None

    def process(self, entry: SpoolEntry) -> Context:
        """Run every stage for one entry in one transaction (blocking; call in a thread)."""
        received = (
            datetime.fromisoformat(entry.envelope.received_at)
            if entry.envelope.received_at
            else None
        )
        now = self.services.clock.now()
        with session_scope(self.engine) as session:
            ctx = Context(
                entry=entry,
                session=session,
                services=self.services,
                now=now,
                received_at=received or now,
            )
            run_stages(ctx, self.stages)
        return ctx

    def process_one(self, entry: SpoolEntry) -> bool:
        try:
            ctx = self.process(entry)
        except Exception as exc:
            self.failures += 1
            self.tally[("pipeline_failed",)] += 1
            if is_database_error(exc):
                self.tally[("database_errors",)] += 1
            reason = f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            state = self.spool.fail(entry.id, reason)
            if state == "quarantined":
                self.tally[("pipeline_quarantined",)] += 1
            log.error("processing spool entry %s failed (%s): %r", entry.id, state, exc)
            return False
        self.spool.release(entry.id)
        self.processed += 1
        self.tally[("pipeline_processed",)] += 1
        fields = summary(ctx)
        log.info("processed %s", kv(fields), extra={"fields": {"event": "processed", **fields}})
        return True

    def run_once_sync(self, stopping: Stopping | None = None) -> int:
        """Process everything waiting now; return how many entries were handled.

        With `stopping` set it returns after the current entry (graceful stop must not wait
        for a whole backlog); entries claimed but not processed go back in line.
        """
        done = 0
        while True:
            entries = self.spool.claim(self.batch)
            if not entries:
                return done
            for i, entry in enumerate(entries):
                if stopping is not None and stopping.is_set():
                    self.spool.unclaim([e.id for e in entries[i:]])
                    return done
                self.process_one(entry)
                done += 1

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    async def run(self, stopping: asyncio.Event) -> None:
        """Loop until `stopping` is set; the current item is always finished first."""
        while not stopping.is_set():
            self.wakeup.clear()
            try:
                done = await asyncio.to_thread(self.run_once_sync, stopping)
                if done and self.after_batch is not None:
                    self.after_batch()
            except Exception:  # the spool itself failed: log, back off, try again
                log.exception("pipeline loop error")
                await asyncio.sleep(1)
            waiter = asyncio.create_task(self.wakeup.wait())
            stopper = asyncio.create_task(stopping.wait())
            # A timeout so that entries whose failure put them back in line are retried.
            await asyncio.wait({waiter, stopper}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
