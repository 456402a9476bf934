"""The bundle worker: one acknowledgement, one owner notification per burst (docs/decisions.md D12).

``respond`` and ``notify`` put a customer's further new mails within ``outbound.ack_window``
into ``bundle_item`` (:mod:`gateway.pipeline.conversation`). When a bundle's window closes
this worker sends, in one transaction:

- ``ack``: ONE acknowledgement to the customer listing each mail (subject, when it came)
  and where it went (the ticket, its owner, its STORED deadline), then the customer's
  open requests; the new tickets it covers are marked acknowledged. When the per-sender
  ``outbound.daily_ack_cap`` is already reached nothing is sent (``ack-suppressed``): the
  acknowledgement that reached it told the customer so;
- ``notify``: ONE notification to the owner with each mail's full text (the owner answers
  from a mail client, never "log in to read"), Reply-To the owner's signed token of the
  latest ticket.

The loop is the re-check worker's (``gateway.pipeline.recheck``): sleep until the next
bundle is due (at most ``IDLE``), woken after each pipeline batch; time from the injected
clock, so tests move a ``FrozenClock`` and call :meth:`BundleWorker.run_once`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from gateway.letters import templates as letters
from gateway.letters.brands import identity
from gateway.letters.bundled import (
    BundledMail,
    compose_bundled_ack,
    compose_bundled_notification,
)
from gateway.letters.facts import isoz
from gateway.letters.notification import compose_notification
from gateway.letters.requests import open_paragraph
from gateway.outbound.worker import enqueue
from gateway.pipeline.context import Services
from gateway.pipeline.conversation import (
    ACK_KIND,
    cap_notice,
    deadline_phrase,
    open_requests,
)
from gateway.pipeline.timed import Looks, run_timed
from gateway.store import core, promises
from gateway.store.db import read_only, session_scope
from gateway.store.models import BundleItem, Message, Outbox, Ticket
from gateway.store.queries import add_event

__all__ = ["BundleWorker"]

log = logging.getLogger("gateway.bundle")

#: How long the loop sleeps at most between looks (new rows also wake it).
IDLE = 30.0

# The loop's two reads, prebuilt (gateway/store/core.py): they run at every look, and an ORM
# select costs five times the CPU of a prebuilt Core one.
_item = core.table(BundleItem)
_DUE = (
    sa_select(_item.c.purpose, _item.c.recipient, _item.c.customer_id)
    .where(_item.c.state == "waiting", _item.c.due_at <= bindparam("now"))
    .distinct()
)
_NEXT = sa_select(func.min(_item.c.due_at)).where(_item.c.state == "waiting")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class BundleWorker:
    """Sends the bundled acknowledgements and notifications whose window has closed."""

    def __init__(self, engine: Engine, services: Services) -> None:
        self.engine = engine
        self.services = services
        self.after_batch: Callable[[], None] | None = None
        self.sent = 0
        # Reads only: on SQLite a deferred BEGIN, never the write lock (gateway/store/db.py).
        self._reader = read_only(engine)
        #: When the loop looks next on its own: a new item due later needs no wake.
        self.looks = Looks()

    # -- the loop ------------------------------------------------------------------------

    def _due(self, now: datetime) -> list[tuple[str, str, int | None]]:
        with self._reader.connect() as conn:
            rows = conn.execute(_DUE, {"now": now}).all()
        return [(p, r, c) for p, r, c in rows]

    def next_due(self) -> datetime | None:
        with self._reader.connect() as conn:
            value: datetime | None = conn.execute(_NEXT).scalar()
        return _aware(value) if value is not None else None

    def run_once_sync(self) -> int:
        """Send every bundle due now; returns how many bundles were handled."""
        done = 0
        for purpose, recipient, customer in self._due(self.services.clock.now()):
            try:
                with session_scope(self.engine) as s:
                    self.send(s, purpose, recipient, customer)
            except Exception:  # one bad bundle must not stop the others
                log.exception("bundle %s to %s failed", purpose, recipient)
            done += 1
        if done and self.after_batch is not None:
            self.after_batch()
        self.sent += done
        return done

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    async def run(self, stopping: asyncio.Event, wakeup: asyncio.Event) -> None:
        await run_timed(
            "bundle",
            self.run_once,
            self.next_due,
            self.services.clock,
            stopping,
            wakeup,
            IDLE,
            self.looks,
        )

    # -- one bundle ----------------------------------------------------------------------

    def send(self, s: Session, purpose: str, recipient: str, customer: int | None) -> str:
        """Send one bundle: ``purpose`` to ``recipient`` about ``customer``'s mails."""
        now = self.services.clock.now()
        items = list(
            s.exec(
                select(BundleItem)
                .where(
                    BundleItem.purpose == purpose,
                    BundleItem.recipient == recipient,
                    (
                        col(BundleItem.customer_id).is_(None)
                        if customer is None
                        else col(BundleItem.customer_id) == customer
                    ),
                    BundleItem.state == "waiting",
                    col(BundleItem.due_at) <= now,
                )
                .order_by(col(BundleItem.id))
                .with_for_update()
            ).all()
        )
        if not items:
            return "nothing"
        rows: list[tuple[BundleItem, Ticket, Message]] = []
        for item in items:
            t = s.get(Ticket, item.ticket_id)
            m = s.get(Message, item.message_id)
            if t is not None and m is not None:
                rows.append((item, t, m))
        if purpose == "ack":
            outcome = self._ack(s, recipient, rows, now)
        else:
            outcome = self._notify(s, recipient, rows, now)
        for item in items:
            item.state = "capped" if outcome.startswith("capped") else "sent"
            item.sent_at = now
            item.outcome = outcome
            s.add(item)
        return outcome

    def _acks_today(self, s: Session, to: str, now: datetime) -> int:
        import json

        n = s.exec(
            select(func.count())
            .select_from(Outbox)
            .where(
                Outbox.kind == ACK_KIND,
                Outbox.rcpt_tos == json.dumps([to]),
                col(Outbox.created_at) >= now - timedelta(hours=24),
            )
        ).one()
        return int(n)

    def _ack(
        self, s: Session, to: str, rows: list[tuple[BundleItem, Ticket, Message]], now: datetime
    ) -> str:
        settings = self.services.settings
        rules = self.services.rules
        cap = settings.outbound.daily_ack_cap
        if not rows:
            return "nothing"
        sent_today = self._acks_today(s, to, now)
        if sent_today >= cap:
            why = (
                f"daily cap of {cap} acknowledgements to {to} reached; the last one told the "
                f"customer that further mails are filed without confirmation"
            )
            for _item, t, m in rows:
                add_event(s, t.id, "ack-suppressed", why, now, message_id=m.id)
            return f"capped: {why}"
        customer = rows[-1][1].customer_id
        reqs = open_requests(s, customer) if customer is not None else []
        _item, last_t, last_m = rows[-1]
        assert last_t.id is not None
        # The customer's language and brand: those of the latest ticket (gateway.letters).
        default = settings.outbound.default_language
        lang = last_t.language or default
        letter = letters.load("bundled", lang, settings.templates_path, default_language=default)
        notice = ""
        if sent_today + 1 >= cap:
            capl = letters.load("cap", lang, settings.templates_path, default_language=default)
            notice = cap_notice(s, rules, customer, cap, capl)
        mails = [BundledMail(item.how, t, m.subject, _aware(m.at)) for item, t, m in rows]
        raw, message_id, subject, text = compose_bundled_ack(
            mails=mails,
            open_requests=open_paragraph(reqs, rules, letter, "open_head"),
            notice=notice,
            rules=rules,
            me=identity(settings, rules, last_t.brand),
            to=to,
            signer=self.services.signer,
            now=now,
            letter=letter,
            parent=last_m.message_id,
        )
        enqueue(
            s,
            ticket_id=last_t.id,
            kind=ACK_KIND,
            raw=raw,
            message_id=message_id,
            rcpt_tos=[to],
            now=now,
            mail_from="",  # automatic mail: null reverse-path (RFC 3834 §3.3)
            from_address=identity(settings, rules, last_t.brand).from_address,
            subject=subject,
            text=text,
            in_reply_to=last_m.message_id,
            references=last_m.message_id or "",
        )
        for item, t, m in rows:
            if item.how == "new":
                t.acknowledged = True
                s.add(t)
                if t.first_response_due is not None and t.id is not None:
                    # What the bundle says of this ticket's first answer is a promise like
                    # any acknowledgement's (gateway/store/promises.py): recorded, enforced.
                    owner = rules.people.get(t.owner)
                    promises.record(
                        s,
                        ticket_id=t.id,
                        made_at=now,
                        to=to,
                        person=t.owner,
                        message_id=message_id,
                        what=f"first answer from {owner.name if owner else t.owner} by "
                        f"{isoz(t.first_response_due)}",
                        clock="first_response",
                        due=t.first_response_due,
                    )
            add_event(
                s, t.id, "ack-sent",
                f"bundled acknowledgement {message_id} queued to {to}, covering "
                f"{len(rows)} mail(s); {t.ref}: {deadline_phrase(t, rules)}",
                now, message_id=m.id,
            )  # fmt: skip
        return f"sent {message_id} covering {len(rows)}"

    def _notify(
        self, s: Session, person_id: str, rows: list[tuple[BundleItem, Ticket, Message]],
        now: datetime,
    ) -> str:  # fmt: skip
        settings = self.services.settings
        rules = self.services.rules
        person = rules.people.get(person_id)
        if person is None or not rows:
            for _item, t, m in rows:
                add_event(s, t.id, "notify-skipped", f"{person_id!r} is not a person in rules/",
                          now, message_id=m.id)  # fmt: skip
            return "nothing"
        mails = [
            BundledMail(
                item.how, t, m.subject, _aware(m.at), m.from_address or m.mail_from, m.text or ""
            )
            for item, t, m in rows
        ]
        subject, body = compose_bundled_notification(
            mails=mails,
            rules=rules,
            window=settings.outbound.ack_window,
            from_address=settings.outbound.from_address,
            letter=letters.load("staff", "en", settings.templates_path),
        )
        last_t = rows[-1][1]
        assert last_t.id is not None
        raw, mid = compose_notification(
            to_address=person.email,
            to_name=person.name,
            subject=subject,
            body=body,
            from_address=settings.outbound.from_address,
            from_name=settings.outbound.from_name,
            signer=self.services.signer,
            hostname=settings.smtp.hostname,
            now=now,
            ticket_id=last_t.id,
            person=person.id,
        )
        enqueue(
            s,
            ticket_id=last_t.id,
            kind="notification",
            raw=raw,
            message_id=mid,
            rcpt_tos=[person.email],
            now=now,
            from_address=settings.outbound.from_address,
            subject=subject,
            text=body,
        )
        for _item, t, m in rows:
            add_event(
                s, t.id, "owner-notified",
                f"notification {mid} queued to {person.name} <{person.email}> with the full "
                f"text of {len(rows)} bundled mail(s)",
                now, message_id=m.id,
            )  # fmt: skip
        return f"sent {mid} covering {len(rows)}"
