"""This node's identity: a stable name plus a boot id that is new at every start.

Several nodes may share one PostgreSQL (docs/scaling.md). Work a node claims (outbox rows)
carries its name and boot id, so that

- a node that restarts recognises rows its previous run claimed (same name, other boot id)
  and takes them back at once instead of waiting for a lease (docs/decisions.md D10.12);
- an operator sees which node holds what (`outbox list`, logs).

The name is `node.id` from the configuration, or, when that is empty, the host name plus a
short hash of the spool folder: stable across restarts, and distinct for two nodes on one
host (they need distinct spool folders anyway). Two running processes must never share a
name: each would take back the other's rows at start (the fencing token still keeps the
records right, but mail in flight could go out twice).

A node running several pipeline processes (`pipeline.workers`, PostgreSQL only) claims
spool entries under one name per process: the first under the node's name, the others
under the name plus ``.p1``, ``.p2`` ... (`pipeline_claimant`), so a process that dies gives
back only what it held. Those suffixes are the node's own: do not name another node so.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from dataclasses import dataclass

from gateway.settings import MAX_PIPELINE_WORKERS, Settings


@dataclass(frozen=True)
class NodeIdentity:
    """`name` survives restarts; `boot` is unique to this run of the process."""

    name: str
    boot: str

    def __str__(self) -> str:
        return f"{self.name}/{self.boot}"


def default_node_name(settings: Settings) -> str:
    spool = os.path.abspath(settings.storage.spool_dir)
    digest = hashlib.sha256(spool.encode()).hexdigest()[:8]
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{digest}"


def node_identity(settings: Settings, *, name: str | None = None) -> NodeIdentity:
    """A fresh identity for this run: the configured (or derived) name, a new boot id."""
    return NodeIdentity(
        name=name or node_name_for(settings),
        boot=uuid.uuid4().hex[:12],
    )


def node_name_for(settings: Settings) -> str:
    """`node.id`, else the derived name (host plus spool folder hash)."""
    return settings.node.id or default_node_name(settings)


def pipeline_claimant(node: str, worker: int) -> str:
    """The name pipeline process number `worker` (0-based) of `node` claims spool entries
    under: the node's own name for the first, ``<node>.p<N>`` for the others."""
    return node if worker == 0 else f"{node}.p{worker}"


def pipeline_claimants(node: str) -> list[str]:
    """Every name `node`'s pipeline processes may claim under (what a restart of the node
    takes back)."""
    return [pipeline_claimant(node, w) for w in range(MAX_PIPELINE_WORKERS)]
