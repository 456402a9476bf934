"""The paragraphs about a customer's open requests: in the acknowledgement (``$others``),
in the bundled acknowledgement (``$open_requests``) and in the daily-cap notice (``$notice``).

Written in the letter's language from ``common.<lang>.txt`` and ``cap.<lang>.txt``; every
person and deadline is the stored one (docs/templates.md). The caller (the pipeline or the
bundle worker) reads the tickets; nothing here touches the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.letters import templates as letters
from gateway.letters.facts import deadline_phrase, owner_name
from gateway.letters.templates import Letter

if TYPE_CHECKING:
    from gateway.routing.model import Rules
    from gateway.store.models import Ticket

__all__ = ["cap_paragraph", "open_paragraph", "request_line"]


def request_line(ticket: Ticket, rules: Rules, letter: Letter) -> str:
    """``ACME-1003 "subject": Alice Martin, first answer by ...`` (stored values only)."""
    return letter.phrase(
        "request_line",
        ref=ticket.ref,
        subject=ticket.subject,
        who=owner_name(rules, ticket),
        deadline=deadline_phrase(ticket, rules, letter),
    )


def open_paragraph(
    tickets: Sequence[Ticket], rules: Rules, letter: Letter, head: str = "others_head"
) -> str:
    """A heading (``others_head`` or ``open_head``) and one line per ticket; "" if none."""
    if not tickets:
        return ""
    lines = [letter.phrase(head)]
    lines.extend(f"  - {request_line(t, rules, letter)}" for t in tickets)
    return "\n".join(lines) + "\n"


def cap_paragraph(open_tickets: Sequence[Ticket], rules: Rules, cap: int, letter: Letter) -> str:
    """The honest last paragraph of the acknowledgement that reaches the daily cap
    (osTicket's over-limit notice): what happens to further mail, and where it goes.
    ``letter`` is the ``cap`` template in the customer's language."""
    where = ""
    if open_tickets:
        requests = ", ".join(
            letter.phrase(
                "request",
                ref=t.ref,
                who=owner_name(rules, t),
                deadline=deadline_phrase(t, rules, letter),
            )
            for t in open_tickets
        )
        where = " " + letter.phrase("where", requests=requests)
    return letters.render(letter, {"cap": str(cap), "where": where}).rstrip("\n")
