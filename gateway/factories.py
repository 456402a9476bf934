"""What the daemon, the pipeline process and the CLI build alike from the settings.

The spool and the sender-check resolver are built the same way in the daemon
(`gateway.app`), in the pipeline's own process (`gateway.pipeline.process`) and by the
commands that read the spool (`gateway.cli`). Kept below all three, so the pipeline process
does not reach back into the daemon's composition root for them (docs/architecture.md).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from gateway.clock import Clock
from gateway.node import node_name_for, pipeline_claimant
from gateway.security.dns import Resolver, SystemResolver
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.store.db import make_engine

__all__ = ["build_resolver", "build_spool"]


def build_spool(
    settings: Settings,
    clock: Clock | None = None,
    engine: Engine | None = None,
    *,
    worker: int = 0,
) -> Spool:
    """The spool: in the shared PostgreSQL database when one is configured (no accepted
    message depends on one node's disk, docs/scaling.md), else the local SQLite file.
    `worker`: which of the node's pipeline processes claims through it (gateway/node.py)."""
    if settings.shared_spool:
        from gateway.shared_spool import SharedSpool

        spool: Spool = SharedSpool(
            settings.spool_path,
            engine=engine or make_engine(settings.storage.database_url),
            node=pipeline_claimant(node_name_for(settings), worker),
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
