"""The delivery worker: sends what the transactional outbox holds (docs/design.md §6).

Stages never send mail. They write an ``Outbox`` row (unsigned bytes) in the same
transaction as the ticket change (``enqueue``); this worker claims due rows, DKIM-signs them
*last* (after every header is final), hands them to the relay and records the outcome:

- claim: rows ``queued`` and due (``next_attempt_at <= now``), plus rows stuck in ``sending``
  past ``claimed_until`` (their node stopped renewing: it died or lost the database), are set
  to ``sending`` in one transaction, stamped with this node's name and boot id
  (gateway/node.py) and a fresh fencing token (``claim_token`` + 1), with a short lease
  (``CLAIM_LEASE``, 30 s). On PostgreSQL the select takes ``FOR UPDATE SKIP LOCKED`` so
  several nodes never claim the same row; SQLite ignores it (one writer anyway).
- lease: while the worker holds claims it renews them every ``RENEW_EVERY`` (10 s), so a
  slow relay never lets a lease lapse under a live sender, and the rows of a node that
  stopped are fair game within 30 s. If renewing fails (the database is away) and the lease
  runs out, the worker abandons its current send before anyone else may claim the row: a
  re-claim never sends while the first claim is still sending.
- restart: at start the worker takes back at once every row its node's previous run left in
  ``sending`` (same name, other boot id): that run is dead, no lease needs to run out.
- record: only by the claim that is still current (row ``sending`` with our token); a stale
  claim's outcome is logged and dropped.
- sent: ``sent`` with ``sent_at``; ``raw`` becomes the signed bytes that actually went out.
- temporary (4xx, 552, connection trouble): back to ``queued`` at
  ``retry.next_attempt()`` (Postfix-like backoff); after 5 days ``given_up``.
- permanent (5xx) or given up: an event on the ticket and ONE notice to the ticket's owner,
  never to the customer; a failed notice to staff is not itself notified (no loops).

A crash after the relay said 250 but before the commit means the row is sent again (at the
restart, or by another node within the lease): at-least-once, as with every MTA queue, and
the only duplicates are the messages in flight at the crash (docs/decisions.md D10.12).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col

from gateway.clock import Clock
from gateway.letters.notification import compose_notification
from gateway.logs import kv
from gateway.metrics import is_database_error
from gateway.node import NodeIdentity, node_identity
from gateway.outbound import outbox_sql, retry
from gateway.outbound.brandkeys import BrandKeys
from gateway.outbound.deliver import PERMANENT, SENT, DeliveryResult, deliver
from gateway.outbound.dkim import DkimKey, load_key, sign, warm_up
from gateway.outbound.pool import ConnectionPool
from gateway.routing.holder import RulesHolder
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.store import core, fresh
from gateway.store.db import is_postgres, read_only, session_scope
from gateway.store.models import Message, Outbox, Ticket
from gateway.store.queries import add_event

#: Deliveries in flight at once per worker (docs/decisions.md D16).
DELIVERY_PARALLEL = 8

log = logging.getLogger("gateway.outbound")

#: How long a claim lasts without renewal: a dead node's rows move to a live one within it.
CLAIM_LEASE = timedelta(seconds=30)
#: How often a working node renews its leases (a third of the lease: two renewals may fail).
RENEW_EVERY = CLAIM_LEASE / 3
#: Kinds addressed to staff: their failure is logged, never notified (no notice loops).
STAFF_KINDS = frozenset({"notification", "escalation"})
#: Safety net for `run()`: wake at least this often even if nobody sets `wakeup`.
MAX_IDLE = 60.0
#: While mail keeps coming, `run()` starts a pass at most this often (seconds): a wake during
#: a pass or just after one waits out the rest, so that the pipeline's batches in between
#: go out together. Each pass costs two transactions and two thread hops whatever it
#: carries; at 50 new tickets/s (two mails each) the pipeline woke the worker for every
#: one or two tickets. An idle worker woken by one mail starts at once; under load an
#: acknowledgement waits at most this long more (bench/delivery_worker.py --trickle 100:
#: ~3.3 ms CPU per mail with a pass per wake, ~2.2 at 50 ms, ~1.8 at 100 ms).
PASS_EVERY = 0.1


@dataclass(frozen=True)
class Queued:
    """What `enqueue` wrote: the outbox row's id and the mail's Message-ID."""

    id: int
    message_id: str


def enqueue(
    session: Session,
    *,
    ticket_id: int | None,
    kind: str,
    raw: bytes,
    message_id: str,
    rcpt_tos: list[str],
    now: datetime,
    mail_from: str = "",
    from_address: str = "",
    subject: str = "",
    text: str = "",
    in_reply_to: str | None = None,
    references: str = "",
) -> Queued:
    """Write one Outbox row (unsigned bytes) and its outbound Message row, in `session`.

    ``mail_from`` "" is the null reverse-path, right for automatic mail (RFC 3834 §3.3).
    The Message row makes the mail visible in the ticket's history (``tickets show``).

    Both are Core inserts (gateway.store.core: an ORM add and flush cost 400 us each, two
    or three times per new ticket), one statement on PostgreSQL (`core.insert_two`);
    nothing in the writing transaction changes either row through the ORM, and a later
    query still finds them.
    """
    to = json.dumps(rcpt_tos)
    fresh.queued(session, ticket_id, kind)
    outbox_id = core.insert_two(
        session,
        (
            Outbox,
            {
                "ticket_id": ticket_id,
                "kind": kind,
                "mail_from": mail_from,
                "rcpt_tos": to,
                "message_id": message_id,
                "raw": raw,
                "state": "queued",
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
            },
        ),
        (
            Message,
            {
                "ticket_id": ticket_id,
                "direction": "out",
                "kind": kind,
                "message_id": message_id,
                "dedupe_key": f"out:{message_id}",
                "raw_sha256": hashlib.sha256(raw).hexdigest(),
                "mail_from": mail_from,
                "from_address": from_address,
                "to": to,
                "subject": subject,
                "at": now,
                "size": len(raw),
                "raw": raw,
                "text": text,
                "in_reply_to": in_reply_to,
                "references": references,
            },
        ),
    )
    return Queued(outbox_id, message_id)


def notify_owner(
    session: Session,
    settings: Settings,
    signer: Signer,
    *,
    ticket: Ticket,
    email: str,
    name: str,
    person: str | None,
    subject: str,
    body: str,
    now: datetime,
    in_reply_to: str | None = None,
    kind: str = "notification",
) -> Queued:
    """Queue a notice to a staff person about `ticket` (kind 'notification' unless said)."""
    assert ticket.id is not None
    raw, mid = compose_notification(
        to_address=email,
        to_name=name,
        subject=subject,
        body=body,
        from_address=settings.outbound.from_address,
        from_name=settings.outbound.from_name,
        signer=signer,
        hostname=settings.smtp.hostname,
        now=now,
        ticket_id=ticket.id,
        person=person if person and _slug_ok(person) else None,
        in_reply_to=in_reply_to,
    )
    return enqueue(
        session,
        ticket_id=ticket.id,
        kind=kind,
        raw=raw,
        message_id=mid,
        rcpt_tos=[email],
        now=now,
        from_address=settings.outbound.from_address,
        subject=subject,
        text=body,
    )


def _slug_ok(person: str) -> bool:
    return re.fullmatch(r"[a-z0-9_-]{1,32}", person) is not None


def load_keys(settings: Settings) -> list[DkimKey]:
    """The DKIM keys of the configuration; [] when ``key_file`` is "" (unsigned)."""
    d = settings.outbound.dkim
    if not d.key_file:
        return []
    keys = [load_key(Path(d.key_file), d.domain, d.selector)]
    for entry in d.extra_key_files:
        # "selector=path" signs with that key under its own selector: dual rsa + ed25519
        # signing (RFC 8463 §6) needs two DNS records, so two selectors. A bare path
        # keeps the main selector (the original meaning).
        selector, sep, path = entry.partition("=")
        if not sep:
            selector, path = d.selector, entry
        if path:
            keys.append(load_key(Path(path), d.domain, selector.strip()))
    return keys


@dataclass
class _Claimed:
    id: int
    ticket_id: int | None
    kind: str
    mail_from: str
    rcpt_tos: list[str]
    message_id: str
    raw: bytes
    first_attempt_at: datetime
    token: int  # the fencing token of this claim
    #: The DKIM-signed bytes, or why signing failed, when signed in the claiming thread
    #: (`_claim_and_sign`); both None: `_send` signs.
    signed: bytes | None = None
    sign_error: str | None = None


class DeliveryWorker:
    """Sends due outbox rows through the relay; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        signer: Signer | None = None,
        rules: Callable[[], Rules] | None = None,
        batch: int = 50,
        node: NodeIdentity | None = None,
        lease: timedelta = CLAIM_LEASE,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self.signer = signer or Signer(settings.secret())
        if rules is None:
            holder = RulesHolder(settings.rules_path)
            rules = lambda: holder.current  # noqa: E731
        self.rules: Callable[[], Rules] = rules
        self.batch = batch
        #: Deliveries in flight at once (each on its own relay connection).
        self.parallel = DELIVERY_PARALLEL
        #: Relay connections kept between mails (gateway/outbound/pool.py): one for the whole
        #: of `run()`, else one per `run_once()` pass.
        self.pool: ConnectionPool | None = None
        self.keys = load_keys(settings)  # loaded once; a bad key fails at start, loudly
        self.brand_keys = BrandKeys(self.rules)  # a brand's From is signed with its key
        self.wakeup = asyncio.Event()
        self.sent = 0
        self.node = node or node_identity(settings)
        self.lease = lease
        self._reader = read_only(engine)  # `next_due`'s deferred, never-committed reads
        self.pass_every = PASS_EVERY
        # Our claims are valid until here (by `clock`); moved on by every renewal. Sending
        # stops before it passes, so no other node can hold a row we are still sending.
        self._lease_until: datetime | None = None
        self.stale_records = 0  # outcomes dropped because our claim was no longer current
        # Prometheus tallies (gateway/metrics.py): deliveries by outcome.
        self.tally: Counter[tuple[str, ...]] = Counter()

    # -- claiming ----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Sign once with every key this worker may sign with, before mail arrives
        (gateway.outbound.dkim.warm_up): the daemon calls it at start-up."""
        warm_up([*self.keys, *self.brand_keys.every_key()])

    def _claim(self) -> list[_Claimed]:
        now = self.clock.now()
        out: list[_Claimed] = []
        # Prebuilt Core statements (gateway/outbound/outbox_sql.py): the select and one UPDATE
        # for all the rows, where the ORM loaded entities and flushed an UPDATE per row.
        # A Core transaction, no ORM session: nothing here goes through the ORM.
        with self.engine.begin() as conn:
            rows = conn.execute(
                outbox_sql.claim_select(self.batch, is_postgres(self.engine)), {"now": now}
            ).all()
            if not rows:
                return out
            conn.execute(
                outbox_sql.CLAIM_UPDATE,
                {
                    "ids": [row.id for row in rows],
                    "c_now": now,
                    "c_until": now + self.lease,
                    "c_by": self.node.name,
                    "c_boot": self.node.boot,
                },
            )
            for row in rows:
                if row.state == "sending":
                    log.warning(
                        "outbox %s: lease of %s/%s ran out; %s takes it over",
                        row.id,
                        row.claimed_by or "?",
                        row.claim_boot or "?",
                        self.node,
                    )
                out.append(
                    _Claimed(
                        id=row.id,
                        ticket_id=row.ticket_id,
                        kind=row.kind,
                        mail_from=row.mail_from,
                        rcpt_tos=list(json.loads(row.rcpt_tos or "[]")),
                        message_id=row.message_id,
                        raw=row.raw,
                        first_attempt_at=(
                            row.first_attempt_at if row.first_attempt_at is not None else now
                        ),
                        token=(row.claim_token or 0) + 1,
                    )
                )
        self._lease_until = now + self.lease
        return out

    def take_back_own(self) -> int:
        """Rows this node's previous run left in ``sending`` go back in line at once.

        Same node name, another boot id: that run is over (this process replaced it), so
        nothing is still sending them and no lease needs to run out (docs/decisions.md D10.12).
        Their attempt is not counted: whether it reached the relay is unknown.
        """
        with session_scope(self.engine) as s:
            result = s.exec(
                update(Outbox)
                .where(
                    col(Outbox.state) == "sending",
                    col(Outbox.claimed_by) == self.node.name,
                    col(Outbox.claim_boot) != self.node.boot,
                )
                # next_attempt_at stays: they were due, so they go first, oldest first.
                .values(state="queued", claimed_until=None)
            )
            n = int(result.rowcount or 0)
        if n:
            log.warning(
                "took back %d outbox row(s) left in sending by this node's previous run (%s)",
                n,
                self.node.name,
            )
        return n

    def renew(self) -> int:
        """Extend the lease of every row this run holds; returns how many rows."""
        now = self.clock.now()
        until = now + self.lease
        with session_scope(self.engine) as s:
            result = s.exec(
                update(Outbox)
                .where(
                    col(Outbox.state) == "sending",
                    col(Outbox.claimed_by) == self.node.name,
                    col(Outbox.claim_boot) == self.node.boot,
                )
                .values(claimed_until=until)
            )
            n = int(result.rowcount or 0)
        self._lease_until = until
        return n

    def _lease_left(self) -> float:
        """Seconds our claims stay ours, minus a margin for clock skew between nodes and
        the time a send takes to stop; <= 0 means stop sending now."""
        if self._lease_until is None:
            return 0.0
        margin = self.lease.total_seconds() / 6
        return (self._lease_until - self.clock.now()).total_seconds() - margin

    async def _renew_loop(self) -> None:
        """While claims are held: renew them every lease/3 (monotonic time, not `clock`)."""
        every = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.renew)
            except Exception:  # the database is away: the lease runs down, sending stops
                log.exception("renewing outbox leases failed")

    # -- one delivery ------------------------------------------------------------------

    def _claim_and_sign(self) -> list[_Claimed]:
        """`_claim`, then DKIM-sign every claimed mail in the same worker thread: one thread
        hand-off per batch instead of one per mail (each cost the event loop ~50 µs and a
        GIL round trip). The headers are final once queued, so this is still signing last
        (docs/design.md §6); a mail whose signing fails is recorded as before."""
        claimed = self._claim()
        for item in claimed:
            self._sign(item)
        return claimed

    def _sign(self, item: _Claimed) -> None:
        """Sign `item` with the keys for its From domain: `item.signed`, or why not in
        `item.sign_error`."""
        try:
            item.signed = sign(item.raw, self.brand_keys.keys_for(item.raw, self.keys))
        except (ValueError, RuntimeError, OSError) as exc:
            item.sign_error = f"DKIM signing failed: {exc}"

    async def _send(self, item: _Claimed) -> tuple[DeliveryResult, bytes]:
        if item.signed is None and item.sign_error is None:
            # Claimed without `_claim_and_sign`. docs/design.md §6: DKIM-sign last. In a
            # worker thread: canonicalisation and hashing are pure Python and must not stall
            # the SMTP loop (docs/decisions.md D16.5).
            await asyncio.to_thread(self._sign, item)
        if item.signed is None:
            return DeliveryResult("temporary", None, str(item.sign_error)), item.raw
        signed = item.signed
        result = await deliver(
            signed,
            item.mail_from,
            item.rcpt_tos,
            relay=self.settings.relay,
            helo=self.settings.smtp.hostname,
            pool=self.pool,
        )
        return result, signed

    def _record(self, item: _Claimed, result: DeliveryResult, signed: bytes) -> None:
        self._log_outcome(item, result, self._record_row(item, result, signed))

    def _record_many(self, finished: list[tuple[_Claimed, DeliveryResult, bytes]]) -> None:
        """The outcomes of a batch in ONE transaction (docs/decisions.md D16: one write transaction
        per mail queued behind the pipeline's for SQLite's write lock, and delivery fell to
        ~14 mails/s under ingest); logged after the commit."""
        if all(result.outcome == SENT and not result.refused for _, result, _ in finished):
            # Sent to every recipient (nearly always): prebuilt statements only, in a Core
            # transaction, without an ORM session.
            with self.engine.begin() as conn:
                if is_postgres(self.engine):
                    states = self._store_sent(conn, finished)
                else:
                    states = self._store_outcomes(conn, None, finished)
        else:
            with session_scope(self.engine) as s:
                states = self._store_outcomes(s.connection(), s, finished)
        for (item, result, _), state in zip(finished, states, strict=True):
            self._log_outcome(item, result, state)

    def _store_outcomes(
        self,
        conn: Connection,
        s: Session | None,
        finished: list[tuple[_Claimed, DeliveryResult, bytes]],
    ) -> list[str | None]:
        """Store a batch's outcomes on `conn` (the connection of `s`, when the batch has
        other outcomes than sent-to-all, which need it); each row's new state (None: not
        ours now).

        The common case, sent to every recipient, is written with prebuilt Core statements:
        one locked read of the batch's states and tokens and one executemany UPDATE (what
        `_store_outcome` writes for it, without an ORM load and flush per row). The rest
        (refusals, deferrals, failures: events and notices) go through `_store_outcome`."""
        current = {
            row.id: (row.state, row.claim_token)
            for row in conn.execute(
                outbox_sql.OUTCOME_ROWS, {"ids": [item.id for item, _, _ in finished]}
            )
        }
        states: list[str | None] = []
        sent: list[dict[str, object]] = []
        for item, result, signed in finished:
            if current.get(item.id) != ("sending", item.token):
                self._stale(item, result)
                states.append(None)
            elif result.outcome == SENT and not result.refused:
                sent.append({"o_id": item.id, "o_now": self.clock.now(), "o_raw": signed})
                self.sent += 1
                states.append("sent")
            else:
                assert s is not None, "only a batch sent to every recipient has no session"
                states.append(self._store_outcome(s, item, result, signed))
        if sent:
            conn.execute(outbox_sql.SENT_UPDATE, sent)
        return states

    def _store_sent(
        self, conn: Connection, finished: list[tuple[_Claimed, DeliveryResult, bytes]]
    ) -> list[str | None]:
        """PostgreSQL: a batch sent to every recipient, stored by one statement
        (`outbox_sql.SENT_ALL`); each row's new state ("sent", or None: not ours now)."""
        params = {
            "ids": [item.id for item, _, _ in finished],
            "tokens": [item.token for item, _, _ in finished],
            "raws": [signed for _, _, signed in finished],
            "now": self.clock.now(),
        }
        ours = set(conn.execute(outbox_sql.SENT_ALL, params).scalars())
        states: list[str | None] = []
        for item, result, _ in finished:
            if item.id in ours:
                self.sent += 1
                states.append("sent")
            else:
                self._stale(item, result)
                states.append(None)
        return states

    def _stale(self, item: _Claimed, result: DeliveryResult) -> None:
        """A newer claim (another node after our lease ran out, `outbox retry`) owns the row
        now: only the current claim records (fencing token)."""
        self.stale_records += 1
        log.warning(
            "outbox %s: claim %s of %s is no longer current; outcome %s not recorded",
            item.id,
            item.token,
            self.node,
            result.outcome,
        )

    def _log_outcome(self, item: _Claimed, result: DeliveryResult, state: str | None) -> None:
        if state is None:
            return
        self.tally[("deliveries", result.outcome)] += 1
        # One line per attempt, after the commit (docs/decisions.md D14: failures were not logged at
        # all): INFO delivered, WARNING temporary failure (retried), ERROR permanent / given up.
        fields = {
            "outbox": item.id,
            "kind": item.kind,
            "message_id": item.message_id,
            "to": item.rcpt_tos,
            "state": state,
            "reply": f"{result.code or ''} {result.detail}".strip()[:300],
        }
        extra = {"fields": {"event": "delivery", **fields}}
        if result.outcome == SENT:
            log.info("delivered %s", kv(fields), extra=extra)
        elif state == "queued":
            log.warning("delivery deferred %s", kv(fields), extra=extra)
        else:
            log.error("delivery failed %s", kv(fields), extra=extra)

    def _record_row(
        self,
        item: _Claimed,
        result: DeliveryResult,
        signed: bytes,
        session: Session | None = None,
    ) -> str | None:
        """Store the attempt's outcome; return the row's new state (None: not ours now).
        In `session` when given (a batch), else in a transaction of its own."""
        if session is not None:
            return self._store_outcome(session, item, result, signed)
        with session_scope(self.engine) as s:
            return self._store_outcome(s, item, result, signed)

    def _store_outcome(
        self, s: Session, item: _Claimed, result: DeliveryResult, signed: bytes
    ) -> str | None:
        now = self.clock.now()
        # Locked (PostgreSQL) so no claim slips in between the check and the write.
        row = s.get(Outbox, item.id, with_for_update=True)
        if row is None or row.state != "sending" or row.claim_token != item.token:
            self._stale(item, result)
            return None
        row.attempts += 1
        row.claimed_until = None
        rcpts = ", ".join(item.rcpt_tos)
        if result.outcome == SENT:
            row.state = "sent"
            row.sent_at = now
            row.raw = signed  # what actually went out, signature included
            row.last_error = ""
            self.sent += 1
            for rcpt, (code, text) in result.refused.items():
                add_event(
                    s,
                    item.ticket_id,
                    "delivery-refused",
                    f"{item.kind} {item.message_id}: {rcpt} refused ({code} {text})",
                    now,
                )
        elif result.outcome == PERMANENT:
            row.state = "failed"
            row.last_error = f"{result.code or ''} {result.detail}".strip()
            detail = (
                f"{item.kind} {item.message_id} to {rcpts} failed permanently: {row.last_error}"
            )
            add_event(s, item.ticket_id, "delivery-failed", detail, now)
            self._tell_owner(s, item, detail, now)
        else:
            row.last_error = f"{result.code or ''} {result.detail}".strip()
            nxt = retry.next_attempt(item.first_attempt_at, now, self.rng)
            if nxt is None:
                row.state = "given_up"
                detail = (
                    f"{item.kind} {item.message_id} to {rcpts} given up after "
                    f"{row.attempts} attempts: {row.last_error}"
                )
                add_event(s, item.ticket_id, "delivery-given-up", detail, now)
                self._tell_owner(s, item, detail, now)
            else:
                row.state = "queued"
                row.next_attempt_at = nxt
                add_event(
                    s,
                    item.ticket_id,
                    "delivery-deferred",
                    f"{item.kind} {item.message_id} to {rcpts}: {row.last_error}; "
                    f"next attempt {nxt.isoformat()}",
                    now,
                )
        s.add(row)
        return row.state

    def _tell_owner(self, s: Session, item: _Claimed, detail: str, now: datetime) -> None:
        """ONE notice to the ticket's owner; never the customer, never about a notice."""
        if item.kind in STAFF_KINDS or item.ticket_id is None:
            return
        ticket = s.get(Ticket, item.ticket_id)
        if ticket is None:
            return
        try:
            owner = self.rules().person(ticket.owner)
        except KeyError:
            log.warning(
                "ticket %s: owner %r unknown; failure only recorded", ticket.ref, ticket.owner
            )
            return
        name, email = owner.name, owner.email
        body = (
            f"Our {item.kind} for ticket {ticket.ref} could not be delivered to "
            f"{', '.join(item.rcpt_tos)}.\n\n{detail}\n\n"
            f"The customer has NOT been told. Please contact them another way, or reply to "
            f"this message to add a note to {ticket.ref}.\n"
        )
        notify_owner(
            s,
            self.settings,
            self.signer,
            ticket=ticket,
            email=email,
            name=name,
            person=ticket.owner,
            subject=f"[{ticket.ref}] Delivery failed: {ticket.subject}",
            body=body,
            now=now,
        )

    # -- loops -------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Deliver everything due now (including notices queued meanwhile); return count.

        Outside `run()` the pass keeps relay connections for its own mails and closes them
        (QUIT) before it returns."""
        if self.pool is not None:
            return await self._run_once()
        async with self._kept_connections():
            return await self._run_once()

    @contextlib.asynccontextmanager
    async def _kept_connections(self) -> AsyncIterator[None]:
        """Relay connections kept between mails while inside; QUIT on the way out."""
        pool = self.pool = ConnectionPool(per_server=self.parallel, tally=self.tally)
        try:
            yield
        finally:
            self.pool = None
            await pool.close()

    async def _run_once(self) -> int:
        done, _ = await self._pass(then_due=False)
        return done

    async def _pass(
        self, *, then_due: bool, wake: asyncio.Event | None = None
    ) -> tuple[int, datetime | None]:
        """Claim, send and record until nothing is due; (mails done, `next_due()` or None).

        With `then_due` (the daemon's `run()`), `next_due()` is read in the thread hop that
        ends the pass, and a round that claimed less than a full batch and sent every mail
        ends it: everything due at its claim was claimed, what is queued later sets the
        wakeup, and what falls due later is what `next_due()` reports (0 s: `run()` goes
        round again at once). At a steady trickle (two mails per new ticket) that was four
        thread hops and three transactions per pass (claim, record, an empty claim taking
        the write lock, the `next_due` read); now two hops (claim, record + read). Without
        it (`run_once()`), the pass ends on an empty claim, as callers expect.

        `wake` (the daemon's wakeup) set by the end of the pass means mail was queued during
        it and `run()` goes round again anyway: `next_due()` is not read then. Under load it
        is set after nearly every pass, and the read (the earliest queued row, past the
        index entries of every row sent since the last vacuum) cost PostgreSQL 3 ms per
        pass at 100 messages a second (docs/performance.md §9)."""
        done = 0
        gate = asyncio.Semaphore(self.parallel)

        async def one(item: _Claimed) -> tuple[_Claimed, DeliveryResult, bytes] | None:
            async with gate:
                outcome = await self._send_within_lease(item)
                return None if outcome is None else (item, *outcome)

        renewer = asyncio.create_task(self._renew_loop(), name="outbox-lease-renewal")
        try:
            while True:
                claimed, due = await asyncio.to_thread(self._claim_and_sign_or_due, then_due, wake)
                if not claimed:
                    return done, due
                # Up to `parallel` sends at once (docs/decisions.md D16: one at a time, each on its
                # own relay connection, delivery managed ~40 mails/s and the outbox grew at 20 new
                # tickets/s). A send whose lease ran out records nothing (the row is anyone's now);
                # the others carry on.
                results = await asyncio.gather(*(one(item) for item in claimed))
                finished = [r for r in results if r is not None]
                last = (
                    then_due
                    and len(claimed) < self.batch
                    and len(finished) == len(claimed)
                    and all(r.outcome == SENT and not r.refused for _, r, _ in finished)
                )
                if finished:
                    due = await asyncio.to_thread(self._record_many_or_due, finished, last, wake)
                done += len(finished)
                if last:
                    return done, due
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    def _claim_and_sign_or_due(
        self, then_due: bool, wake: asyncio.Event | None = None
    ) -> tuple[list[_Claimed], datetime | None]:
        """`_claim_and_sign`; when nothing was claimed and `then_due`, also `next_due()`."""
        claimed = self._claim_and_sign()
        return claimed, self._due_unless_woken(wake) if then_due and not claimed else None

    def _record_many_or_due(
        self,
        finished: list[tuple[_Claimed, DeliveryResult, bytes]],
        then_due: bool,
        wake: asyncio.Event | None = None,
    ) -> datetime | None:
        """`_record_many`; with `then_due`, then `next_due()` (same thread hop)."""
        self._record_many(finished)
        return self._due_unless_woken(wake) if then_due else None

    def _due_unless_woken(self, wake: asyncio.Event | None) -> datetime | None:
        """`next_due()`, or None when `wake` is already set (`run()` goes round at once).
        Read from a worker thread: a set flag seen late costs one read, never a wake."""
        if wake is not None and wake.is_set():
            return None
        return self.next_due()

    async def _send_within_lease(self, item: _Claimed) -> tuple[DeliveryResult, bytes] | None:
        """Send `item`, but never past our lease: if renewals fail and the lease runs down
        mid-send, the SMTP transaction is abandoned (before the final dot, the relay drops
        it) so that a node which re-claims the row is the only one sending it."""
        if self._lease_left() <= 0:
            log.warning("outbox %s: lease of %s ran out before sending", item.id, self.node)
            return None
        send = asyncio.ensure_future(self._send(item))
        try:
            while True:
                left = self._lease_left()
                if left <= 0:
                    send.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await send
                    log.warning(
                        "outbox %s: lease of %s ran out mid-send; send abandoned",
                        item.id,
                        self.node,
                    )
                    return None
                finished, _ = await asyncio.wait({send}, timeout=min(left, 1.0))
                if finished:
                    return send.result()
        finally:
            if not send.done():
                send.cancel()

    def next_due(self) -> datetime | None:
        """When the earliest queued row is due, or a stuck lease expires; None if idle."""
        # What `read_scope` does (never committed), on a read-only engine built once.
        with self._reader.connect() as conn:
            queued, lease = conn.execute(outbox_sql.NEXT_DUE).one()
        times = [t for t in (queued, lease) if t is not None]
        return min(times) if times else None

    async def run(self, stopping: asyncio.Event, wakeup: asyncio.Event | None = None) -> None:
        """Until `stopping`: deliver what is due, then sleep until the next due time or
        until `wakeup` is set (a stage queued mail). Never a fixed coarse poll."""
        wake = wakeup or self.wakeup
        # Shutdown QUITs the kept relay connections (docs/design.md §6).
        async with self._kept_connections():
            await self._run(stopping, wake)

    async def _run(self, stopping: asyncio.Event, wake: asyncio.Event) -> None:
        # First take back what this node's previous run left in `sending`.
        while not stopping.is_set():
            try:
                await asyncio.to_thread(self.take_back_own)
                break
            except Exception:
                log.exception("taking back this node's outbox claims failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 5)
        loop = asyncio.get_running_loop()
        started = -self.pass_every
        while not stopping.is_set():
            rest = started + self.pass_every - loop.time()
            if rest > 0:
                await asyncio.sleep(rest)  # a stop waits at most this long (`pass_every`)
                if stopping.is_set():
                    break
            started = loop.time()
            wake.clear()
            try:
                _, due = await self._pass(then_due=True, wake=wake)  # the pool is `run()`'s
            except Exception as exc:  # the database is away: log, back off, try again
                if is_database_error(exc):
                    self.tally[("database_errors",)] += 1
                log.exception("delivery loop error")
                due = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 5)
                continue
            timeout = MAX_IDLE
            if due is not None:
                timeout = min(MAX_IDLE, max(0.0, (due - self.clock.now()).total_seconds()))
            if timeout == 0.0:
                continue
            waiter = asyncio.create_task(wake.wait())
            stopper = asyncio.create_task(stopping.wait())
            await asyncio.wait(
                {waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            stopper.cancel()
