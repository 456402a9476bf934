"""Customer notices: the words of a broken promise and of a late-processed ticket, and the
customer mail that carries them (``notice.<lang>.txt``, ``late.<lang>.txt``).

Pure text builders (`broken_promise_text`, `late_text`) take what the plan says
(`gateway.sla.plan.Commitment`) and never add a person or a time of their own: with no next
ladder step the text names who stays responsible and promises no time (docs/decisions.md D11, "No
silence after a broken promise"). `compose_customer_mail` gives the bytes: From the ticket's brand,
threaded under the customer's last message, marked automatic (RFC 3834 §5:
Auto-Submitted: auto-generated) so well-behaved responders stay quiet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.letters import headers, i18n
from gateway.letters import templates as letters
from gateway.letters.brands import Identity, identity
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer

if TYPE_CHECKING:
    from gateway.routing.model import Rules
    from gateway.settings import Settings
    from gateway.sla.business_time import BusinessCalendar
    from gateway.sla.plan import Commitment
    from gateway.store.models import Ticket

__all__ = [
    "Broken",
    "broken_promise_text",
    "commitment_text",
    "compose_customer_mail",
    "late_text",
    "notice_text",
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
    """The one message of a ticket processed after its own deadlines (docs/decisions.md D11.8):
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


def compose_customer_mail(
    *,
    me: Identity,
    signer: Signer,
    ticket_id: int,
    ref: str,
    ticket_subject: str,
    to: str,
    text: str,
    now: datetime,
    parent: str | None,
    references: Sequence[str] = (),
    tag: str = "notice",
) -> tuple[bytes, str, str]:
    """An automatic letter to the customer about a ticket: (unsigned bytes, Message-ID,
    subject), From identity ``me``, answering ``parent`` (their last message)."""
    reply_to = signer.reply_address(me.reply_local, me.reply_domain, ticket_id)
    message_id = signer.message_id(me.message_id_domain, ticket_id, tag)
    subject = headers.tagged_subject(ref, ticket_subject)
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.brand_from(me),
        to=to,
        subject=subject,
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_GENERATED,  # RFC 3834 §5
        loop=signer.installation_id(),  # the same on every node
    )
    msg["Reply-To"] = reply_to
    headers.set_thread(msg, parent, references)
    msg.set_content(text)
    return headers.as_bytes(msg), message_id, subject
