"""Customer notices: queue the mail of a broken promise or a late-processed ticket.

The words and the mail are composed in :mod:`gateway.letters.notice` (docs/templates.md);
`queue_customer_mail` writes it to the outbox in the caller's transaction (docs/design.md
§6), threaded under the customer's last message.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from gateway.letters.brands import identity
from gateway.letters.notice import (
    Broken,
    broken_promise_text,
    commitment_text,
    compose_customer_mail,
    late_text,
    notice_text,
    ticket_letter,
)
from gateway.outbound.worker import enqueue
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.store.models import Message, Ticket

__all__ = [
    "Broken",
    "broken_promise_text",
    "commitment_text",
    "late_text",
    "notice_text",
    "queue_customer_mail",
    "ticket_letter",
]


def queue_customer_mail(
    session: Session,
    settings: Settings,
    signer: Signer,
    ticket: Ticket,
    text: str,
    now: datetime,
    last: Message | None,
    *,
    kind: str = "customer_notice",
    tag: str = "notice",
    to: str | None = None,
    rules: Rules | None = None,
) -> str:
    """Queue `text` to the requester (or `to`) From the ticket's brand; returns the
    Message-ID."""
    assert ticket.id is not None
    me = identity(settings, rules, ticket.brand)
    rcpt = to or ticket.requester
    raw, message_id, subject = compose_customer_mail(
        me=me,
        signer=signer,
        ticket_id=ticket.id,
        ref=ticket.ref,
        ticket_subject=ticket.subject,
        to=rcpt,
        text=text,
        now=now,
        parent=last.message_id if last is not None else None,
        references=last.references.split() if last is not None else (),
        tag=tag,
    )
    enqueue(
        session,
        ticket_id=ticket.id,
        kind=kind,
        raw=raw,
        message_id=message_id,
        rcpt_tos=[rcpt],
        now=now,
        from_address=me.from_address,
        subject=subject,
        text=text,
        in_reply_to=last.message_id if last is not None else None,
    )
    return message_id
