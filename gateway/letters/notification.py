"""Letters to staff: the plain notice (``compose_notification``, used for escalations,
confirmations, alerts, "now held by") and the owner notification of a new ticket or a
customer writing again (``compose_owner_notification``, ``notify.en.txt``).

Pure: everything is passed in, the RFC 5322 bytes come out; the caller writes them to the
outbox (docs/design.md §6). Every staff letter carries ``Auto-Submitted: auto-generated``
(RFC 3834 §5.1: a notice, not a reply), our loop header, a signed Message-ID and, for a
ticket, ``Reply-To`` = the person's signed token address, so an answer lands in the ticket
and the staff stage can check who wrote it (docs/design.md §5). Staff letters are English
(docs/templates.md); their wording is ``notify.en.txt`` and ``staff.en.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.letters import headers, i18n
from gateway.letters import templates as letters
from gateway.letters.facts import isoz, when
from gateway.letters.mime import Draft
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer

if TYPE_CHECKING:
    from gateway.routing.model import Person
    from gateway.sla.business_time import BusinessCalendar
    from gateway.store.models import Ticket

__all__ = [
    "Part",
    "add_parts",
    "compose_notification",
    "compose_owner_notification",
    "deadline_lines",
]


@dataclass(frozen=True)
class Part:
    """One attachment, decoded."""

    filename: str
    content_type: str
    data: bytes


def add_parts(msg: Draft, parts: Sequence[Part]) -> None:
    """Attach ``parts`` to ``msg`` (which already has its text body)."""
    for part in parts:
        maintype, _, subtype = part.content_type.partition("/")
        if maintype.lower() in ("text", "message", "multipart"):
            # Keep the bytes as they came (charset unknown here): attach as octets. A message
            # or multipart may not be base64 encoded (RFC 2046 §5.1, §5.2).
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(
            part.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=part.filename,
        )


def deadline_lines(ticket: Ticket, calendar: BusinessCalendar | None, staff: Letter) -> list[str]:
    """The running deadlines as STORED on the ticket (what the escalator enforces), in the
    words of ``staff`` (staff.en.txt)."""
    lines: list[str] = []
    if ticket.status == "waiting":
        lines.append(staff.phrase("deadlines_paused"))
    if ticket.first_response_due is not None and ticket.first_responded_at is None:
        lines.append(staff.phrase("due_first", when=when(ticket.first_response_due, calendar)))
    if ticket.next_response_due is not None:
        lines.append(staff.phrase("due_next", when=when(ticket.next_response_due, calendar)))
    if ticket.resolution_due is not None and ticket.status != "closed":
        lines.append(staff.phrase("due_resolution", when=when(ticket.resolution_due, calendar)))
    return lines or [staff.phrase("deadlines_none")]


def compose_notification(
    *,
    to_address: str,
    to_name: str,
    subject: str,
    body: str,
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    ticket_id: int | None,
    person: str | None = None,
    in_reply_to: str | None = None,
) -> tuple[bytes, str]:
    """A notice to staff (kind notification): (unsigned bytes, Message-ID).

    ``Auto-Submitted: auto-generated`` (RFC 3834 §5.1: not a reply to any one message). The
    Reply-To is the staff person's signed token address, so an answer lands in the ticket.
    """
    message_id = signer.message_id(hostname, ticket_id, "notice")
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.format_address(from_name, from_address),
        to=headers.format_address(to_name, to_address),
        subject=headers.clean_subject(subject),
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_GENERATED,
        loop=signer.installation_id(),
    )
    if ticket_id is not None:
        local, domain = headers.split_address(from_address)
        msg["Reply-To"] = signer.reply_address(local, domain, ticket_id, person)
    headers.set_thread(msg, in_reply_to)
    msg.set_content(body.rstrip("\n") + "\n")
    return headers.as_bytes(msg), message_id


def compose_owner_notification(
    *,
    ticket: Ticket,
    owner: Person,
    new_ticket: bool,
    sender: str,
    sender_name: str,
    customer_subject: str,
    customer_text: str,
    received_at: datetime,
    parts: Sequence[Part],
    calendar: BusinessCalendar | None,
    warnings: Sequence[str],
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    attachment_limit: int,
    recipient: Person | None = None,
    why: str = "",
    unverified: str = "",
    references: Sequence[str] = (),
    letter: Letter | None = None,
    staff: Letter | None = None,
    commands: str = "",
) -> tuple[bytes, str, str, str]:
    """The notification to the owner: (unsigned bytes, Message-ID, subject, text body).

    `recipient` (default: the owner) is who gets it, with a reply token of their own; a
    route's ``notify`` list sends the very same notification to each person it names, with
    `why` saying so. ``unverified`` (why the From address is not proven) becomes the first
    line of the text, above everything else, so no owner answers a forged sender unawares.
    ``references`` are lines about tickets this mail named but could not join. ``letter``
    is ``notify.en.txt`` (or its override), ``staff`` is ``staff.en.txt``.
    """
    assert ticket.id is not None
    letter = letter or letters.load("notify")
    staff = staff or letters.load("staff")
    to = recipient or owner
    local, domain = headers.split_address(from_address)
    reply_to = signer.reply_address(local, domain, ticket.id, to.id)
    message_id = signer.message_id(hostname, ticket.id, "notify")
    subject = headers.tagged_subject(ticket.ref, ticket.subject)
    who = f"{sender_name} <{sender}>" if sender_name else sender
    headline = staff.phrase("notify_new" if new_ticket else "notify_again", ref=ticket.ref, who=who)
    total = sum(len(p.data) for p in parts)
    attach = bool(parts) and total <= attachment_limit
    files: list[str] = []
    if parts:
        noun = letter.phrase("noun_one" if len(parts) == 1 else "noun_many")
        size = i18n.describe_size(total)
        limit = i18n.describe_size(attachment_limit)
        files.append(
            letter.phrase("files_attached", count=len(parts), noun=noun, total=size)
            if attach
            else letter.phrase(
                "files_not_attached", count=len(parts), noun=noun, total=size, limit=limit
            )
        )
        files.extend(
            letter.phrase("file_line", name=p.filename, size=i18n.describe_size(len(p.data)))
            for p in parts
        )
    facts = {
        "unverified": letter.phrase("unverified", why=unverified, sender=sender)
        if unverified
        else "",
        "headline": headline,
        "why": why,
        "references": "\n\n".join(references),
        "warnings": "\n\n".join(letter.phrase("warning", warning=w) for w in warnings),
        "ref": ticket.ref,
        "status": ticket.status,
        "subject": ticket.subject,
        "requester": ticket.requester,
        "owner": f"{owner.name} <{owner.email}>",
        "queue": ticket.queue,
        "priority": ticket.priority,
        "deadlines": "\n".join(deadline_lines(ticket, calendar, staff)),
        "sender": who,
        "received": isoz(received_at),
        "message_subject": customer_subject or letter.phrase("no_subject"),
        "message": customer_text.strip() or letter.phrase("no_text"),
        "files": "\n".join(files),
        "footer": staff.phrase(
            "reply_footer",
            requester=ticket.requester,
            from_address=from_address,
            commands=commands,
        ),
    }
    # The customer's text is placed as it came: no collapsing of its blank lines.
    text = letters.render(letter, facts, verbatim=("message", "message_subject"))
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.format_address(from_name, from_address),
        to=f"{to.name} <{to.email}>" if to.name else to.email,
        subject=subject,
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_GENERATED,  # RFC 3834 §5.1: a notice, not a reply
        loop=signer.installation_id(),  # one value for every node
    )
    msg["Reply-To"] = reply_to
    msg.set_content(text)
    if attach:
        add_parts(msg, parts)
    return headers.as_bytes(msg), message_id, subject, text
