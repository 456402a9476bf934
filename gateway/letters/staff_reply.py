"""A staff answer relayed to the customer (docs/design.md §5, gateway.pipeline.staff).

From ``"<Person> via <from_name>"`` at the ticket's brand address, ``[REF] subject``,
threaded under the customer's last message, Reply-To the signed customer address, a signed
Message-ID, attachments kept, and ``Auto-Submitted: no`` (RFC 3834 §5: written by a
person). The footer under the person's name is ``common.<lang>.txt``'s
``staff_reply_footer`` in the ticket's language.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gateway.letters import headers
from gateway.letters.notification import Part, add_parts
from gateway.security.tokens import Signer

__all__ = ["compose_staff_reply"]


def compose_staff_reply(
    *,
    ticket_id: int,
    ref: str,
    ticket_subject: str,
    person_name: str,
    to: Sequence[str],
    text: str,
    parts: Sequence[Part],
    in_reply_to: str | None,
    references: Sequence[str],
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    reply_domain: str = "",
    message_id_domain: str = "",
    footer: str = "",
) -> tuple[bytes, str, str, str]:
    """The relayed staff reply: (unsigned bytes, Message-ID, subject, body text)."""
    local, domain = headers.split_address(from_address)
    domain = reply_domain or domain  # a brand's reply-address domain (docs/templates.md)
    message_id = signer.message_id(message_id_domain or hostname, ticket_id, "reply")
    subject = headers.tagged_subject(ref, ticket_subject)
    display = f"{person_name} via {from_name}" if from_name else person_name
    footer = footer or f"Ticket {ref}: reply to this email to add to your request."
    body = text.rstrip() + f"\n\n-- \n{display}\n{footer}\n"
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.format_address(display, from_address),
        to=to[0],
        subject=subject,
        message_id=message_id,
        now=now,
        auto_submitted=headers.BY_A_PERSON,  # RFC 3834 §5: written by a person
        loop=signer.installation_id(),  # one value for every node
    )
    if len(to) > 1:
        msg["Cc"] = ", ".join(to[1:])
    msg["Reply-To"] = signer.reply_address(local, domain, ticket_id)
    headers.set_thread(msg, in_reply_to, references)
    msg.set_content(body)
    add_parts(msg, parts)
    return headers.as_bytes(msg), message_id, subject, body
