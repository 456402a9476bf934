"""The pipeline in its own process, so SMTP ingest keeps a core to itself.

The pipeline is CPU-bound Python (parse, classify, thread, route, record, respond: tens of
milliseconds a message); in the daemon's process it shares the interpreter lock with the
SMTP event loop and halves ingest during a burst (docs/performance.md). Postfix keeps its
smtpd and cleanup apart for the same reason. The spool and the database are files and
transactions, so the child needs nothing from the parent but a control pipe carrying one
byte per signal: `w` the spool committed new mail, `r` read the rules again (the parent got
SIGHUP), `s` finish the current message and exit; end of file means the parent is gone.
A second pipe goes back: "I committed a batch" (new outbox rows: wake the delivery worker
and the escalator), carrying the batch's metric increments as JSON (gateway/metrics.py), so
`/metrics` counts what the child did without a shared-memory registry, and the earliest due
moment of any bundle item or sender re-check the batch created (`batch_word`), so that the
daemon wakes those workers only when they have something new to do soon. Pipes, not
multiprocessing Events: those are named semaphores, which
Python 3.11's resource tracker double-unregisters at exit with spawned children.

The child starts with the parent's rules in force (a broken edit on disk must not stop a
restarted child) and, like the parent, keeps them when a reload finds errors. It dies
with its parent (Linux `PR_SET_PDEATHSIG`), so after a crash of the daemon no orphan keeps
entries claimed while the restarted daemon recovers them; if the child dies on its own, the
parent recovers its claimed entries and starts a new one (`PipelineProcess.supervise`).

Supervision with limits (Mailman's master and its `max_restarts`; docs/decisions.md D10.6, where
a child crashing on a full disk was restarted every 2 s for ever): restarts back off
(`pipeline.restart_backoff` seconds, doubling, at most 60 s); more than
`pipeline.max_restarts` within `pipeline.restart_window` seconds and the child stays down,
the admins are alerted, and SMTP goes on accepting into the spool (nothing is lost; a restart
of the daemon after the fix processes the backlog). The child reports its state over the
notify pipe (`b` busy with an entry, `i` idle, `z` paused by an infrastructure fault, `1` a
batch committed); busy with no word for `pipeline.hang_timeout` seconds is a hang: the child
is killed and restarted like a crash. An infrastructure outage is a pause, not a crash: the
child stays up and probes (worker.py), so an outage never burns the restart budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from multiprocessing.connection import Connection
from threading import Event, Lock, Thread
from typing import TYPE_CHECKING, Any

from gateway.metrics import tally_from_wire
from gateway.sla.clocks import utc
from gateway.store.plan_marks import BUNDLE, EPOCH, RECHECK, earliest

if TYPE_CHECKING:  # the child imports these itself, after its logging is set up
    from gateway.pipeline.context import Services
    from gateway.pipeline.worker import PipelineWorker
    from gateway.routing.holder import RulesHolder

log = logging.getLogger("gateway.pipeline")

_PR_SET_PDEATHSIG = 1
#: Longest wait between two restarts of a crashing child.
MAX_RESTART_DELAY = 60.0


def restart_delay(
    recent: list[float], now: float, *, window: float, cap: int, backoff: float
) -> float | None:
    """Seconds to wait before the next restart, or None: the cap is reached, stay down.

    `recent` holds the monotonic times of earlier restarts; those older than `window` no
    longer count (a child that ran well for a while starts again from `backoff`).
    """
    live = [t for t in recent if now - t < window]
    if len(live) >= cap:
        return None
    return min(backoff * 2.0 ** len(live), MAX_RESTART_DELAY)


def hung(state: str, last_word: float, now: float, timeout: float) -> bool:
    """A child busy with one entry and silent for `timeout` seconds is hung."""
    return state == "busy" and now - last_word > timeout


def next_to_wake(states: list[str], turn: int) -> int:
    """Which of the pipeline processes (their last states) to wake for new mail: the first
    idle one from `turn` on, going round; none idle, the one at `turn`."""
    n = len(states)
    order = [k % n for k in range(turn, turn + n)]
    return next((k for k in order if states[k] == "idle"), order[0])


def batch_word(tally: list[list[Any]] | None, created: dict[str, datetime]) -> bytes:
    """The child's "batch committed" message: b"1" (nothing to add), the tally's wire form
    (a JSON list), or, when the batch created rows the daemon's timed workers act on, a JSON
    object {"tally": ..., "due": {kind: ISO moment}} (`gateway.store.plan_marks`)."""
    if created:
        due = {kind: moment.isoformat() for kind, moment in created.items()}
        return json.dumps({"tally": tally or [], "due": due}).encode()
    return json.dumps(tally).encode() if tally else b"1"


def read_batch_word(data: bytes) -> tuple[list[list[Any]] | None, dict[str, datetime]] | None:
    """`batch_word` read back: (tally wire form or None, due moments), or None when `data`
    is not a batch word (a state beat). A malformed part reads as absent, except that a
    malformed due moment reads as "due now" (a wake too many, never one missed)."""
    if data == b"1":
        return None, {}
    if data.startswith(b"["):
        try:
            return json.loads(data), {}
        except ValueError:
            return None, {}
    if data.startswith(b"{"):
        try:
            obj = json.loads(data)
        except ValueError:
            return None, {BUNDLE: EPOCH, RECHECK: EPOCH}
        created: dict[str, datetime] = {}
        for kind, text in dict(obj.get("due") or {}).items():
            try:
                moment = datetime.fromisoformat(str(text))
            except ValueError:
                moment = EPOCH
            created[str(kind)] = utc(moment) or EPOCH
        tally = obj.get("tally")
        return (tally if isinstance(tally, list) and tally else None), created
    return None


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _listen(control: Connection, wake: Event, reload: Event, stop: Event) -> None:
    """Child thread: turn control bytes into events; EOF (the parent died) means stop."""
    while True:
        try:
            data = control.recv_bytes()
        except (EOFError, OSError):
            data = b"s"
        if b"r" in data:
            reload.set()
        if b"s" in data:
            stop.set()
        wake.set()
        if stop.is_set():
            return


def _build_worker(
    config: dict[str, Any], rules_now: Any, worker_no: int
) -> tuple[PipelineWorker, RulesHolder, Services]:
    """The child's pipeline worker, its rules and services, from the parent's settings."""
    from gateway.clock import SystemClock
    from gateway.factories import build_resolver, build_spool
    from gateway.metrics import CountingResolver
    from gateway.pipeline.context import Services
    from gateway.pipeline.worker import PipelineWorker
    from gateway.routing.holder import RulesHolder
    from gateway.security.tokens import Signer
    from gateway.settings import Settings
    from gateway.store.db import open_database

    settings = Settings(**{k: v for k, v in config.items() if not k.startswith("_")})
    clock = SystemClock()
    engine = open_database(settings.storage.database_url, migrate=False)
    spool = build_spool(settings, clock, engine, worker=worker_no)
    rules = RulesHolder(settings.rules_path, initial=rules_now)
    resolver = build_resolver(settings)
    services = Services(
        settings=settings,
        clock=clock,
        signer=Signer(settings.secret()),
        rules=rules.current,
        resolver=resolver,
    )
    worker = PipelineWorker(engine=engine, spool=spool, services=services)
    if settings.pipeline.workers > 1:
        # Claim one transaction's worth at a time: a process that claimed a whole backlog
        # would hold it while its siblings, with nothing claimed, wait idle.
        worker.batch = worker.tx_batch
    if resolver is not None:
        services.resolver = CountingResolver(resolver, worker.tally)
    return worker, rules, services


def child_main(
    config: dict[str, Any],
    rules_now: Any,
    control: Connection,
    notify: Connection,
    parent: int,
) -> None:
    """Entry point of the pipeline process (spawned: a fresh interpreter)."""
    _die_with_parent()
    # The parent coordinates shutdown and reloads; a terminal's Ctrl-C or a stray SIGHUP
    # must not kill us mid-transaction.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from gateway.logs import setup_logging

    worker_no = int(config.get("_worker") or 0)
    setup_logging(
        fmt=str(config.get("log_format") or config.get("logging", {}).get("format") or "text"),
        level=str(config.get("logging", {}).get("level") or "INFO"),
        verbose=bool(config.get("_verbose")),
        tag=f"pipeline.p{worker_no}" if worker_no else "pipeline",
    )

    from gateway.metrics import tally_to_wire

    worker, rules, services = _build_worker(config, rules_now, worker_no)
    spool, engine = worker.spool, worker.engine
    beat = {"busy": b"b", "idle": b"i", "paused": b"z"}

    def heartbeat(state: str, entry_id: int | None) -> None:
        data = beat[state] + (str(entry_id).encode() if entry_id is not None else b"")
        with contextlib.suppress(OSError):
            notify.send_bytes(data)

    worker.heartbeat = heartbeat

    from gateway.store.plan_marks import take_created

    def ship() -> None:
        """Tell the parent "I committed", with the metric increments since the last word
        (a JSON list; b"1" when there are none) and, when the batch created bundle items or
        sender re-checks, the earliest due moment of each (a JSON object, `batch_word`)."""
        data = batch_word(tally_to_wire(worker.tally) if worker.tally else None, take_created())
        worker.tally.clear()
        with contextlib.suppress(OSError):
            notify.send_bytes(data)

    # After every commit (a group of at most `TX_BATCH` messages), not only when the spool
    # is empty, which under sustained load is never; the delivery worker and the escalator
    # would then wake only on their 60 s timeouts (docs/decisions.md D16.1). The parent drains
    # the pipe and wakes them once per read.
    worker.on_batch_committed = ship
    wake, reload, stop = Event(), Event(), Event()
    Thread(target=_listen, args=(control, wake, reload, stop), daemon=True).start()
    from gateway.heap import freeze_startup_heap
    from gateway.letters.language import warm_up as load_language_model

    # The language model (~80 MB, a few hundred thousand objects that live as long as the
    # process) is loaded now, not in the first message's time, and frozen with the rest of
    # the start-up heap: a full collection no longer walks it.
    load_language_model()
    freeze_startup_heap()  # gateway/heap.py: full collections skip the start-up heap
    try:
        while not stop.is_set() and os.getppid() == parent:
            if reload.is_set():
                reload.clear()
                rules.reload()
                services.rules = rules.current
            elif rules.reload_if_changed():
                services.rules = rules.current
            wake.clear()
            if worker.run_once_sync(stop) or worker.tally:
                ship()
            delay = worker.retry_delay()
            if delay is None:
                # Woken by the next commit; the timeout retries entries whose backoff ended.
                wake.wait(timeout=2.0)
            else:  # paused: the next probe; new mail does not hurry it
                stop.wait(timeout=delay)
    finally:
        spool.close()
        engine.dispose()


class PipelineProcess:
    """Parent side: start, wake, reload, supervise and stop the pipeline process."""

    def __init__(
        self,
        config: dict[str, Any],
        rules: Any,
        on_batch: Any,
        on_give_up: Callable[[str], None] | None = None,
        on_tally: Callable[[Counter[tuple[str, ...]]], None] | None = None,
        *,
        worker: int = 0,
        claimant: str | None = None,
    ) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self.config = {**config, "_worker": worker}
        self.worker = worker  # which of the node's pipeline processes (`pipeline.workers`)
        # The name its spool claims carry on a shared spool (gateway/node.py): what is
        # given back when it dies. None: the spool's own (a single pipeline process).
        self.claimant = claimant
        self.rules = rules  # callable: the rules in force now (handed to each new child)
        self.on_batch = on_batch
        self.on_give_up = on_give_up  # blocking (an alert); run in a thread
        self.on_tally = on_tally  # the child's metric increments, merged into the parent's
        self.proc: Any = None
        self._conn: Connection | None = None
        self._control: Connection | None = None
        self._send_lock = Lock()  # wake() comes from the spool's writer thread
        self.restarts = 0
        self.restart_times: list[float] = []  # monotonic
        self.state = "starting"  # busy | idle | paused, as the child last said
        self.current: int | None = None  # the spool entry it said it is busy with
        self.last_word = time.monotonic()
        self.down: str | None = None  # why it stays down after the restart cap
        p = config.get("pipeline", {})
        self.backoff = float(p.get("restart_backoff", 1.0))
        self.max_restarts = int(p.get("max_restarts", 5))
        self.window = float(p.get("restart_window", 300.0))
        self.hang_timeout = float(p.get("hang_timeout", 300.0))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        receiver, sender = self._mp.Pipe(duplex=False)
        control_in, control_out = self._mp.Pipe(duplex=False)
        self.proc = self._mp.Process(
            target=child_main,
            args=(self.config, self.rules(), control_in, sender, os.getpid()),
            name=f"support-gateway-pipeline.p{self.worker}"
            if self.worker
            else "support-gateway-pipeline",
            daemon=True,
        )
        self.proc.start()
        sender.close()
        control_in.close()
        self._conn = receiver
        self._control = control_out
        self.state = "starting"
        self.current = None
        self.last_word = time.monotonic()
        loop.add_reader(receiver.fileno(), self._on_notify)
        self.wake()  # whatever waits in the spool from before

    def _send(self, signal_byte: bytes) -> None:
        with self._send_lock:
            if self._control is not None:
                with contextlib.suppress(OSError):
                    self._control.send_bytes(signal_byte)

    def wake(self) -> None:
        """New mail is durable in the spool (called from the spool's writer thread)."""
        self._send(b"w")

    def _on_notify(self) -> None:
        assert self._conn is not None
        batch = False
        # The earliest due moment, per kind, of what the batches read here created: the
        # daemon wakes the bundle and re-check workers only for those (gateway/app.py).
        created: dict[str, datetime] = {}
        states = {b"b": "busy", b"i": "idle", b"z": "paused"}
        try:
            while self._conn.poll():
                data = self._conn.recv_bytes()
                self.last_word = time.monotonic()
                word = read_batch_word(data)
                if word is not None:
                    batch = True
                    tally, due = word
                    if tally and self.on_tally is not None:
                        with contextlib.suppress(ValueError, TypeError):
                            self.on_tally(tally_from_wire(tally))
                    for kind, moment in due.items():
                        earliest(created, kind, moment)
                elif data[:1] in states:
                    self.state = states[data[:1]]
                    self.current = int(data[1:]) if data[1:].isdigit() else None
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            return
        if batch:
            self.on_batch(created)

    def reload(self) -> None:
        self._send(b"r")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    async def supervise(
        self, stopping: asyncio.Event, recover: Callable[[int | None, str, str | None], Any]
    ) -> None:
        """Restart the child if it dies on its own (its claimed entries go back in line:
        `recover(culprit, reason, claimant)`), with backoff and a cap; kill and restart it
        when it hangs."""
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            if stopping.is_set():
                return
            now = time.monotonic()
            if self.alive:
                if hung(self.state, self.last_word, now, self.hang_timeout):
                    log.error(
                        "pipeline process busy without progress for %.0f s; killing it",
                        now - self.last_word,
                    )
                    self.proc.kill()
                    await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 10)
                else:
                    continue
            code = self.proc.exitcode if self.proc is not None else None
            self._close_conn()
            # The entry it was busy with pays the attempt (a message that kills the process
            # ends in the quarantine); the rest of its batch goes back in line for free.
            culprit = self.current if self.state == "busy" else None
            self.current = None
            await asyncio.to_thread(
                recover, culprit, f"the pipeline process died ({code})", self.claimant
            )
            delay = restart_delay(
                self.restart_times,
                now,
                window=self.window,
                cap=self.max_restarts,
                backoff=self.backoff,
            )
            if delay is None:
                self.down = (
                    f"the pipeline process exited ({code}) after {self.max_restarts} restarts"
                    f" within {self.window:.0f} s; it stays down"
                )
                log.critical("%s; mail is still accepted into the spool", self.down)
                if self.on_give_up is not None:
                    await asyncio.to_thread(self.on_give_up, self.down)
                    self.on_batch()  # a queued alert: wake the delivery worker
                return
            log.error(
                "pipeline process exited (%s); recovering and restarting it in %.1f s",
                code,
                delay,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)
            if stopping.is_set():
                return
            self.restarts += 1
            self.restart_times.append(time.monotonic())
            self.start()

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        with self._send_lock:
            if self._control is not None:
                self._control.close()
                self._control = None

    async def stop(self, timeout: float = 60.0) -> None:
        """Let the child finish its current message, then wait for it to exit."""
        self._send(b"s")
        if self.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.join, timeout)
            if self.proc.is_alive():
                log.error("pipeline process did not stop in %ss; killing it", timeout)
                self.proc.kill()
                self.proc.join()
        self._close_conn()
