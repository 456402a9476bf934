"""The re-check worker: decisions that waited for a sender check that could not complete.

docs/decisions.md D10: a DKIM/SPF/DMARC check that hit a DNS timeout or SERVFAIL proves nothing, so
``respond`` defers the acknowledgement and ``staff`` holds a staff reply (each an
``auth_recheck`` row, :mod:`gateway.pipeline.holds`) instead of guessing.  This worker picks
the due rows, re-runs :func:`gateway.security.sender_auth.authenticate` on the stored raw
message with the SMTP client's address and HELO kept in the row (outside any transaction: DNS
time never holds a database lock), then, in one transaction:

* ``ack``: :func:`gateway.security.verdict.ack_decision` → ``send`` (through
  :func:`gateway.pipeline.respond.send_ack_now`: the same composition, the ticket's STORED
  ``first_response_due``), ``suppress`` (event ``ack-suppressed`` with the reason) or ``defer``
  again;
* ``staff``: :func:`gateway.pipeline.staff.judge` → relayed/applied, refused with the owner
  told, or held again.

Backoff 1, 2, 4, 8, 10, 10 … minutes (:func:`gateway.pipeline.holds.next_check`) until the
row's deadline (``security.recheck_window``); at the deadline the decision is final
(``waited_out``).  Time comes from the injected clock, so tests move a ``FrozenClock`` and
call :meth:`AuthRechecker.run_once`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.letters.facts import owner_or_default
from gateway.pipeline.context import Context, Services
from gateway.pipeline.holds import next_check
from gateway.pipeline.parse import parse
from gateway.pipeline.respond import _is_ours, ack_recipient, send_ack_now
from gateway.pipeline.staff import judge
from gateway.pipeline.timed import Looks, run_timed
from gateway.security.dns import BudgetResolver, OfflineResolver, Resolver
from gateway.security.sender_auth import AuthResult, authenticate
from gateway.security.verdict import ack_decision
from gateway.spool import Envelope, SpoolEntry
from gateway.store import core
from gateway.store.db import read_only, session_scope
from gateway.store.models import AuthRecheck, Message, Ticket
from gateway.store.queries import add_event

__all__ = ["AuthRechecker"]

log = logging.getLogger("gateway.recheck")

#: How long the loop sleeps at most between looks (new rows also wake it).
IDLE = 30.0

# The loop's two reads, prebuilt (gateway/store/core.py): they run at every look, and an ORM
# select costs five times the CPU of a prebuilt Core one.
_row = core.table(AuthRecheck)
_DUE = (
    sa_select(_row.c.id)
    .where(_row.c.state == "waiting", _row.c.next_check_at <= bindparam("now"))
    .order_by(_row.c.next_check_at, _row.c.id)
    .limit(bindparam("batch"))
)
_NEXT = sa_select(func.min(_row.c.next_check_at)).where(_row.c.state == "waiting")


class AuthRechecker:
    """Re-checks held senders and carries out the decision (module docstring)."""

    def __init__(self, engine: Engine, services: Services, *, batch: int = 50) -> None:
        self.engine = engine
        self.services = services
        self.batch = batch
        self.after_batch: Callable[[], None] | None = None
        self.checked = 0
        # Reads only: on SQLite a deferred BEGIN, never the write lock (gateway/store/db.py).
        self._reader = read_only(engine)
        #: When the loop looks next on its own: a new row due later needs no wake.
        self.looks = Looks()

    # -- the loop ------------------------------------------------------------------------

    def _due(self, now: datetime) -> list[int]:
        with self._reader.connect() as conn:
            rows = conn.execute(_DUE, {"now": now, "batch": self.batch}).scalars().all()
        return [r for r in rows if r is not None]

    def next_due(self) -> datetime | None:
        with self._reader.connect() as conn:
            value: datetime | None = conn.execute(_NEXT).scalar()
        return value

    def run_once_sync(self) -> int:
        """Re-check every row due now; returns how many rows were looked at."""
        done = 0
        for row_id in self._due(self.services.clock.now()):
            try:
                self.recheck(row_id)
            except Exception:  # one bad row must not stop the others
                log.exception("re-check of auth_recheck %s failed", row_id)
            done += 1
        if done and self.after_batch is not None:
            self.after_batch()
        self.checked += done
        return done

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    async def run(self, stopping: asyncio.Event, wakeup: asyncio.Event) -> None:
        await run_timed(
            "re-check",
            self.run_once,
            self.next_due,
            self.services.clock,
            stopping,
            wakeup,
            IDLE,
            self.looks,
        )

    # -- one row -------------------------------------------------------------------------

    def _resolver(self) -> Resolver | None:
        security = self.services.settings.security
        resolver = self.services.resolver
        if resolver is None and security.trusted_authserv_ids:
            return OfflineResolver()
        if resolver is None:
            return None
        # A re-check runs in the background: it may take the full per-question timeout.
        return BudgetResolver(resolver, max(security.dns_budget, security.dns_timeout))

    def _authenticate(self, raw: bytes, mail_from: str, row: AuthRecheck) -> AuthResult | None:
        resolver = self._resolver()
        if resolver is None:
            return None
        # The row holds the client the first check judged (behind a trusted relay, the one
        # the relay saw) and whose Authentication-Results it honoured (holds.hold).
        data: dict[str, Any] = json.loads(row.data or "{}")
        trusted = data.get("trusted_authserv_ids")
        return authenticate(
            raw,
            envelope_sender=mail_from,
            client_ip=row.client_ip or None,
            helo=row.helo or None,
            resolver=resolver,
            trusted_authserv_ids=(
                [str(x) for x in trusted]
                if isinstance(trusted, list)
                else self.services.settings.security.trusted_authserv_ids
            ),
        )

    def recheck(self, row_id: int) -> str:
        """Re-check one row; returns its outcome (``waiting`` when it waits again)."""
        with Session(self.engine) as s:
            row = s.get(AuthRecheck, row_id)
            if row is None or row.state != "waiting":
                return "gone"
            message = s.get(Message, row.message_id)
            if message is None:
                return "gone"
            raw, mail_from = bytes(message.raw), message.mail_from
            s.expunge(row)
        # DNS outside the transaction.
        auth = self._authenticate(raw, mail_from, row)
        with session_scope(self.engine) as s:
            row2 = s.get(AuthRecheck, row_id)
            message2 = s.get(Message, row.message_id)
            if row2 is None or row2.state != "waiting" or message2 is None:
                return "gone"
            ticket = s.get(Ticket, row2.ticket_id) if row2.ticket_id is not None else None
            if ticket is None:
                row2.state, row2.outcome = "done", "no ticket"
                s.add(row2)
                return row2.outcome
            if auth is not None:
                message2.auth = json.dumps(auth.to_json())
                s.add(message2)
            now = self.services.clock.now()
            waited_out = now >= _aware(row2.deadline)
            ctx = self._context(s, row2, message2, ticket, auth, now)
            row2.attempts += 1
            if row2.purpose == "ack":
                outcome = self._ack(ctx, row2, waited_out)
            else:
                outcome = self._staff(ctx, row2, waited_out)
            if outcome == "waiting":
                row2.next_check_at = next_check(now, row2.attempts, _aware(row2.deadline))
            else:
                row2.state, row2.outcome = "done", outcome
            s.add(row2)
            return outcome

    def _context(
        self,
        s: Session,
        row: AuthRecheck,
        message: Message,
        ticket: Ticket,
        auth: AuthResult | None,
        now: datetime,
    ) -> Context:
        data: dict[str, Any] = json.loads(row.data or "{}")
        truncated = int(data.get("truncated_bytes", 0) or 0)
        try:
            rcpts = [str(a) for a in json.loads(message.to or "[]")]
        except ValueError:
            rcpts = []
        envelope = Envelope(
            mail_from=message.mail_from,
            rcpt_tos=rcpts,
            peer=row.client_ip,
            helo=row.helo,
            truncated_bytes=truncated,
        )
        entry = SpoolEntry(
            id=message.spool_id or 0,
            envelope=envelope,
            raw=bytes(message.raw),
            attempts=0,
            state="recheck",
            dedupe_key=message.dedupe_key,
        )
        received = data.get("received_at")
        received_at = datetime.fromisoformat(received) if received else _aware(message.at)
        parsed = parse(
            bytes(message.raw),
            max_size=self.services.settings.smtp.max_message_size,
            truncated_bytes=truncated,
        )
        ctx = Context(
            entry=entry,
            session=s,
            services=self.services,
            now=now,
            received_at=received_at,
            parsed=parsed,
            auth=auth,
            ticket=ticket,
            message=message,
            sender=parsed.from_address or message.mail_from.lower(),
            kind=message.kind,
        )
        return ctx

    def _ack(self, ctx: Context, row: AuthRecheck, waited_out: bool) -> str:
        assert ctx.ticket is not None
        assert ctx.ticket.id is not None
        assert ctx.parsed is not None
        security = self.services.settings.security
        decision = ack_decision(
            ctx.auth, waited_out=waited_out, if_unverified=security.ack_if_unverified
        )
        if decision.action == "defer":
            return "waiting"
        msg_id = ctx.message.id if ctx.message is not None else None
        if decision.action == "suppress":
            add_event(
                ctx.session, ctx.ticket.id, "ack-suppressed", decision.reason, ctx.now,
                message_id=msg_id,
            )  # fmt: skip
            return f"suppressed: {decision.reason}"
        if ctx.ticket.first_responded_at is not None:
            # A person answered while the ack waited: "we got your request" would come
            # after the answer (RFC 3834 §2: automatic replies only where useful).
            why = "a person already answered the ticket while the acknowledgement waited"
            add_event(ctx.session, ctx.ticket.id, "ack-suppressed", why, ctx.now,
                      message_id=msg_id)  # fmt: skip
            return f"suppressed: {why}"
        to = ack_recipient(ctx.auth, ctx.parsed.from_address, ctx.entry.envelope.mail_from)
        if not to or "@" not in to or _is_ours(ctx, to):
            why = f"no address to answer ({to or 'null reverse-path'})"
            add_event(ctx.session, ctx.ticket.id, "ack-suppressed", why, ctx.now,
                      message_id=msg_id)  # fmt: skip
            return f"suppressed: {why}"
        rules = self.services.rules
        owner = owner_or_default(rules, ctx.ticket.owner)
        assert owner is not None  # the rules loader refuses an unknown default owner
        template = str(json.loads(row.data or "{}").get("template") or "ack")
        sent = send_ack_now(ctx, to, owner=owner, template_name=template, because=decision.reason)
        return ("sent: " if sent else "suppressed: ") + decision.reason

    def _staff(self, ctx: Context, row: AuthRecheck, waited_out: bool) -> str:
        person = str(json.loads(row.data or "{}").get("person") or "")
        result = judge(ctx, person, waited_out=waited_out)
        return "waiting" if result == "wait" else result


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes on some paths; they are UTC (models docstring)."""
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
