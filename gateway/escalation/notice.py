"""Customer notices: the words of a broken promise, of a late-processed ticket, and the mail.

Pure text builders (`broken_promise_text`, `late_text`) take what the plan says
(`gateway.sla.plan.Commitment`) and never add a person or a time of their own: with no next
ladder step the text names who stays responsible and promises no time (issue 11, "No silence
after a broken promise"). `queue_customer_mail` writes the mail to the outbox in the
caller's transaction, threaded under the customer's last message, marked automatic
(RFC 3834 §5: Auto-Submitted: auto-generated) so well-behaved responders stay quiet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from sqlmodel import Session

from gateway.letters import i18n
from gateway.letters import templates as letters
from gateway.letters.brands import identity
from gateway.letters.templates import Letter
from gateway.outbound.compose import LOOP_HEADER, tagged_subject
from gateway.outbound.worker import enqueue
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.plan import Commitment
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

#: What each clock promised, in the customer's words: the phrase of common.<lang>.txt.
WHAT = {
    "first_response": "what_first_response",
    "next_response": "what_next_response",
    "resolution": "what_resolution",
}


@dataclass(frozen=True)
class Broken:
    """One promise the notice owns up to: what was promised, by when, and by whom (None:
    the policy's own deadline, no person was named for it)."""

    clock: str
    due: datetime
    person_name: str | None = None


def commitment_text(
    ref: str, commitment: Commitment, calendar: BusinessCalendar, letter: Letter | None = None
) -> str:
    """The next real commitment, in words: only what the plan will do."""
    letter = letter or letters.load("notice")
    who = commitment.person.name
    if commitment.by is None:
        # Ladder exhausted: name who stays accountable, invent no time.
        return letter.phrase("commitment_none", who=who, ref=ref)
    by = i18n.format_local(commitment.by, calendar, letter.lang)
    text = letter.phrase("commitment_by", who=who, ref=ref, by=by)
    if commitment.then is not None:
        text += " " + letter.phrase("commitment_then", who=who, then=commitment.then.name)
    return text


def broken_promise_text(
    broken: list[Broken],
    ref: str,
    commitment: Commitment,
    calendar: BusinessCalendar,
    signature: str,
    letter: Letter | None = None,
    business_name: str = "",
) -> str:
    """One notice for every promise broken at (about) this moment (notice.<lang>.txt)."""
    letter = letter or letters.load("notice")
    owned: list[str] = []
    for b in broken:
        when = i18n.format_local(b.due, calendar, letter.lang)
        if b.person_name:
            owned.append(letter.phrase("owned_person", person=b.person_name, when=when))
        else:
            what = letter.phrase(WHAT[b.clock])
            owned.append(letter.phrase("owned_clock", what=what, when=when))
    said = f"; {letter.phrase('and')} ".join(owned)
    facts = {
        "said": said[:1].upper() + said[1:],
        "commitment": commitment_text(ref, commitment, calendar, letter),
        "hours": i18n.describe_hours(calendar, letter.lang),
        "ref": ref,
        "signature": signature,
        "business_name": business_name or signature,
    }
    return letters.render(letter, facts)


def late_text(
    ref: str,
    received_at: datetime,
    processed_at: datetime,
    missed: list[Broken],
    commitment: Commitment,
    calendar: BusinessCalendar,
    signature: str,
    letter: Letter | None = None,
    business_name: str = "",
) -> str:
    """The one message of a ticket processed after its own deadlines (issue 11 finding 8):
    when it arrived, that it was processed late, who owns it now and the real next time."""
    letter = letter or letters.load("late")
    lang = letter.lang
    missed_text = "; ".join(
        letter.phrase(
            "missed_item",
            what=letter.phrase(WHAT[b.clock]),
            when=i18n.format_local(b.due, calendar, lang),
        )
        for b in missed
    )
    facts = {
        "received": i18n.format_local(received_at, calendar, lang),
        "processed": i18n.format_local(processed_at, calendar, lang),
        "missed": missed_text,
        "commitment": commitment_text(ref, commitment, calendar, letter),
        "hours": i18n.describe_hours(calendar, lang),
        "ref": ref,
        "signature": signature,
        "business_name": business_name or signature,
    }
    return letters.render(letter, facts)


def ticket_letter(settings: Settings, ticket: Ticket, name: str) -> Letter:
    """The letter ``name`` in the ticket's language, an admin's override winning."""
    default = settings.outbound.default_language
    return letters.load(
        name, ticket.language or default, settings.templates_path, default_language=default
    )


def notice_text(
    settings: Settings,
    rules: Rules,
    ticket: Ticket,
    broken: list[Broken],
    commitment: Commitment,
    calendar: BusinessCalendar,
) -> str:
    """The broken-promise notice of ``ticket`` in its language, signed by its brand."""
    me = identity(settings, rules, ticket.brand)
    letter = ticket_letter(settings, ticket, "notice")
    return broken_promise_text(
        broken, ticket.ref, commitment, calendar, me.signature, letter, me.business_name
    )


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
    reply_to = signer.reply_address(me.reply_local, me.reply_domain, ticket.id)
    message_id = signer.message_id(me.message_id_domain, ticket.id, tag)
    subject = tagged_subject(ticket.ref, ticket.subject)
    rcpt = to or ticket.requester
    msg = EmailMessage(policy=SMTP)
    sender = formataddr((me.from_name, me.from_address)) if me.from_name else me.from_address
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = message_id
    msg["Reply-To"] = reply_to
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
    msg["X-Auto-Response-Suppress"] = "All"
    msg[LOOP_HEADER] = signer.installation_id()  # the same on every node
    if last is not None and last.message_id:
        msg["In-Reply-To"] = last.message_id
        refs = [r for r in last.references.split() if r != last.message_id]
        msg["References"] = " ".join([*refs[-10:], last.message_id])
    msg.set_content(text)
    enqueue(
        session,
        ticket_id=ticket.id,
        kind=kind,
        raw=msg.as_bytes(policy=SMTP),
        message_id=message_id,
        rcpt_tos=[rcpt],
        now=now,
        from_address=me.from_address,
        subject=subject,
        text=text,
        in_reply_to=last.message_id if last is not None else None,
    )
    return message_id
