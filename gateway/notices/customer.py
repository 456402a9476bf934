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
from gateway.sla.deadlines import isoz
from gateway.sla.plan import Commitment
from gateway.store.models import Message, Ticket

__all__ = [
    "Broken",
    "broken_promise_text",
    "commitment_text",
    "late_text",
    "notice_text",
    "promised",
    "queue_customer_mail",
    "responsible",
    "ticket_letter",
]


def promised(commitment: Commitment) -> str:
    """What a notice promises, as its promise row records it (the escalator keeps it)."""
    who = commitment.person.name
    if commitment.by is None:
        return f"{who} stays responsible (no time promised)"
    return f"answer from {who} by {isoz(commitment.by)}"


def responsible(commitment: Commitment) -> str:
    """The same for the audit trail: who is responsible, and by when if a time was given."""
    by = commitment.by
    when = f", next answer by {isoz(by)}" if by is not None else ", no time promised"
    then = f"; then {commitment.then.name}" if commitment.then else ""
    return f"{commitment.person.name} responsible{when}{then}"


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
