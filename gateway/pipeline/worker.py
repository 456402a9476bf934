"""The pipeline worker: claims spooled messages and runs the stages in one transaction.

`run_once()` processes what is waiting (tests and the CLI call it directly); the daemon
loops it, woken by an `asyncio.Event` that the spool sets after each group commit.
The spool entry is released only with or after the database commit: the shared spool
(PostgreSQL) deletes it in the same transaction; the local spool after the commit, and a
crash in between means the entry is processed again and the database dedupes it (same
envelope+bytes hash).

Two kinds of failure (docs/decisions.md D10; docs/operations.md "Infrastructure faults"):
- an *infrastructure fault* (database unreachable, disk full or below the free-space floor;
  `gateway.pipeline.faults`) says nothing about the message: the entry goes back in line
  without costing an attempt and the worker *pauses*, probing (`SELECT 1` and free space)
  at 0.5 s doubling to 4 s, and resumes at the first healthy probe. One alert per outage
  goes to the admins when it ends ("unreachable from T1 to T2, N messages waited"; the
  outage is logged at ERROR when it starts, and reported directly through the relay if it
  is still going after `WARN_AFTER` seconds);
- a *message fault* (anything else) costs an attempt with backoff. On the last attempt the
  message is processed once more in degraded form (top-level headers, the original bytes
  attached: `parse.degraded`) so the customer still gets a ticket and an acknowledgement;
  only if that fails too does it go to the quarantine, and the admins and the default
  owner are alerted with the reason and the raw message attached. Never silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway import alerts
from gateway.logs import kv
from gateway.metrics import is_database_error
from gateway.pipeline.context import Context, Services
from gateway.pipeline.faults import (
    PROBE_BYTES,
    Backoff,
    DiskLow,
    Fault,
    check_free_space,
    classify_fault,
    database_folder,
    probe,
)
from gateway.pipeline.parse import degraded
from gateway.pipeline.stages import CHAINS, PREFIX, Stage, parse_stage, run_stages, summary
from gateway.pipeline.thread import Disposition
from gateway.spool import Spool, SpoolEntry
from gateway.store.db import session_scope

#: Spool entries processed in one database transaction when several are waiting: one
#: commit (one fsync) and one spool release for all of them instead of one each (docs/decisions.md
# D16;
#: docs/performance.md). Small, because an acknowledgement leaves only after its group
#: commits.
TX_BATCH = 8
#: ...and no further entry joins a group once it has taken this many seconds: on SQLite the
#: group holds the write lock, and the delivery worker and the escalator write too (their
#: claims and outcomes must not wait behind a slow group on a loaded machine).
TX_BUDGET = 0.05

#: An outage still going after this many (real) seconds is reported at once, directly.
WARN_AFTER = 600.0
#: Infrastructure faults of one entry that the probe right after found healthy, after which
#: the fault counts as the message's own (a misclassified poison message must not stall
#: the whole pipeline for ever).
SUSPECT_LIMIT = 3

log = logging.getLogger("gateway.pipeline")


class Stopping(Protocol):
    """An asyncio, threading or multiprocessing Event: only `is_set()` is used."""

    def is_set(self) -> bool: ...


@dataclass
class Outage:
    """The infrastructure is away: since when (injected clock, for the alert's text, and
    monotonic, for pacing), why, and how many entries were put back meanwhile."""

    kind: str
    reason: str
    started: datetime
    started_mono: float
    deferred: set[int] = field(default_factory=set)
    warned: bool = False
    reserve: int = 0  # bytes a disk probe must be able to allocate (0: database fault)


class PipelineWorker:
    def __init__(
        self,
        *,
        engine: Engine,
        spool: Spool,
        services: Services,
        prefix: tuple[Stage, ...] = PREFIX,
        chains: Mapping[Disposition, tuple[Stage, ...]] = CHAINS,
        batch: int = 50,
        tx_batch: int = TX_BATCH,
        tx_budget: float = TX_BUDGET,
        pause_initial: float = 0.5,
        pause_max: float = 4.0,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.services = services
        # The stages every message goes through, then those of its disposition (stages.py).
        self.prefix = prefix
        self.chains = chains
        self.batch = batch
        self.tx_batch = max(1, tx_batch)
        self.tx_budget = tx_budget
        self.wakeup = asyncio.Event()
        self.processed = 0
        self.failures = 0
        # Prometheus tallies (gateway/metrics.py); the pipeline process ships them home.
        self.tally: Counter[tuple[str, ...]] = Counter()
        self.after_batch: Callable[[], None] | None = None
        # Called with "busy" before each entry, "idle" when nothing is left, "paused" at
        # each probe of an outage: the supervisor's heartbeat (process.py).
        self.heartbeat: Callable[[str, int | None], None] | None = None
        # Thread-safe "a batch has committed" (set by `run`; the process child signals
        # after every message instead, see process.py).
        self.on_batch_committed: Callable[[], None] | None = None
        self.outage: Outage | None = None
        self.outages = 0  # how many have ended (status, tests)
        self.probes = 0  # probes made during outages (status, tests)
        self.backoff = Backoff(pause_initial, pause_max)
        self._next_probe = 0.0
        self._suspects: dict[int, int] = {}
        folders = [Path(spool.directory)]
        db_folder = database_folder(engine.url.render_as_string(hide_password=True))
        if db_folder is not None and db_folder not in folders:
            folders.append(db_folder)
        self.folders = folders
        # SMTP refuses mail below smtp.min_free_disk; the pipeline keeps draining the spool
        # into the database down to half of it, then pauses (it never fills the disk).
        self.min_free_disk = services.settings.smtp.min_free_disk // 2

    # Processing ----------------------------------------------------------------------------

    def process(self, entry: SpoolEntry, *, degrade: str | None = None) -> Context:
        """Run the stages of one entry in one transaction (blocking; call in a thread).

        With `degrade` (a reason) the parse stage is replaced by the degraded form: the
        top-level headers and the original bytes as an attachment.
        """
        prefix = self.prefix
        if degrade is not None:
            prefix = tuple(_degraded_stage(degrade) if s is parse_stage else s for s in prefix)
        with session_scope(self.engine) as session:
            ctx = self._run(entry, session, prefix)
            self._release_in(session, [entry.id])
            return ctx

    def _release_in(self, session: Session, ids: list[int]) -> None:
        """A spool in the ticket database forgets the entries in the transaction that
        commits their tickets (`Spool.releases_in_transaction`)."""
        if self.spool.releases_in_transaction:
            self.spool.release_in(session.connection(), ids)

    def _release_after(self, ids: list[int]) -> None:
        """Any other spool forgets them once that transaction has committed."""
        if not self.spool.releases_in_transaction:
            self.spool.release_many(ids)

    def _run(self, entry: SpoolEntry, session: Session, prefix: tuple[Stage, ...]) -> Context:
        """The stages of one entry inside the caller's transaction."""
        received = (
            datetime.fromisoformat(entry.envelope.received_at)
            if entry.envelope.received_at
            else None
        )
        now = self.services.clock.now()
        ctx = Context(
            entry=entry,
            session=session,
            services=self.services,
            now=now,
            received_at=received or now,
        )
        run_stages(ctx, prefix, self.chains)
        return ctx

    def process_many(
        self, entries: list[SpoolEntry], stopping: Stopping | None = None
    ) -> list[Context]:
        """Run every stage for the first of `entries` in ONE transaction (blocking): all of
        them commit together or none does. Raises what the first failing entry raised.

        Takes the entries in order until `tx_budget` seconds have passed or `stopping` is
        set (at least one); returns the contexts of those it took.
        """
        out: list[Context] = []
        start = time.monotonic()
        with session_scope(self.engine) as session:
            for entry in entries:
                if out and (
                    time.monotonic() - start >= self.tx_budget
                    or (stopping is not None and stopping.is_set())
                ):
                    break
                if self.heartbeat is not None:
                    self.heartbeat("busy", entry.id)
                out.append(self._run(entry, session, self.prefix))
            self._release_in(session, [e.id for e in entries[: len(out)]])
        return out

    def process_group(
        self, entries: list[SpoolEntry], stopping: Stopping | None = None
    ) -> tuple[int, int]:
        """Process the first of the claimed `entries` in one transaction (see
        `process_many`); return how many were handled (an entry put back in line because
        the infrastructure went away does not count) and how many were taken.

        Each message's outcome stays its own: if any entry of the group fails, the whole
        transaction is rolled back and the entries are processed again one by one, so the
        failure costs an attempt to the failing message only (a poison message must not
        take its neighbours with it), and an infrastructure fault pauses the worker as
        before. Entries not reached when `stopping` is set or an outage begins go back in
        line untouched.
        """
        if len(entries) > 1:
            try:
                ctxs = self.process_many(entries, stopping)
            except Exception as exc:
                log.info(
                    "a group of %d spool entries failed (%s); processing them one by one",
                    len(entries),
                    exc.__class__.__name__,
                )
            else:
                taken = entries[: len(ctxs)]
                self._release_after([e.id for e in taken])
                for entry, ctx in zip(taken, ctxs, strict=True):
                    self._processed(entry, ctx)
                return len(taken), len(taken)
        done = 0
        for i, entry in enumerate(entries):
            if (stopping is not None and stopping.is_set()) or self.outage is not None:
                self.spool.unclaim([e.id for e in entries[i:]])
                return done, len(entries)
            if self.heartbeat is not None:
                self.heartbeat("busy", entry.id)
            self.process_one(entry)
            if self.outage is None:
                done += 1
        return done, len(entries)

    def _processed(self, entry: SpoolEntry, ctx: Context) -> None:
        self._suspects.pop(entry.id, None)
        self.processed += 1
        self.tally[("pipeline_processed",)] += 1
        fields = summary(ctx)
        log.info("processed %s", kv(fields), extra={"fields": {"event": "processed", **fields}})

    def process_one(self, entry: SpoolEntry) -> bool:
        """Process one claimed entry. False: it failed, or it went back in line because the
        infrastructure is away (then `self.outage` is set and the caller stops the batch)."""
        try:
            ctx = self.process(entry)
        except Exception as exc:
            if is_database_error(exc):
                self.tally[("database_errors",)] += 1
            if self._infrastructure(exc, entry):
                return False
            self.tally[("pipeline_failed",)] += 1
            return self._message_fault(entry, exc)
        self._release_after([entry.id])
        self._processed(entry, ctx)
        return True

    def _infrastructure(self, exc: BaseException, entry: SpoolEntry) -> bool:
        """Handle an infrastructure fault: the entry goes back in line at no cost and, if
        the probe confirms the outage, the worker pauses. False: a fault of the message."""
        fault = classify_fault(exc)
        if fault is None:
            return False
        if not self._healthy(_reserve(fault, entry)):
            self.spool.unclaim([entry.id])
            self._enter_outage(fault, entry)
            return True
        # The fault looked like the infrastructure's, yet the infrastructure answers: a
        # transient one (a dropped connection: retry at once, no outage, no alert) or the
        # message's own in disguise (the same entry again and again).
        n = self._suspects.get(entry.id, 0) + 1
        self._suspects[entry.id] = n
        if n < SUSPECT_LIMIT:
            log.warning(
                "spool entry %s: transient %s fault (%s); retrying it",
                entry.id,
                fault.kind,
                fault.reason,
            )
            self.spool.unclaim([entry.id])
            return True
        log.error(
            "spool entry %s: %s repeated %d times with the %s healthy;"
            " treating it as a fault of the message",
            entry.id,
            fault.reason,
            n,
            fault.kind,
        )
        self._suspects.pop(entry.id, None)
        return False

    def _healthy(self, reserve: int = 0) -> bool:
        try:
            probe(self.engine, self.folders, self.min_free_disk, reserve)
        except Exception:
            return False
        return True

    def _message_fault(self, entry: SpoolEntry, exc: BaseException) -> bool:
        self.failures += 1
        reason = f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        if entry.attempts < self.spool.max_attempts:
            state = self.spool.fail(entry.id, reason)
            log.error("processing spool entry %s failed (%s): %r", entry.id, state, exc)
            return False
        # Last attempt: the message once more in degraded form, so that a customer whose
        # mail trips a bug still gets a ticket (with the original attached) and an answer.
        short = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:300]
        try:
            ctx = self.process(entry, degrade=f"processing failed ({short})")
        except Exception as exc2:
            if self._infrastructure(exc2, entry):
                return False
            self.spool.quarantine(entry.id, reason)
            self.tally[("pipeline_quarantined",)] += 1
            log.error("spool entry %s quarantined: %r", entry.id, exc)
            self.alert_quarantined(entry, short)
            return False
        self._release_after([entry.id])
        self.processed += 1
        self.tally[("pipeline_processed",)] += 1
        log.error("processed %s in degraded form after %r", kv(summary(ctx)), exc)
        return True

    def alert_quarantined(self, entry: SpoolEntry, reason: str) -> None:
        """Tell the admins and the default owner: who wrote, about what, and why it failed."""
        settings = self.services.settings
        try:
            p = degraded(entry.raw, reason)
            sender, subject = p.from_address or entry.envelope.mail_from, p.subject
        except Exception:
            sender, subject = entry.envelope.mail_from, ""
        body = (
            f"A message could not be processed and is in the quarantine (spool id {entry.id}).\n"
            f"\nFrom: {sender or '(null sender)'}\n"
            f"Envelope sender: <{entry.envelope.mail_from}>\n"
            f"To: {', '.join(entry.envelope.rcpt_tos)}\n"
            f"Subject: {subject or '(none readable)'}\n"
            f"Received: {entry.envelope.received_at}\n"
            f"\nCould not be processed: {reason}\n"
            f"\nThe original message is attached when it is small enough. After a fix:\n"
            f"  support-gateway quarantine replay {entry.id}   (or --all)\n"
        )
        attach = None
        if len(entry.raw) <= settings.outbound.notify_attachment_limit:
            attach = (f"quarantined-{entry.id}.eml", entry.raw)
        alerts.send_alert(
            self.engine,
            settings,
            self.services.signer,
            to=alerts.recipients(settings, self.services.rules, owner=True),
            subject=f"message from {sender or 'unknown sender'} quarantined",
            body=body,
            now=self.services.clock.now(),
            attachment=attach,
        )

    # Outages -------------------------------------------------------------------------------

    def _enter_outage(self, fault: Fault, entry: SpoolEntry | None = None) -> None:
        if self.outage is None:
            self.outage = Outage(
                fault.kind, fault.reason, self.services.clock.now(), time.monotonic()
            )
            self.backoff.reset()
            log.error(
                "%s unavailable (%s): pipeline paused; mail is kept in the spool and no"
                " attempts are counted",
                fault.kind,
                fault.reason,
            )
        self.outage.reserve = max(self.outage.reserve, _reserve(fault, entry))
        if entry is not None:
            self.outage.deferred.add(entry.id)
        self._next_probe = time.monotonic() + self.backoff.next()

    def _ready(self) -> bool:
        """May the worker claim work now? Probes the infrastructure during an outage."""
        if self.outage is None:
            try:
                check_free_space(self.folders, self.min_free_disk)
            except DiskLow as exc:
                self._enter_outage(Fault("disk", str(exc)))
                return False
            return True
        if time.monotonic() < self._next_probe:
            return False
        if self.heartbeat is not None:
            self.heartbeat("paused", None)
        self.probes += 1
        try:
            # After a disk fault, resume only with 10 % to spare above the floor, so that
            # free space hovering around it does not pause and resume (and alert) by turns.
            floor = self.min_free_disk
            if self.outage.kind == "disk":
                floor += floor // 10
            probe(self.engine, self.folders, floor, self.outage.reserve)
        except Exception as exc:
            log.info("%s still unavailable: %r", self.outage.kind, exc)
            self._next_probe = time.monotonic() + self.backoff.next()
            self._warn_if_long()
            return False
        self._end_outage()
        return True

    def _warn_if_long(self) -> None:
        outage = self.outage
        assert outage is not None
        if outage.warned or time.monotonic() - outage.started_mono < WARN_AFTER:
            return
        outage.warned = True
        settings = self.services.settings
        alerts.send_alert(
            self.engine,
            settings,
            self.services.signer,
            to=alerts.recipients(settings, self.services.rules),
            subject=f"{outage.kind} unavailable since {outage.started:%Y-%m-%d %H:%M:%S} UTC",
            body=(
                f"The pipeline has been paused since {outage.started.isoformat()}: "
                f"{outage.reason}\nIncoming mail is accepted and kept in the spool; it will"
                " be processed when the fault is gone. Another alert follows then.\n"
            ),
            now=self.services.clock.now(),
        )

    def _end_outage(self) -> None:
        outage = self.outage
        assert outage is not None
        self.outage = None
        self.outages += 1
        self.backoff.reset()
        ended = self.services.clock.now()
        # Waiting = in line in the spool, plus (shared spool) what the SMTP side could not
        # hand to the database during the outage and holds on this node's disk until its
        # writer moves it over: both waited for the same fault.
        counts = self.spool.counts()
        waiting = counts.get("pending", 0) + counts.get("local", 0)
        seconds = time.monotonic() - outage.started_mono
        log.warning(
            "%s available again after %.1f s; resuming with %d messages waiting",
            outage.kind,
            seconds,
            waiting,
        )
        settings = self.services.settings
        alerts.send_alert(
            self.engine,
            settings,
            self.services.signer,
            to=alerts.recipients(settings, self.services.rules),
            subject=f"{outage.kind} was unavailable; processing resumed",
            body=(
                f"The {outage.kind} was unavailable from {outage.started.isoformat()} to"
                f" {ended.isoformat()} (by the wall clock {seconds:.0f} s).\n"
                f"Cause: {outage.reason}\n"
                f"{waiting} messages waited in the spool; none was lost or quarantined for it,"
                " and processing has resumed.\n"
            ),
            now=ended,
        )

    def retry_delay(self) -> float | None:
        """Seconds until the next probe during an outage; None when not paused."""
        if self.outage is None:
            return None
        return max(0.0, self._next_probe - time.monotonic())

    # Loops ---------------------------------------------------------------------------------

    def run_once_sync(self, stopping: Stopping | None = None) -> int:
        """Process everything waiting now; return how many entries were handled.

        With `stopping` set it returns after the current entry (graceful stop must not wait
        for a whole backlog); entries claimed but not processed go back in line. During an
        outage it returns at once (0) until a probe finds the infrastructure back.
        """
        done = 0
        try:
            if not self._ready():
                return done
            while True:
                entries = self.spool.claim(self.batch)
                if not entries:
                    if self.heartbeat is not None:
                        self.heartbeat("idle", None)
                    return done
                i = 0
                while i < len(entries):
                    if (stopping is not None and stopping.is_set()) or self.outage is not None:
                        self.spool.unclaim([e.id for e in entries[i:]])
                        return done
                    handled, taken = self.process_group(entries[i : i + self.tx_batch], stopping)
                    i += taken
                    done += handled
                    # Under sustained load the spool is never empty, so "batch done" must
                    # not wait for it: wake delivery and the escalator after every commit.
                    if handled and self.on_batch_committed is not None:
                        self.on_batch_committed()
        except Exception as exc:  # the spool itself (its disk) or a probe's own failure
            fault = classify_fault(exc)
            if fault is None:
                raise
            self._enter_outage(fault)
            return done

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    async def run(self, stopping: asyncio.Event) -> None:
        """Loop until `stopping` is set; the current item is always finished first."""
        loop = asyncio.get_running_loop()

        def committed() -> None:  # called in the worker thread
            if self.after_batch is not None:
                loop.call_soon_threadsafe(self.after_batch)

        self.on_batch_committed = committed
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
            # A timeout so that entries whose failure put them back in line are retried;
            # during an outage, the next probe (and mail arriving does not hurry it).
            delay = self.retry_delay()
            tasks = {stopper} if delay is not None else {waiter, stopper}
            await asyncio.wait(
                tasks, timeout=30 if delay is None else delay, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            stopper.cancel()


def _reserve(fault: Fault, entry: SpoolEntry | None) -> int:
    """After a disk fault, resume only when this much can be allocated: the message that
    hit the fault twice over (database row plus WAL) and at least `PROBE_BYTES`."""
    if fault.kind != "disk":
        return 0
    return max(PROBE_BYTES, 2 * len(entry.raw) if entry is not None else 0)


def _degraded_stage(reason: str) -> Stage:
    """A parse stage that reads the message in degraded form (see `parse.degraded`)."""

    def degraded_parse(ctx: Context) -> None:
        ctx.parsed = degraded(ctx.entry.raw, reason)
        ctx.sender = ctx.parsed.from_address or ctx.entry.envelope.mail_from.lower()
        ctx.event("degraded", reason)

    return degraded_parse
