"""The handover letters (docs/staff-email.md "Handover"): the pack to whoever receives a
ticket, with its whole history and every attachment once, and the short "now held by X"
letter to whoever lost it.

Pure: the history comes in as :class:`Entry` rows (read by ``gateway.pipeline.handover``,
which also writes the outbox rows), the bytes come out. English (staff letters,
docs/templates.md): the subject, the "now held by" letter and the footer are
``staff.en.txt`` phrases; ``Reply-To`` is the new holder's signed per-person token
(docs/design.md §5), ``Auto-Submitted: auto-generated`` (RFC 3834 §5.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.letters import headers
from gateway.letters import templates as letters
from gateway.letters.facts import isoz
from gateway.letters.i18n import describe_size
from gateway.letters.notification import Part, add_parts, deadline_lines
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer

if TYPE_CHECKING:
    from gateway.routing.model import Person
    from gateway.sla.business_time import BusinessCalendar
    from gateway.store.models import Ticket

__all__ = ["Entry", "compose_handover_letter", "compose_previous_holder_letter"]


@dataclass(frozen=True)
class Entry:
    """One message of the history: how it is marked (the ``label_<kind>`` phrase of
    handover.en.txt, with ``facts`` such as its author), its subject, text and files."""

    at: datetime
    kind: str  # customer, staff_answer, note, note_commands, commands, notice, ack, ...
    facts: Mapping[str, str]
    subject: str
    text: str | None  # None: shown as one line
    parts: tuple[Part, ...] = field(default=())


#: Facts that may be empty, and the phrase said instead.
_UNKNOWN = {"who": "unknown_sender", "author": "unknown_author"}


def _label(letter: Letter, entry: Entry) -> str:
    facts = {
        k: (v or letter.phrase(_UNKNOWN[k]) if k in _UNKNOWN else v) for k, v in entry.facts.items()
    }
    return letter.phrase(f"label_{entry.kind}", **facts)


def _files(
    letter: Letter, entries: Sequence[Entry], limit: int
) -> tuple[list[Part], dict[int, list[str]]]:
    """Each distinct file once (by content), attached while the total stays within `limit`;
    returns what to attach and, per entry index, the lines describing its files."""
    first_seen: dict[str, int] = {}
    attach: list[Part] = []
    total = 0
    lines: dict[int, list[str]] = {}
    for i, entry in enumerate(entries):
        for part in entry.parts:
            digest = hashlib.sha256(part.data).hexdigest()
            size = describe_size(len(part.data))
            name = part.filename
            if digest in first_seen:
                n = first_seen[digest] + 1
                line = letter.phrase("file_same", name=name, size=size, n=n)
            elif total + len(part.data) <= limit:
                first_seen[digest] = i
                attach.append(part)
                total += len(part.data)
                line = letter.phrase("file_attached", name=name, size=size)
            else:
                first_seen[digest] = i
                limit_text = describe_size(limit)
                line = letter.phrase("file_not_attached", name=name, size=size, limit=limit_text)
            lines.setdefault(i, []).append(line)
    return attach, lines


def compose_handover_letter(
    *,
    ticket: Ticket,
    new_holder: Person,
    previous_holder: Person | None,
    reason: str,
    notes: Sequence[str],
    entries: Sequence[Entry],
    calendar: BusinessCalendar | None,
    subject: str,
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    attachment_limit: int,
    letter: Letter | None = None,
    staff: Letter | None = None,
    commands: str = "",
) -> tuple[bytes, str, str, str, int]:
    """The handover pack: (unsigned bytes, Message-ID, subject, text body, files attached).
    ``letter`` is ``handover.en.txt`` (or its override), ``staff`` is ``staff.en.txt``."""
    assert ticket.id is not None
    local, domain = headers.split_address(from_address)
    message_id = signer.message_id(hostname, ticket.id, "handover")
    letter = letter or letters.load("handover")
    staff = staff or letters.load("staff")
    was = ""
    if previous_holder is not None and previous_holder.id != new_holder.id:
        was = letter.phrase("was", name=previous_holder.name)
    attach, file_lines = _files(letter, entries, attachment_limit)
    blocks: list[str] = []
    for i, e in enumerate(entries):
        head = letter.phrase(
            "entry_head", n=i + 1, total=len(entries), at=isoz(e.at), label=_label(letter, e)
        )
        subject_line = letter.phrase(
            "entry_subject", subject=e.subject or letter.phrase("no_subject")
        )
        if e.text is None:
            blocks.append(f"{head}\n{subject_line}")
            continue
        body = f"{head}\n{subject_line}\n\n{e.text or letter.phrase('entry_no_text')}"
        if i in file_lines:
            body += "\n\n" + letter.phrase("entry_files") + "\n" + "\n".join(file_lines[i])
        blocks.append(body)
    distinct = len({hashlib.sha256(p.data).digest() for e in entries for p in e.parts})
    n = len(entries)
    facts = {
        "reason": reason.strip(),
        "notes": "\n".join(letter.phrase("note", note=note) for note in notes),
        "ref": ticket.ref,
        "status": ticket.status,
        "subject": ticket.subject,
        "requester": ticket.requester,
        "owner": f"{new_holder.name} <{new_holder.email}>" + (f" {was}" if was else ""),
        "queue": ticket.queue,
        "priority": ticket.priority,
        "deadlines": "\n".join(deadline_lines(ticket, calendar, staff)),
        "messages": letter.phrase("one_message") if n == 1 else letter.phrase("messages", count=n),
        "distinct": str(distinct),
        "attached": str(len(attach)),
        "history": "\n\n".join(blocks) if blocks else letter.phrase("no_messages"),
        "footer": staff.phrase(
            "reply_footer",
            requester=ticket.requester,
            from_address=from_address,
            commands=commands,
        ),
    }
    # The messages are placed as they were written: no collapsing of their blank lines.
    text = letters.render(letter, facts, verbatim=("history",))
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.format_address(from_name, from_address),
        to=headers.format_address(new_holder.name, new_holder.email),
        subject=subject,
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_GENERATED,  # RFC 3834 §5.1: a notice, not a reply
        loop=signer.installation_id(),  # one value for every node
    )
    msg["Reply-To"] = signer.reply_address(local, domain, ticket.id, new_holder.id)
    msg.set_content(text)
    add_parts(msg, attach)
    return headers.as_bytes(msg), message_id, subject, text, len(attach)


def compose_previous_holder_letter(
    *, ticket: Ticket, new_holder: Person, reason: str, staff: Letter | None = None
) -> tuple[str, str]:
    """The "now held by X" letter to whoever lost the ticket: (subject, body)."""
    staff = staff or letters.load("staff")  # gateway/templates/staff.en.txt
    holder = new_holder.name
    subject = staff.phrase("held_subject", ref=ticket.ref, holder=holder, subject=ticket.subject)
    body = (
        staff.phrase(
            "held_body",
            ref=ticket.ref,
            subject=ticket.subject,
            requester=ticket.requester,
            holder=holder,
            holder_email=new_holder.email,
            reason=reason.strip(),
        )
        + "\n"
    )
    return subject, body
