"""The bundled letters of one burst (docs/threading.md "Known customer writing again"):
ONE acknowledgement to the customer listing each further mail and where it went, and ONE
notification to the owner with each mail's full text.

Pure: the bundle worker (``gateway.pipeline.bundle``) reads the rows and passes them in;
this module returns the bytes. The acknowledgement is ``bundled.<lang>.txt`` in the
language of the latest ticket, From its brand; the notification is English
(``staff.en.txt``: ``bundled_*`` phrases), From the installation. Every owner and deadline
stated is the stored one (docs/templates.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.letters import headers, i18n
from gateway.letters import templates as letters
from gateway.letters.ack import html_text
from gateway.letters.brands import Identity
from gateway.letters.facts import calendar_of, deadline_phrase, isoz, owner_name
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer

if TYPE_CHECKING:
    from gateway.routing.model import Rules
    from gateway.store.models import Ticket

__all__ = ["BundledMail", "compose_bundled_ack", "compose_bundled_notification"]


@dataclass(frozen=True)
class BundledMail:
    """One mail of the burst: how it was filed (``new``, ``joined``, ``reply``), the ticket
    it went to, and the mail's own subject, time, sender and text."""

    how: str
    ticket: Ticket
    subject: str
    at: datetime
    sender: str = ""
    text: str = ""


def bundled_subject(mails: Sequence[BundledMail], letter: Letter) -> str:
    refs = sorted({m.ticket.ref for m in mails})
    n = len(mails)
    if len(refs) == 1:
        key = "subject_one" if n == 1 else "subject_many"
        return letter.phrase(key, ref=refs[0], count=n)
    return letter.phrase("subject_refs", count=n, refs=", ".join(refs))


def compose_bundled_ack(
    *,
    mails: Sequence[BundledMail],
    open_requests: str,
    notice: str,
    rules: Rules,
    me: Identity,
    to: str,
    signer: Signer,
    now: datetime,
    letter: Letter,
    parent: str | None,
) -> tuple[bytes, str, str, str]:
    """(unsigned bytes, Message-ID, subject, text) of the bundled acknowledgement; it
    answers ``parent`` (the latest mail's Message-ID) and replies land in the latest
    ticket."""
    last = mails[-1].ticket
    assert last.id is not None
    lang = letter.lang
    items = []
    for n, m in enumerate(mails, 1):
        t = m.ticket
        where = (
            letter.phrase("where_new", ref=t.ref)
            if m.how == "new"
            else letter.phrase("where_added", ref=t.ref, ticket_subject=t.subject)
        )
        cal = calendar_of(rules, t)
        items.append(
            letter.phrase(
                "item",
                n=n,
                subject=m.subject or letter.phrase("no_subject"),
                received=isoz(m.at),
                received_local=i18n.format_local(m.at, cal, lang) if cal else isoz(m.at),
                where=where,
                who=owner_name(rules, t),
                deadline=deadline_phrase(t, rules, letter),
                ref=t.ref,
            )
        )
    intro = (
        letter.phrase("intro_many", count=len(mails))
        if len(mails) > 1
        else letter.phrase("intro_one")
    )
    reply_to = signer.reply_address(me.reply_local, me.reply_domain, last.id)
    text = letters.render(
        letter,
        {
            "intro": intro,
            "items": "\n".join(items),
            "open_requests": open_requests,
            "notice": notice,
            "ref": last.ref,
            "count": str(len(mails)),
            "signature": me.signature,
            "business_name": me.business_name,
            "reply_address": reply_to,
        },
    )
    message_id = signer.message_id(me.message_id_domain, last.id, "ack")
    subject = bundled_subject(mails, letter)
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.brand_from(me),
        to=to,
        subject=subject,
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_REPLIED,  # RFC 3834 §5.2: answers the customer's mails
        loop=signer.installation_id(),
    )
    msg["Reply-To"] = reply_to
    headers.set_thread(msg, parent)
    msg.set_content(text)
    msg.add_alternative(html_text(text), subtype="html")
    return headers.as_bytes(msg), message_id, subject, text


def compose_bundled_notification(
    *,
    mails: Sequence[BundledMail],
    rules: Rules,
    window: str,
    from_address: str,
    letter: Letter,
) -> tuple[str, str]:
    """(subject, body) of the one notification to the owner for a burst; the caller sends
    it with :func:`gateway.letters.notification.compose_notification`."""
    sender = mails[-1].sender
    n = len(mails)
    parts = [
        letter.phrase(
            "bundled_intro", sender=sender, count=n, mails="mail" if n == 1 else "mails",
            window=window,
        )
    ]  # fmt: skip
    for i, m in enumerate(mails, 1):
        t = m.ticket
        key = {"new": "bundled_new", "reply": "bundled_reply"}.get(m.how, "bundled_added")
        owner = rules.people.get(t.owner)
        parts.append(
            letter.phrase(
                "bundled_item",
                n=i,
                where=letter.phrase(key, ref=t.ref),
                owner=owner.name if owner else t.owner,
                status=t.status,
                deadline=deadline_phrase(t, rules, letter),
                sender=m.sender,
                received=isoz(m.at),
                subject=m.subject or "(no subject)",
                text=m.text.strip() or "(the message has no text)",
            )
        )
    last = mails[-1].ticket
    parts.append(letter.phrase("bundled_footer", ref=last.ref, from_address=from_address))
    body = "\n\n".join(parts) + "\n"
    refs = sorted({m.ticket.ref for m in mails})
    subject = letter.phrase(
        "bundled_subject", ref=last.ref, count=n, sender=sender, refs=", ".join(refs)
    )
    return subject, body
