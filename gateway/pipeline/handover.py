"""The handover pack: whoever receives a ticket gets its whole history (docs/decisions.md D11, item
6).

A reassignment or escalation mail used to carry only the customer's last message: the new
holder had no original request, no attachments, no earlier staff answers, and the person who
lost the ticket was not told. That is the "log in to read it" failure of the seeds in another
form (docs/design.md §0): a person is made accountable without what they need to act. So whoever
receives a ticket, by ``#assign`` (``gateway.pipeline.staff``) or by an escalation ladder
``assign`` step (``gateway.escalation.escalator``), gets one letter built here:

- why they have it (who assigned it, or which deadline was missed), the ticket summary and
  the running deadlines as stored (what the escalator enforces);
- **every message in order**: the customer's messages in full, staff answers marked
  ``STAFF ANSWER`` (the text the customer actually received), internal notes marked
  ``INTERNAL NOTE`` (quoted notification and command lines removed), staff commands,
  automatic mail to and from the customer as one line each. Notifications between staff
  are left out: they repeat the history;
- **every attachment once**: the same file sent twice (the customer re-sending a photo, staff
  forwarding it back) is attached once and the later message says "same file as in message
  N"; attachments beyond ``outbound.notify_attachment_limit`` are listed, not attached;
- ``Reply-To`` = the new holder's signed per-person token, so they answer or command by
  replying (as with the owner's notification, ``gateway.pipeline.notify``).

The previous holder gets a short "now held by X" letter (when there was one and it is
someone else; an actor who reassigns their own ticket learns it from the command
confirmation instead). Both go to the transactional outbox (null sender, RFC 3834 §3.3) in
the caller's transaction; nothing is sent from here.

``history`` reads the database; ``compose_handover_letter`` is pure (history in, bytes out);
``compose_handover`` does both and writes the outbox rows and one ``handover`` event.
"""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import Sequence
from datetime import datetime
from email.message import Message as MimeMessage
from email.utils import parseaddr

from sqlmodel import Session, col, select

from gateway.letters import templates as letters
from gateway.letters.handover import (
    Entry,
    compose_handover_letter,
    compose_previous_holder_letter,
)
from gateway.outbound.worker import Queued, enqueue, notify_owner
from gateway.pipeline.commands import help_text, parse_commands
from gateway.pipeline.notify import attachment_parts
from gateway.pipeline.quoting import strip_quoted
from gateway.routing.model import Person, Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.clocks import utc
from gateway.store.models import Message, Ticket
from gateway.store.queries import add_event

__all__ = [
    "Entry",
    "compose_handover",
    "compose_handover_letter",
    "compose_previous_holder_letter",
    "history",
]

#: How stored messages are read back (the pipeline's own parse policy: CRLF, modern API).
_PARSE_POLICY = email.policy.default.clone(linesep="\r\n")

#: Message kinds shown with their full text, and the `label_*` phrase that marks each
#: (gateway/templates/handover.en.txt).
_FULL = {
    ("in", "customer"): "customer",
    ("out", "staff_reply"): "staff_answer",
    ("in", "note"): "note",
    ("out", "customer_notice"): "notice",
}
#: Kinds shown as one line (automatic mail: its text adds nothing a person must read).
_ONE_LINE = {
    ("out", "ack"): "ack",
    ("in", "auto_reply"): "auto_reply",
    ("in", "bounce"): "bounce",
}
# Left out: ("in", "staff_reply") is the staff mail whose relayed copy ("out", "staff_reply")
# is shown; notifications, escalations and confirmations are mail between staff.


def _parse(raw: bytes) -> MimeMessage | None:
    try:
        return email.message_from_bytes(raw, policy=_PARSE_POLICY)
    except Exception:  # a stored message we cannot parse still appears, without files
        return None


def _person_name(rules: Rules, address: str) -> str:
    """The person's name, else the address ("" when there is none: the letter says so)."""
    address = (address or "").lower()
    for person in rules.people.values():
        if person.email.lower() == address:
            return person.name
    return address


def _entry(m: Message, rules: Rules) -> Entry | None:
    key = (m.direction, m.kind)
    at = utc(m.at) or m.at
    if key in _ONE_LINE:
        who = m.from_address or m.mail_from or ""
        if m.direction == "out":
            who = ", ".join(json.loads(m.to or "[]"))
        return Entry(at, _ONE_LINE[key], {"who": who}, m.subject, None)
    if key not in _FULL:
        return None
    mime = _parse(m.raw)
    parts = tuple(attachment_parts(mime)) if mime is not None else ()
    text = (m.text or "").strip()
    facts: dict[str, str] = {}
    kind = _FULL[key]
    if key == ("in", "customer"):
        facts["who"] = m.from_address or m.mail_from or ""
    elif key == ("out", "staff_reply"):
        # The relayed copy is From "<Person> via <support name>": its author is the person.
        display = parseaddr(str(mime["From"] or ""))[0] if mime is not None else ""
        facts["author"] = display.split(" via ", 1)[0] if display else ""
    elif key == ("in", "note"):
        facts["author"] = _person_name(rules, m.from_address)
        commands, rest, _errors = parse_commands(text)
        text = strip_quoted(rest).strip()
        facts["commands"] = " ".join(c.describe() for c in commands if c.name != "note")
        if not text and not parts:
            if not facts["commands"]:
                return None  # nothing but the quoted notification
            return Entry(at, "commands", facts, m.subject, None)
        if facts["commands"]:
            kind = "note_commands"
    return Entry(at, kind, facts, m.subject, text, parts)


def history(session: Session, ticket_id: int, rules: Rules) -> list[Entry]:
    """The ticket's messages, oldest first, as handover entries."""
    rows = session.exec(
        select(Message)
        .where(Message.ticket_id == ticket_id)
        .order_by(col(Message.at), col(Message.id))
    ).all()
    out: list[Entry] = []
    for m in rows:
        entry = _entry(m, rules)
        if entry is not None:
            out.append(entry)
    return out


def compose_handover(
    session: Session,
    ticket: Ticket,
    new_holder: Person,
    previous_holder: Person | None,
    reason: str,
    *,
    rules: Rules,
    settings: Settings,
    signer: Signer,
    now: datetime,
    subject: str | None = None,
    notes: Sequence[str] = (),
    actor: Person | None = None,
    kind: str = "notification",
    told: str | None = None,
) -> list[Queued]:
    """Queue the handover pack to `new_holder` and the "now held by" letter to
    `previous_holder`; returns what was queued (see the module docstring).

    `actor` is whoever caused the change (``#assign`` by a person; None for the escalator):
    no pack to an actor who took the ticket themselves, no "now held by" letter to an actor
    who gave their own ticket away (the command confirmation says so). `told` is why, in
    words for the previous holder (default: `reason`).
    """
    assert ticket.id is not None
    rows: list[Queued] = []
    out = settings.outbound
    calendar: BusinessCalendar | None = None
    try:
        calendar = rules.calendar_for_policy(ticket.sla)
    except KeyError:
        calendar = None
    did: list[str] = []
    staff = letters.load("staff", "en", settings.templates_path)
    if actor is None or actor.id != new_holder.id:
        entries = history(session, ticket.id, rules)
        raw, mid, subj, text, attached = compose_handover_letter(
            ticket=ticket,
            new_holder=new_holder,
            previous_holder=previous_holder,
            reason=reason,
            notes=notes,
            entries=entries,
            calendar=calendar,
            subject=subject
            or staff.phrase("handover_subject", ref=ticket.ref, subject=ticket.subject),
            from_address=out.from_address,
            from_name=out.from_name,
            signer=signer,
            hostname=settings.smtp.hostname,
            now=now,
            attachment_limit=out.notify_attachment_limit,
            letter=letters.load("handover", "en", settings.templates_path),
            staff=staff,
            commands=help_text(),  # generated from the command registry
        )
        rows.append(
            enqueue(
                session,
                ticket_id=ticket.id,
                kind=kind,
                raw=raw,
                message_id=mid,
                rcpt_tos=[new_holder.email],
                now=now,
                mail_from="",  # automatic mail: null reverse-path (RFC 3834 §3.3)
                from_address=out.from_address,
                subject=subj,
                text=text,
            )
        )
        did.append(
            f"handover pack {mid} to {new_holder.name} <{new_holder.email}>: "
            f"{len(entries)} message(s), {attached} file(s) attached"
        )
    if (
        previous_holder is not None
        and previous_holder.id != new_holder.id
        and (actor is None or actor.id != previous_holder.id)
    ):
        subj, body = compose_previous_holder_letter(
            ticket=ticket, new_holder=new_holder, reason=told or reason, staff=staff
        )
        rows.append(
            notify_owner(
                session,
                settings,
                signer,
                ticket=ticket,
                email=previous_holder.email,
                name=previous_holder.name,
                person=previous_holder.id,
                subject=subj,
                body=body,
                now=now,
            )
        )
        did.append(f"{previous_holder.name} told it is now held by {new_holder.name}")
    if did:
        add_event(session, ticket.id, "handover", "; ".join(did), now)
    return rows
