"""Facts a letter states about a ticket, taken from the stored ticket and the rules.

Templates never compute a person or a time (docs/templates.md): the pipeline, the bundle
worker and the escalator pass these in. Here are the few derivations several letters
share, written once: who answers for a ticket (its owner, else the rules' default owner:
every ticket has a named human, docs/design.md §7), and a ticket's next STORED deadline in
the letter's language (what the escalator enforces, never recomputed).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.letters import i18n
from gateway.letters.templates import Letter

if TYPE_CHECKING:
    from gateway.routing.model import Person, Rules
    from gateway.sla.business_time import BusinessCalendar
    from gateway.store.models import Ticket

__all__ = ["calendar_of", "deadline_phrase", "isoz", "owner_name", "owner_or_default", "when"]


def isoz(dt: datetime) -> str:
    """ISO 8601 in UTC with "Z", seconds precision: 2026-11-23T13:00:00Z."""
    u = dt.astimezone(UTC)
    # strftime("%Y-%m-%dT%H:%M:%SZ") without strftime (a third of the cost; %Y is not padded)
    return f"{u.year}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


def owner_or_default(rules: Rules, owner_id: str | None) -> Person | None:
    """The person ``owner_id`` names, else the rules' default owner (None if neither)."""
    return (rules.people.get(owner_id) if owner_id else None) or rules.people.get(
        rules.defaults.owner
    )


def owner_name(rules: Rules, ticket: Ticket) -> str:
    """The name of who answers for ``ticket`` (the stored owner id when nobody matches)."""
    owner = owner_or_default(rules, ticket.owner)
    return owner.name if owner is not None else ticket.owner


def calendar_of(rules: Rules, ticket: Ticket) -> BusinessCalendar | None:
    """The SLA calendar of ``ticket``'s policy, None when the policy is gone."""
    with contextlib.suppress(KeyError):
        return rules.calendar_for_policy(ticket.sla)
    return None


def when(dt: datetime, calendar: BusinessCalendar | None, lang: str = "en") -> str:
    """``<local time in the letter's language> (<UTC>)``, or just UTC without a calendar."""
    local = i18n.format_local(dt, calendar, lang) if calendar is not None else ""
    return f"{local} ({isoz(dt)})" if local else isoz(dt)


def deadline_phrase(ticket: Ticket, rules: Rules, letter: Letter) -> str:
    """The next promise of a ticket from its STORED deadlines, with ``letter``'s common
    phrases (``deadline_first``, ``deadline_next``, ... in common.<lang>.txt)."""
    cal = calendar_of(rules, ticket)
    if ticket.status == "waiting":
        return letter.phrase("deadline_waiting")
    if ticket.first_responded_at is None and ticket.first_response_due is not None:
        due = ticket.first_response_due
        return letter.phrase("deadline_first", when=when(due, cal, letter.lang))
    if ticket.next_response_due is not None:
        due = ticket.next_response_due
        return letter.phrase("deadline_next", when=when(due, cal, letter.lang))
    if ticket.resolution_due is not None:
        due = ticket.resolution_due
        return letter.phrase("deadline_resolution", when=when(due, cal, letter.lang))
    return letter.phrase("deadline_none")
