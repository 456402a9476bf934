"""Composition root: builds settings, clock, database, spool, rules and workers, and runs them.

One place wires everything (ARCHITECTURE.md): no module-level singletons, no "am I under
test?" branches. Tests build a `Gateway` with a `FrozenClock` and a static DNS resolver and
run it on their own event loop; `serve` runs the same object until SIGTERM.

Graceful stop, in the uvicorn manner: stop listening, let in-flight DATA finish (bounded),
let each worker finish its current item, close the database and the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from sqlalchemy.engine import Engine, make_url

from gateway import alerts
from gateway.clock import Clock, SystemClock
from gateway.inbound.smtp import ConnectionLimits, InboundHandler, make_tls_context, start_server
from gateway.node import default_node_name
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline.context import Services
from gateway.pipeline.process import PipelineProcess
from gateway.pipeline.recheck import AuthRechecker
from gateway.pipeline.worker import PipelineWorker
from gateway.routing.holder import RulesHolder
from gateway.security.dns import Resolver, SystemResolver
from gateway.security.tokens import Signer
from gateway.settings import ConfigError, Settings
from gateway.sla.escalator import Escalator
from gateway.spool import Spool
from gateway.store.db import make_engine, open_database
from gateway.store.installation import check_fingerprint, require_configured_secret
from gateway.store.notify import ClusterNotifier

log = logging.getLogger("gateway")


def build_spool(
    settings: Settings, clock: Clock | None = None, engine: Engine | None = None
) -> Spool:
    """The spool: in the shared PostgreSQL database when one is configured (issue 13: no
    accepted message depends on one node's disk), else the local SQLite file."""
    url = make_url(settings.storage.database_url)
    if url.get_backend_name() == "postgresql" and settings.storage.shared_spool:
        from gateway.shared_spool import SharedSpool

        spool: Spool = SharedSpool(
            settings.spool_path,
            engine=engine or make_engine(settings.storage.database_url),
            node=settings.node.id or default_node_name(settings),
            max_attempts=settings.storage.max_attempts,
            min_free_disk=settings.smtp.min_free_disk,
            clock=clock,
        )
    else:
        spool = Spool(
            settings.spool_path,
            max_attempts=settings.storage.max_attempts,
            min_free_disk=settings.smtp.min_free_disk,
            clock=clock,
        )
    spool.open()
    return spool


def build_resolver(settings: Settings) -> Resolver | None:
    """The DNS resolver for sender checks, or None when `security.verify_senders` is off."""
    sec = settings.security
    if not sec.verify_senders:
        return None
    return SystemResolver(timeout=sec.dns_timeout, nameservers=sec.nameservers or None)


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
        self.engine = engine or open_database(settings.storage.database_url)
        # One installation, one key (issue 13 finding 6): checked before anything is built.
        try:
            require_configured_secret(settings, self.engine)
            self.signer = Signer(settings.secret())
            check_fingerprint(
                self.engine,
                self.signer.fingerprint(),
                settings.node.id or default_node_name(settings),
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
        self.delivery = DeliveryWorker(
            self.engine, settings, self.clock, signer=self.signer, rules=lambda: self.rules.current
        )
        # SLA escalation (FIELD-NOTES §7): sleeps until the next step is due, at most 60 s.
        self.escalator = Escalator(
            self.engine, settings, self.clock, lambda: self.rules.current, self.signer
        )
        self.escalator_wakeup = asyncio.Event()
        # Deferred acknowledgements and held staff replies whose sender check could not
        # complete (issue 10, docs/security.md).
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

        def after_batch() -> None:
            # New outbox rows (acknowledgements) go out as soon as their batch has committed,
            # and the escalator looks again (a new ticket or reply may move the next step).
            self.delivery.wakeup.set()
            self.escalator_wakeup.set()
            self.rechecker_wakeup.set()
            self.cluster.notify()
            self.cluster.notify_ticket()  # and the other nodes' escalators

        def after_fire() -> None:
            # Fired escalation steps queued mail: it leaves now (issue 11 finding 3).
            self.delivery.wakeup.set()
            self.cluster.notify()

        self.pipeline.after_batch = after_batch
        self.after_fire = after_fire
        self.rechecker.after_batch = after_fire  # a released acknowledgement leaves now
        self.handler: InboundHandler | None = None
        self.server: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.port: int | None = None
        self.pipeline_process: PipelineProcess | None = None

    # Rules ------------------------------------------------------------------------------

    def reload_rules(self) -> bool:
        ok = self.rules.reload()
        self.services.rules = self.rules.current
        if self.pipeline_process is not None:
            self.pipeline_process.reload()
        self.escalator_wakeup.set()  # ladders and deadlines may have changed
        return ok

    async def _watch_rules(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=2.0)
            if self.rules.reload_if_changed():
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

    def _recover_crashed(self, culprit: int | None, reason: str) -> None:
        """The pipeline child died (blocking): its entries back in line, the one it was busy
        with charged an attempt; if that was its last, the admins are told (worker.py)."""
        entry = self.spool.get(culprit) if culprit is not None else None
        state = self.spool.recover_crashed(culprit, reason)
        if entry is not None and state == "quarantined":
            self.pipeline.alert_quarantined(entry, reason)

    # Lifecycle --------------------------------------------------------------------------

    async def start(self, *, workers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        recovered = self.spool.recover()
        if recovered:
            log.warning("recovered %d spool entries claimed before a crash", recovered)

        # The pipeline runs in its own process (its own core) unless configured otherwise;
        # a clock cannot cross a process boundary, so with an injected clock it stays here.
        if workers and self.settings.pipeline.process and isinstance(self.clock, SystemClock):
            self.pipeline_process = PipelineProcess(
                self.settings.model_dump(),
                rules=lambda: self.rules.current,
                on_batch=self.pipeline.after_batch,
                on_give_up=self._pipeline_down,
            )
            self.pipeline_process.start()
            self.spool.on_commit = self.pipeline_process.wake
        else:

            def wake() -> None:
                loop.call_soon_threadsafe(self.pipeline.wakeup.set)

            self.spool.on_commit = wake
        self.spool.start_writer()
        s = self.settings.smtp
        self.handler = InboundHandler(
            spool=self.spool,
            domains=s.domains,
            hostname=s.hostname,
            clock=self.clock,
            max_recipients=s.max_recipients,
            max_messages_per_connection=s.max_messages_per_connection,
        )
        tls = make_tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        host, port = self.settings.listen
        self.server = await start_server(
            self.handler,
            host=host,
            port=port,
            hostname=s.hostname,
            receive_limit=s.receive_limit,
            limits=ConnectionLimits(s.max_connections, s.max_connections_per_ip),
            timeout=s.timeout,
            tls_context=tls,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if workers:
            if self.pipeline_process is not None:
                pipeline = self.pipeline_process.supervise(self.stopping, self._recover_crashed)
            else:
                pipeline = self.pipeline.run(self.stopping)
            self._tasks = [
                asyncio.create_task(pipeline, name="pipeline"),
                asyncio.create_task(self._watch_rules(), name="rules-watch"),
                asyncio.create_task(
                    self.delivery.run(self.stopping, self.delivery.wakeup), name="delivery"
                ),
                asyncio.create_task(
                    # Fired steps wake the delivery worker: their mail leaves now, not at its
                    # next poll up to 60 s later (issue 11 finding 3).
                    self.escalator.run(
                        self.stopping, self.escalator_wakeup, on_fired=self.after_fire
                    ),
                    name="escalator",
                ),
                asyncio.create_task(
                    self.rechecker.run(self.stopping, self.rechecker_wakeup), name="recheck"
                ),
                asyncio.create_task(self.cluster.run(self.stopping), name="cluster-notify"),
            ]
        log.info("listening on %s:%s for %s", host, self.port, ", ".join(s.domains))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.close()  # stop listening; open sessions go on
            if self.handler is not None and not self.handler.idle.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.handler.idle.wait(), drain_timeout)
            self.server.close_clients() if hasattr(self.server, "close_clients") else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        self.stopping.set()
        if self.pipeline_process is not None:
            await self.pipeline_process.stop()
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
        s.connect(addr)
        s.sendall(message.encode())


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the rules."""
    gw = Gateway(settings)
    await gw.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload_rules)
    sd_notify(f"READY=1\nSTATUS=listening on port {gw.port}")
    print(f"support-gateway listening on {settings.listen[0]}:{gw.port}", flush=True)
    await done.wait()
    sd_notify("STOPPING=1")
    log.info("stopping: finishing in-flight mail and current work")
    await gw.stop()
    return 0
