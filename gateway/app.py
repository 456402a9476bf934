"""Composition root: builds settings, clock, database, spool, rules and workers, and runs them.

One place wires everything (docs/architecture.md): no module-level singletons, no "am I under
test?" branches. Tests build a `Gateway` with a `FrozenClock` and a static DNS resolver and
run it on their own event loop; `serve` runs the same object until SIGTERM.

Graceful stop, in the uvicorn manner: stop listening, let in-flight DATA finish (bounded),
let each worker finish its current item, close the database and the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine, make_url

import gateway
from gateway import alerts
from gateway.clock import Clock, SystemClock
from gateway.escalation.escalator import Escalator
from gateway.factories import build_resolver, build_spool
from gateway.heap import freeze_startup_heap
from gateway.http import AdminHttp
from gateway.inbound.smtp import ConnectionLimits, InboundHandler, make_tls_context, start_server
from gateway.letters.brands import brand_domains
from gateway.metrics import CountingResolver, StateCollector, build_registry, node_name
from gateway.node import node_name_for, pipeline_claimant
from gateway.outbound.brandkeys import check_brand_keys
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline.bundle import BundleWorker
from gateway.pipeline.context import Services
from gateway.pipeline.process import PipelineProcess, next_to_wake
from gateway.pipeline.recheck import AuthRechecker
from gateway.pipeline.worker import PipelineWorker
from gateway.routing.holder import RulesHolder
from gateway.security.dns import Resolver
from gateway.security.tokens import Signer
from gateway.settings import ConfigError, Settings
from gateway.store.db import open_database, session_scope
from gateway.store.installation import check_fingerprint, require_configured_secret
from gateway.store.notify import ClusterNotifier
from gateway.store.plan_marks import BUNDLE, RECHECK

log = logging.getLogger("gateway")

#: Seconds between junk-expiry passes (the daemon's own; `junk expire` runs one now).
JUNK_EXPIRY_INTERVAL = 3600.0


class ListenError(Exception):
    """A configured listen address cannot be bound; the message names the key (exit 1)."""


def _bind_error(key: str, value: str, exc: OSError) -> ListenError:
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use (another support-gateway, or an MTA, listens there)"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no such address on this host"
    elif isinstance(exc, socket.gaierror):
        why = f"cannot resolve the host ({exc.strerror or exc})"
    else:
        why = exc.strerror or str(exc)
    return ListenError(f"{key} = {value!r}: cannot listen: {why}")


class Gateway:
    """The daemon: SMTP listener, spool, pipeline worker, rules."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        resolver: Resolver | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        rules_path = settings.rules_path
        if not rules_path.is_dir():
            raise ConfigError(
                f"rules_dir = {str(rules_path)!r}: no such folder (the repository ships an"
                " example in rules/; set rules_dir or GATEWAY_RULES_DIR)"
            )
        self.rules = RulesHolder(rules_path)
        # A brand whose DKIM key cannot be read stops start-up, like `rules check`.
        brand_keys = check_brand_keys(self.rules.current)
        if brand_keys:
            raise ConfigError("\n".join(brand_keys))
        # The secret first: a weak one stops start-up before anything is created. With
        # PostgreSQL and no key configured, none is generated either (checked below: a key
        # of this node's own would not verify on the others).
        sec = settings.security
        url = engine.url if engine is not None else make_url(settings.storage.database_url)
        if sec.secret_key or sec.secret_key_file or url.get_backend_name() != "postgresql":
            self.signer = Signer(settings.secret())
        self.engine = engine or open_database(settings.storage.database_url)
        # One installation, one key (docs/decisions.md D13.6): checked before anything is built.
        try:
            require_configured_secret(settings, self.engine)
            self.signer = Signer(settings.secret())
            check_fingerprint(
                self.engine,
                self.signer.fingerprint(),
                node_name_for(settings),
            )
        except ConfigError:
            if engine is None:
                self.engine.dispose()
            raise
        self.spool = build_spool(settings, self.clock, self.engine)
        self.resolver = resolver if resolver is not None else build_resolver(settings)
        self.services = Services(
            settings=settings,
            clock=self.clock,
            signer=self.signer,
            rules=self.rules.current,
            resolver=self.resolver,
        )
        self.pipeline = PipelineWorker(engine=self.engine, spool=self.spool, services=self.services)
        if self.resolver is not None:
            # Count DNS timeouts/SERVFAILs for /metrics (the stages see the same answers).
            self.services.resolver = CountingResolver(self.resolver, self.pipeline.tally)
        self.delivery = DeliveryWorker(
            self.engine, settings, self.clock, signer=self.signer, rules=lambda: self.rules.current
        )
        # SLA escalation (docs/design.md §7): sleeps until the next step is due, at most 60 s.
        self.escalator = Escalator(
            self.engine, settings, self.clock, lambda: self.rules.current, self.signer
        )
        self.escalator_wakeup = asyncio.Event()
        # Deferred acknowledgements and held staff replies whose sender check could not
        # complete (docs/decisions.md D10, docs/security.md).
        self.rechecker = AuthRechecker(self.engine, self.services)
        self.rechecker_wakeup = asyncio.Event()
        # Other nodes on the same PostgreSQL hear about our new outbox rows (LISTEN/NOTIFY;
        # a no-op on SQLite), and theirs wake our delivery worker.
        self.cluster = ClusterNotifier(
            self.engine,
            self.delivery.node.name,
            self.delivery.wakeup.set,
            on_ticket=self.escalator_wakeup.set,
        )
        # Bundled acknowledgements and owner notifications (docs/decisions.md D12), sent when a
        # customer's outbound.ack_window closes.
        self.bundler = BundleWorker(self.engine, self.services)
        self.bundler_wakeup = asyncio.Event()

        def after_fire() -> None:
            # Fired escalation steps queued mail: it leaves now (docs/decisions.md D11.3).
            self.delivery.wakeup.set()
            self.cluster.notify()

        self.pipeline.after_batch = self.after_batch
        self.after_fire = after_fire
        self.rechecker.after_batch = after_fire  # a released acknowledgement leaves now
        self.bundler.after_batch = after_fire  # a bundled acknowledgement too
        self.handler: InboundHandler | None = None
        self.server: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.port: int | None = None
        # The pipeline's own processes (`pipeline.workers` of them; none when it runs in a
        # thread of this process).
        self.pipeline_processes: list[PipelineProcess] = []
        self._wake_turn = 0  # the pipeline process to wake next (`_wake_pipeline_processes`)
        # Metrics and health (docs/decisions.md D14): the pipeline child's tallies arrive over its
        # pipe.
        self.started_at = time.time()
        self.child_tally: Counter[tuple[str, ...]] = Counter()
        self.node = settings.smtp.hostname or node_name()
        self.collector = StateCollector(
            tally=self.tally,
            engine=self.engine,
            spool_conn=self._spool_reader,
            rules=self.rules,
            node=self.node,
            now=self.clock.now,
        )
        self.registry = build_registry(self.collector)
        self.http: AdminHttp | None = None
        self.http_port: int | None = None

    def after_batch(self, created: Mapping[str, datetime] | None = None) -> None:
        """A pipeline batch has committed (on the event loop)."""
        # New outbox rows (acknowledgements) go out as soon as their batch has committed,
        # and the escalator looks again (a new ticket or reply may move the next step).
        self.delivery.wakeup.set()
        self.escalator_wakeup.set()
        # The bundle and re-check workers sleep until their next due row: they are woken
        # only for a new row due before then. `created` (from the pipeline process) has
        # the batch's earliest new due moments; None (the pipeline in a thread of this
        # process, or a supervisor's word) does not say, so both look again.
        for looks, wakeup, kind in (
            (self.rechecker.looks, self.rechecker_wakeup, RECHECK),
            (self.bundler.looks, self.bundler_wakeup, BUNDLE),
        ):
            due = None if created is None else created.get(kind)
            if created is None or (due is not None and looks.wake_for(due)):
                wakeup.set()
        self.cluster.notify()
        self.cluster.notify_ticket()  # and the other nodes' escalators

    # Metrics and health -----------------------------------------------------------------

    def tally(self) -> Counter[tuple[str, ...]]:
        """Every in-memory metric tally of this daemon (and its pipeline process)."""
        total: Counter[tuple[str, ...]] = Counter()
        for part in (
            self.handler.tally if self.handler is not None else None,
            self.pipeline.tally,
            self.delivery.tally,
            self.child_tally,
        ):
            if part:
                total.update(part)
        return total

    def _spool_reader(self) -> Any:
        """A read-only connection per scrape (the spool's own belongs to its writer)."""
        import sqlite3

        return sqlite3.connect(f"file:{self.spool.path}?mode=ro", uri=True, timeout=5)

    def readiness(self) -> dict[str, str]:
        """Check name -> "" when fine, else the problem (blocking: call in a thread)."""
        from gateway.status import check_database, check_spool

        listening = self.server is not None and self.server.is_serving()
        return {
            "smtp": "" if listening else "not listening",
            "database": check_database(self.engine),
            "spool": check_spool(self.spool.directory, self.settings.smtp.min_free_disk),
        }

    async def _ready(self) -> dict[str, str]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.readiness), 5.0)
        except TimeoutError:
            return {"database": "no answer within 5 s"}

    def daemon_status(self) -> dict[str, Any]:
        """What only the running daemon knows, for `support-gateway status` (/status)."""
        return {
            "running": True,
            "pid": os.getpid(),
            "version": gateway.__version__,
            "node": self.node,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "rules_loaded_at": datetime.fromtimestamp(self.rules.loaded_at, UTC).isoformat(),
            "rules_reloads": {"ok": self.rules.reloads, "failed": self.rules.failed_reloads},
            "rules_last_error": self.rules.last_error,
            "smtp_port": self.port,
            "pipeline_process": None
            if not self.pipeline_processes
            else {
                "alive": all(p.alive for p in self.pipeline_processes),
                "restarts": sum(p.restarts for p in self.pipeline_processes),
                "workers": len(self.pipeline_processes),
            },
        }

    @property
    def pipeline_process(self) -> PipelineProcess | None:
        """The first pipeline process (the only one unless `pipeline.workers` > 1)."""
        return self.pipeline_processes[0] if self.pipeline_processes else None

    # Rules ------------------------------------------------------------------------------

    def reload_rules(self) -> bool:
        ok = self.rules.reload()
        self._rules_reloaded()
        return ok

    async def reload_rules_off_loop(self) -> bool:
        """`reload_rules` with the reading (TOML, holiday calendars) in a worker thread: a
        reload must not stall the SMTP event loop."""
        ok = await asyncio.to_thread(self.rules.reload)
        self._rules_reloaded()
        return ok

    def _rules_reloaded(self) -> None:
        self.services.rules = self.rules.current
        if self.handler is not None:
            self.handler.domains |= brand_domains(self.rules.current)  # a new brand's domain
        for proc in self.pipeline_processes:
            proc.reload()
        self.escalator_wakeup.set()  # ladders and deadlines may have changed

    async def _expire_junk(self) -> None:
        """Junk older than `junk.expire_days` loses its raw message, hourly (and whenever new
        junk arrives, gateway/pipeline/junk.py), so expiry does not wait for more spam."""
        from gateway.pipeline.junk import expire_junk

        def once() -> int:
            with session_scope(self.engine) as s:
                return expire_junk(s, self.clock.now(), self.settings.junk.expire_days)

        while not self.stopping.is_set():
            try:
                n = await asyncio.to_thread(once)
                if n:
                    log.info("expired %d junk item(s)", n)
            except Exception:  # the database may be away: the next hour tries again
                log.warning("junk expiry failed", exc_info=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=JUNK_EXPIRY_INTERVAL)

    async def _watch_rules(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=2.0)
            # Reading the rules (TOML, holiday calendars) happens off the event loop.
            if await asyncio.to_thread(self.rules.reload_if_changed):
                self.services.rules = self.rules.current
                self.escalator_wakeup.set()

    def _pipeline_down(self, why: str) -> None:
        """The pipeline child crashed past its restart cap: tell the admins (blocking)."""
        alerts.send_alert(
            self.engine,
            self.settings,
            self.signer,
            to=alerts.recipients(self.settings, self.rules.current),
            subject="pipeline stopped: mail is being spooled, not processed",
            body=(
                f"{why}.\nIncoming mail is still accepted and kept in the spool"
                f" ({self.settings.spool_path}); nothing is processed (no tickets, no"
                " acknowledgements) until the cause is fixed and the daemon restarted."
                " The log of the pipeline process says why it exited.\n"
            ),
            now=self.clock.now(),
        )

    def _recover_crashed(self, culprit: int | None, reason: str, claimant: str | None) -> None:
        """A pipeline child died (blocking): its entries back in line, the one it was busy
        with charged an attempt; if that was its last, the admins are told (worker.py)."""
        entry = self.spool.get(culprit) if culprit is not None else None
        state = self.spool.recover_crashed(culprit, reason, claimant)
        if entry is not None and state == "quarantined":
            self.pipeline.alert_quarantined(entry, reason)

    def _wake_pipeline_processes(self) -> None:
        """New mail is durable (the spool's writer thread): one pipeline process looks, the
        next idle one in turn (by what each last said), else simply the next in turn.

        Waking every process made all but the one that got the mail run a claim that came
        back empty, a statement each per spool commit (most of the claims at low rates,
        docs/performance.md §10). One is enough: a busy process claims again after the
        batch in hand (its loop ends only on an empty claim), and under load the commits
        come often enough to keep every process busy in turn. The state read here may be a
        moment old; a process woken when it is busy loses nothing, one left asleep when it
        has just gone idle leaves the mail to the busy one's next claim."""
        procs = self.pipeline_processes
        if procs:
            chosen = next_to_wake([p.state for p in procs], self._wake_turn)
            self._wake_turn = chosen + 1
            procs[chosen].wake()

    async def _supervise_pipeline_processes(self) -> None:
        await asyncio.gather(
            *(p.supervise(self.stopping, self._recover_crashed) for p in self.pipeline_processes)
        )

    async def _stop_pipeline_processes(self) -> None:
        """Each finishes its current message, all at once (a stop waits for the slowest)."""
        await asyncio.gather(*(p.stop() for p in self.pipeline_processes))

    # Lifecycle --------------------------------------------------------------------------

    async def start(self, *, workers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        recovered = await asyncio.to_thread(self.spool.recover)  # may wait on a busy spool
        if recovered:
            log.warning("recovered %d spool entries claimed before a crash", recovered)

        # The pipeline runs in its own process (its own core) unless configured otherwise;
        # a clock cannot cross a process boundary, so with an injected clock it stays here.
        # The process is started once both ports are bound: a port in use fails the start at
        # once, before a child is spawned.
        if workers and self.settings.pipeline.process and isinstance(self.clock, SystemClock):
            config = {
                **self.settings.model_dump(),
                "_verbose": logging.getLogger().isEnabledFor(logging.DEBUG),
            }
            node = node_name_for(self.settings)
            self.pipeline_processes = [
                PipelineProcess(
                    config,
                    rules=lambda: self.rules.current,
                    on_batch=self.pipeline.after_batch,
                    on_give_up=self._pipeline_down,
                    on_tally=self.child_tally.update,
                    worker=n,
                    claimant=pipeline_claimant(node, n) if self.settings.shared_spool else None,
                )
                for n in range(self.settings.pipeline.workers)
            ]
            self.spool.on_commit = self._wake_pipeline_processes
        else:

            def wake() -> None:
                loop.call_soon_threadsafe(self.pipeline.wakeup.set)

            self.spool.on_commit = wake
        self.spool.start_writer()
        server = await self._bind()
        for proc in self.pipeline_processes:
            proc.start()
        await server.start_serving()
        if self.http is not None and self.http.server is not None:
            await self.http.server.start_serving()
        if workers:
            if self.pipeline_processes:
                pipeline = self._supervise_pipeline_processes()
            else:
                pipeline = self.pipeline.run(self.stopping)
            self._tasks = [
                asyncio.create_task(pipeline, name="pipeline"),
                asyncio.create_task(self._watch_rules(), name="rules-watch"),
                asyncio.create_task(self._expire_junk(), name="junk-expiry"),
                asyncio.create_task(
                    self.delivery.run(self.stopping, self.delivery.wakeup), name="delivery"
                ),
                asyncio.create_task(
                    # Fired steps wake the delivery worker: their mail leaves now, not at its
                    # next poll up to 60 s later (docs/decisions.md D11.3).
                    self.escalator.run(
                        self.stopping, self.escalator_wakeup, on_fired=self.after_fire
                    ),
                    name="escalator",
                ),
                asyncio.create_task(
                    self.rechecker.run(self.stopping, self.rechecker_wakeup), name="recheck"
                ),
                asyncio.create_task(self.cluster.run(self.stopping), name="cluster-notify"),
                asyncio.create_task(
                    self.bundler.run(self.stopping, self.bundler_wakeup), name="bundle"
                ),
            ]
        host = self.settings.listen[0]
        domains = ", ".join(self.settings.smtp.domains)
        log.info("listening on %s:%s for %s", host, self.port, domains)

    async def _bind(self) -> asyncio.Server:
        """Bind the SMTP port and the admin HTTP port without accepting yet; a port that
        cannot be bound undoes the start and raises ListenError naming its key."""
        s = self.settings.smtp
        self.handler = InboundHandler(
            spool=self.spool,
            # Mail to a brand's address (and replies to its tokens) is ours too (docs/decisions.md
            # D17).
            domains=[*s.domains, *sorted(brand_domains(self.rules.current))],
            hostname=s.hostname,
            clock=self.clock,
            max_recipients=s.max_recipients,
            max_messages_per_connection=s.max_messages_per_connection,
            inflight_budget=s.inflight_budget,
        )
        tls = make_tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        host, port = self.settings.listen
        try:
            self.server = await start_server(
                self.handler,
                host=host,
                port=port,
                hostname=s.hostname,
                receive_limit=s.receive_limit,
                limits=ConnectionLimits(s.max_connections, s.max_connections_per_ip),
                timeout=s.timeout,
                tls_context=tls,
                max_session_time=s.max_session_time,
                max_idle_commands=s.max_idle_commands,
                start_serving=False,
            )
        except OSError as exc:
            await self._abort_start()
            raise _bind_error("smtp.listen", s.listen, exc) from None
        self.port = self.server.sockets[0].getsockname()[1]
        http_addr = self.settings.http_listen
        if http_addr is not None:
            self.http = AdminHttp(
                registry=self.registry, ready=self._ready, status=self.daemon_status
            )
            try:
                await self.http.start(*http_addr, start_serving=False)
            except OSError as exc:
                self.server.close()
                await self._abort_start()
                raise _bind_error("http.listen", self.settings.http.listen, exc) from None
            self.http_port = self.http.port
            log.info("metrics and health on http://%s:%s/metrics", http_addr[0], self.http_port)
        return self.server

    async def _abort_start(self) -> None:
        """A listener could not bind: undo what start() began, then the caller raises."""
        self.stopping.set()
        await self._stop_pipeline_processes()
        self.pipeline_processes = []
        self.spool.close()
        self.engine.dispose()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            self.server.close()  # stop listening; open sessions go on
            if self.handler is not None and not self.handler.idle.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.handler.idle.wait(), drain_timeout)
            self.server.close_clients() if hasattr(self.server, "close_clients") else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        self.stopping.set()
        await self._stop_pipeline_processes()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.spool.close()
        self.engine.dispose()
        close = getattr(self.resolver, "close", None)
        if callable(close):
            await asyncio.to_thread(close)  # the DNS breaker's probe thread, if one runs

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def sd_notify(message: str) -> None:
    """systemd readiness/status (Type=notify), a few lines of socket code, no dependency."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        # Never block the event loop on a reader that is slow or gone (a full socket buffer
        # would stall every SMTP session); a lost ping is retried at the next interval.
        s.setblocking(False)
        s.connect(addr)
        s.sendall(message.encode())


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)),
    or None when systemd asked for none (or asked another process, $WATCHDOG_PID)."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


async def _watchdog(interval: float, done: asyncio.Event) -> None:
    # From the event loop itself: a loop that hangs stops the pings and systemd restarts
    # the service (WatchdogSec= in systemd/support-gateway.service).
    while not done.is_set():
        sd_notify("WATCHDOG=1")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), interval)


async def _reload(gw: Gateway) -> None:
    # sd_notify(3): RELOADING=1 with the CLOCK_MONOTONIC time, then READY=1 once done, so
    # `systemctl reload` returns when the new rules are in force (or refused).
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    ok = await gw.reload_rules_off_loop()
    sd_notify(
        f"READY=1\nSTATUS=listening on port {gw.port}; rules reload {'ok' if ok else 'FAILED'}"
    )


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the rules."""
    # Everything the daemon writes (spool, database, keys, streamed DATA) holds customers'
    # mail or secrets: private whatever umask the admin's shell had (systemd's UMask= does
    # the same; outside systemd nothing did).
    os.umask(0o077)
    gw = Gateway(settings)
    gw.delivery.warm_up()  # the first signature's imports and key set-up, not under load
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # Before start(): a signal that arrives while it runs, or right after "listening on" is
    # logged, is handled once the loop is free, never by the default action (SIGHUP kills).
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    reloads: set[asyncio.Task[None]] = set()  # referenced until done

    def on_sighup() -> None:
        task = loop.create_task(_reload(gw), name="rules-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await gw.start()
    freeze_startup_heap()  # full collections no longer walk it: no 100+ ms loop stalls
    sd_notify(f"READY=1\nSTATUS=listening on port {gw.port}")
    interval = watchdog_interval()
    # Pings go on while stopping: draining may take up to TimeoutStopSec.
    stopped = asyncio.Event()
    watchdog = asyncio.create_task(_watchdog(interval, stopped)) if interval else None
    print(f"support-gateway listening on {settings.listen[0]}:{gw.port}", flush=True)
    if gw.http_port is not None and settings.http_listen is not None:
        print(
            f"support-gateway metrics on http://{settings.http_listen[0]}:{gw.http_port}/metrics",
            flush=True,
        )
    await done.wait()
    sd_notify("STOPPING=1")
    log.info("stopping: finishing in-flight mail and current work")
    await gw.stop()
    stopped.set()
    if watchdog is not None:
        await watchdog
    return 0
