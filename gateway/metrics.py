"""Prometheus metrics: event tallies kept in memory, state read from the stores at scrape time.

Two kinds of figures, two sources (docs/decisions.md D14):

- Things that happen inside this process and leave no row behind (an SMTP `250`, a `452`,
  a rules reload, a DNS timeout) are tallied in a `Tally` (a `collections.Counter` keyed by
  metric name and label values). The pipeline child process keeps its own tally and sends
  the increments back over its existing notify pipe after each batch
  (`gateway/pipeline/process.py`), so counts survive the process boundary without shared
  memory or a multiprocess registry directory.
- Everything the stores already know (spool depth, quarantine, outbox by state, open
  tickets by queue and owner, acknowledgements sent and suppressed, breaches, escalation
  steps, delivery failures) is read by `StateCollector` when Prometheus scrapes, with
  GROUP BY queries (cheap at 100k open tickets). Counters derived from the append-only
  `event` table are read incrementally (only rows with a higher id than last time), so a
  scrape never rescans history and the figures are the same whichever node or process did
  the work.

Each `Gateway` owns its own `CollectorRegistry` (never the global default), so tests running
several gateways in one interpreter do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.engine import Engine

import gateway
from gateway.store.db import read_only

log = logging.getLogger("gateway.metrics")

PREFIX = "support_gateway_"

#: Tally keys are (metric name without prefix and `_total`, *label values); the label
#: names of each in-memory counter are fixed here.
TALLY_LABELS: dict[str, tuple[str, ...]] = {
    "smtp_messages_accepted": (),
    "smtp_messages_deferred": ("code",),
    "pipeline_processed": (),
    "pipeline_failed": (),
    "pipeline_quarantined": (),
    "deliveries": ("outcome",),
    "relay_connections": ("how",),
    "dns_errors": (),
    "database_errors": (),
}

TALLY_HELP: dict[str, str] = {
    "smtp_messages_accepted": "Messages answered 250 after the spool commit (SMTP).",
    "smtp_messages_deferred": "Temporary refusals (4xx) by reply code: connections, MAIL, DATA.",
    "pipeline_processed": "Spool entries processed and committed to the ticket database.",
    "pipeline_failed": "Processing attempts that failed (retried, then quarantined).",
    "pipeline_quarantined": "Spool entries moved to the quarantine after max_attempts.",
    "deliveries": "Outbound delivery attempts by outcome (sent, temporary, permanent).",
    "relay_connections": "Connections a delivery used: opened for it, or reused (kept).",
    "dns_errors": "DNS lookups that failed temporarily (timeout, SERVFAIL) in sender checks.",
    "database_errors": "Operations that failed because the database was unavailable.",
}

Tally = Counter  # Counter[tuple[str, ...]]: (name, *label values) -> count


def tally_to_wire(t: Counter[tuple[str, ...]]) -> list[list[Any]]:
    """Serialisable form of a tally (for the pipeline process's notify pipe)."""
    return [[list(k), v] for k, v in t.items() if v]


def tally_from_wire(data: Iterable[list[Any]]) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for key, n in data:
        if isinstance(key, list) and key and key[0] in TALLY_LABELS:
            out[tuple(str(x) for x in key)] += int(n)
    return out


def is_database_error(exc: BaseException) -> bool:
    """True for the database being away (not for a bug in a stage)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError)


class CountingResolver:
    """Wraps a DNS resolver and tallies temporary failures (`DnsTempError`)."""

    def __init__(self, inner: Any, tally: Counter[tuple[str, ...]]) -> None:
        self.inner = inner
        self.tally = tally

    def query(self, name: str, rtype: str) -> list[str]:
        from gateway.security.dns import DnsTempError

        try:
            result: list[str] = self.inner.query(name, rtype)
            return result
        except DnsTempError:
            self.tally[("dns_errors",)] += 1
            raise

    def __getattr__(self, item: str) -> Any:  # StaticResolver.add etc. in tests
        return getattr(self.inner, item)


def ack_suppression_reason(detail: str) -> str:
    """A bounded label for an `ack-suppressed` event's free-text detail (respond.py)."""
    d = detail.lower()
    if d.startswith("no ticket opened"):
        return "robot"
    if d.startswith("route "):
        return "route"
    if d.startswith("sender likely forged"):
        return "forged"
    if "already acknowledged" in d:
        return "already_acknowledged"
    if d.startswith("no envelope sender"):
        return "null_sender"
    if "one of our own addresses" in d:
        return "own_address"
    if d.startswith("daily cap"):
        return "daily_cap"
    if "no first-response deadline" in d:
        return "no_deadline"
    if ":" in d.split(" ", 1)[0]:  # "<verdict kind>: reasons" (auto_reply, bulk, bounce...)
        return "robot"
    return "other"


#: event.type -> (metric, label name or None); see respond.py, escalator.py, outbound/worker.py
EVENT_COUNTERS: dict[str, tuple[str, str | None]] = {
    "ack-sent": ("acks_sent", None),
    "ack-suppressed": ("acks_suppressed", "reason"),
    "breach": ("sla_breaches", None),
    "sla-warning": ("sla_warnings", None),
    "escalated": ("escalation_steps", None),
    "delivery-deferred": ("delivery_failures", "kind"),
    "delivery-failed": ("delivery_failures", "kind"),
    "delivery-given-up": ("delivery_failures", "kind"),
}
EVENT_HELP = {
    "acks_sent": "Acknowledgements queued to customers (from the event log).",
    "acks_suppressed": "New tickets that got no acknowledgement, by reason.",
    "sla_breaches": "SLA deadlines missed (breach events).",
    "sla_warnings": "Warnings sent before an SLA deadline.",
    "escalation_steps": "Escalation ladder steps fired.",
    "delivery_failures": "Failed delivery attempts: temporary (deferred), permanent, given_up.",
}
_DELIVERY_KIND = {
    "delivery-deferred": "temporary",
    "delivery-failed": "permanent",
    "delivery-given-up": "given_up",
}


class EventCounts:
    """Cumulative counts of selected event types, read incrementally by event id."""

    def __init__(self) -> None:
        self.last_id = 0
        self.counts: Counter[tuple[str, str]] = Counter()  # (metric, label value)

    def update(self, conn: Any) -> None:
        types = list(EVENT_COUNTERS)
        placeholders = ", ".join(f":t{i}" for i in range(len(types)))
        params: dict[str, Any] = {f"t{i}": t for i, t in enumerate(types)}
        params["last"] = self.last_id
        # substr: the reason is in the first words; grouping on a prefix keeps the result
        # small even though details carry addresses.
        rows = conn.execute(
            text(
                "SELECT type, substr(detail, 1, 40), count(*), max(id) FROM event"  # noqa: S608 (placeholders are ':tN' names, the values are bound)
                f" WHERE id > :last AND type IN ({placeholders})"
                " GROUP BY type, substr(detail, 1, 40)"
            ),
            params,
        ).all()
        top = conn.execute(text("SELECT max(id) FROM event")).scalar() or 0
        for etype, detail, n, _ in rows:
            metric, label = EVENT_COUNTERS[etype]
            value = ""
            if label == "reason":
                value = ack_suppression_reason(detail or "")
            elif label == "kind":
                value = _DELIVERY_KIND[etype]
            self.counts[(metric, value)] += int(n)
        self.last_id = max(self.last_id, int(top))


def _age_seconds(iso: str | None, now: datetime) -> float:
    if not iso:
        return 0.0
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return 0.0
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (now - at).total_seconds())


def spool_facts(conn: Any, now: datetime) -> dict[str, Any]:
    """Spool counts by state and the age of the oldest entry waiting (sqlite3 connection)."""
    by_state = {
        r[0]: r[1] for r in conn.execute("SELECT state, count(*) FROM spool GROUP BY state")
    }
    oldest = conn.execute(
        "SELECT min(received_at) FROM spool WHERE state IN ('pending', 'claimed')"
    ).fetchone()[0]
    oldest_q = conn.execute(
        "SELECT min(quarantined_at) FROM spool WHERE state='quarantined'"
    ).fetchone()[0]
    return {
        "pending": by_state.get("pending", 0),
        "processing": by_state.get("claimed", 0),
        "quarantined": by_state.get("quarantined", 0),
        "oldest_received_at": oldest,
        "oldest_age_seconds": _age_seconds(oldest, now),
        "oldest_quarantined_at": oldest_q,
    }


def db_facts(conn: Any, now: datetime) -> dict[str, Any]:
    """Outbox by state and kind, open tickets by status, queue and owner, overdue count."""
    outbox = [
        {"state": s, "kind": k, "count": int(n)}
        for s, k, n in conn.execute(
            text("SELECT state, kind, count(*) FROM outbox GROUP BY state, kind")
        ).all()
    ]
    oldest_queued = conn.execute(
        text("SELECT min(created_at) FROM outbox WHERE state IN ('queued', 'sending')")
    ).scalar()
    tickets = [
        {"status": st, "queue": q or "", "owner": o or "", "count": int(n)}
        for st, q, o, n in conn.execute(
            text(
                "SELECT status, queue, owner, count(*) FROM ticket WHERE status != 'closed'"
                " GROUP BY status, queue, owner"
            )
        ).all()
    ]
    # Overdue: the first response or the resolution is late on a ticket not waiting on
    # the customer (a waiting ticket's clock is paused, docs/escalation.md).
    overdue = conn.execute(
        text(
            "SELECT count(*) FROM ticket WHERE status = 'open' AND ("
            "(first_responded_at IS NULL AND first_response_due < :now)"
            " OR resolution_due < :now)"
        ),
        {"now": now.replace(tzinfo=None) if conn.dialect.name == "sqlite" else now},
    ).scalar()
    if isinstance(oldest_queued, str):
        oldest_queued = datetime.fromisoformat(oldest_queued)
    junk = [
        {"state": st, "count": int(n)}
        for st, n in conn.execute(text("SELECT state, count(*) FROM junk GROUP BY state")).all()
    ]
    return {
        "junk": junk,
        "outbox": outbox,
        "outbox_oldest_queued_age_seconds": (
            _age_seconds(oldest_queued.isoformat(), now) if oldest_queued else 0.0
        ),
        "tickets": tickets,
        "overdue": int(overdue or 0),
    }


class StateCollector(Collector):
    """Builds every metric family at scrape time (see the module docstring)."""

    def __init__(
        self,
        *,
        tally: Callable[[], Counter[tuple[str, ...]]],
        engine: Engine | None,
        spool_conn: Callable[[], Any] | None,
        rules: Any = None,
        node: str = "",
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.tally = tally
        self.engine = engine
        self.spool_conn = spool_conn
        self.rules = rules  # RulesHolder or None
        self.node = node
        self.now = now or (lambda: datetime.now(UTC))
        self.events = EventCounts()
        self.scrape_errors: Counter[str] = Counter()

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are built per scrape

    def collect(self) -> Iterator[Metric]:
        now = self.now()
        info = GaugeMetricFamily(
            PREFIX + "build_info", "Version and node of this gateway.", labels=["version", "node"]
        )
        info.add_metric([gateway.__version__, self.node], 1)
        yield info
        yield from self._tallies()
        yield from self._rules()
        yield from self._spool(now)
        yield from self._database(now)
        errs = CounterMetricFamily(
            PREFIX + "scrape_errors",
            "Scrapes where a store could not be read.",
            labels=["store"],
        )
        for store in ("spool", "database"):
            errs.add_metric([store], self.scrape_errors[store])
        yield errs

    def _tallies(self) -> Iterator[Metric]:
        t = self.tally()
        for name, labels in TALLY_LABELS.items():
            fam = CounterMetricFamily(PREFIX + name, TALLY_HELP[name], labels=list(labels))
            seen = False
            for key, n in t.items():
                if key[0] == name and len(key) == len(labels) + 1:
                    fam.add_metric(list(key[1:]), n)
                    seen = True
            if not seen and not labels:
                fam.add_metric([], 0)
            yield fam

    def _rules(self) -> Iterator[Metric]:
        h = self.rules
        fam = CounterMetricFamily(
            PREFIX + "rules_reloads", "Rules reloads by result.", labels=["result"]
        )
        fam.add_metric(["ok"], getattr(h, "reloads", 0))
        fam.add_metric(["failed"], getattr(h, "failed_reloads", 0))
        yield fam
        at = GaugeMetricFamily(
            PREFIX + "rules_loaded_timestamp_seconds", "When the rules in force were loaded."
        )
        at.add_metric([], getattr(h, "loaded_at", 0.0))
        yield at

    def _spool(self, now: datetime) -> Iterator[Metric]:
        if self.spool_conn is None:
            return
        try:
            with contextlib.closing(self.spool_conn()) as conn:
                f = spool_facts(conn, now)
        except Exception as exc:  # a broken spool must not break the scrape
            self.scrape_errors["spool"] += 1
            log.warning("metrics: spool unreadable: %r", exc)
            return
        depth = GaugeMetricFamily(
            PREFIX + "spool_messages",
            "Messages in the spool by state (pending, processing).",
            labels=["state"],
        )
        depth.add_metric(["pending"], f["pending"])
        depth.add_metric(["processing"], f["processing"])
        yield depth
        age = GaugeMetricFamily(
            PREFIX + "spool_oldest_age_seconds",
            "Age of the oldest message waiting in the spool (0 when empty).",
        )
        age.add_metric([], f["oldest_age_seconds"])
        yield age
        q = GaugeMetricFamily(
            PREFIX + "quarantine_messages", "Messages in the quarantine (need an admin)."
        )
        q.add_metric([], f["quarantined"])
        yield q

    def _database(self, now: datetime) -> Iterator[Metric]:
        if self.engine is None:
            return
        try:
            # Read-only: a scrape never takes SQLite's write lock (docs/decisions.md D16.3).
            with read_only(self.engine).connect() as conn:
                f = db_facts(conn, now)
                self.events.update(conn)
        except Exception as exc:
            self.scrape_errors["database"] += 1
            log.warning("metrics: database unreadable: %r", exc)
            return
        ob = GaugeMetricFamily(
            PREFIX + "outbox_messages",
            "Outgoing mail by delivery state and kind.",
            labels=["state", "kind"],
        )
        for row in f["outbox"]:
            ob.add_metric([row["state"], row["kind"]], row["count"])
        yield ob
        oa = GaugeMetricFamily(
            PREFIX + "outbox_oldest_queued_age_seconds",
            "Age of the oldest outgoing message not yet sent (0 when none).",
        )
        oa.add_metric([], f["outbox_oldest_queued_age_seconds"])
        yield oa
        tk = GaugeMetricFamily(
            PREFIX + "tickets_open",
            "Tickets not closed, by status (open, waiting), queue and owner.",
            labels=["status", "queue", "owner"],
        )
        for row in f["tickets"]:
            tk.add_metric([row["status"], row["queue"], row["owner"]], row["count"])
        yield tk
        od = GaugeMetricFamily(
            PREFIX + "tickets_overdue", "Open tickets past a first-response or resolution due time."
        )
        od.add_metric([], f["overdue"])
        yield od
        jk = GaugeMetricFamily(
            PREFIX + "junk_messages",
            "Messages in the junk folder, by state (junk, released, expired); docs/spam.md.",
            labels=["state"],
        )
        for row in f.get("junk", []):
            jk.add_metric([row["state"]], row["count"])
        yield jk
        fams: dict[str, CounterMetricFamily] = {}
        for metric, label in dict(EVENT_COUNTERS.values()).items():
            fams[metric] = CounterMetricFamily(
                PREFIX + metric, EVENT_HELP[metric], labels=[label] if label else []
            )
        for (metric, value), n in sorted(self.events.counts.items()):
            fams[metric].add_metric([value] if EVENT_COUNTERS_LABEL[metric] else [], n)
        for metric, fam in fams.items():
            if not fam.samples and not EVENT_COUNTERS_LABEL[metric]:
                fam.add_metric([], 0)
            yield fam


EVENT_COUNTERS_LABEL = {m: label for m, label in EVENT_COUNTERS.values()}


def build_registry(collector: StateCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def node_name() -> str:
    return os.uname().nodename
