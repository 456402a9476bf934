"""SLA deadlines computed from a policy, its calendar and an instant.

This is the one computation behind both the promise in an acknowledgement and the deadline the
escalator enforces (docs/design.md §0: "come from one computation"). Pure: time comes in as
arguments.

Clock semantics (docs/design.md §7): first response and resolution start when the ticket is
created; next response re-arms when the customer writes again after a human reply, so it is
None at creation. Escalation steps count business time after a missed deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from gateway.sla.business_time import BusinessCalendar

if TYPE_CHECKING:  # avoid an import cycle: gateway.routing imports this module
    from gateway.routing.model import EscalationStep, SlaPolicy

__all__ = [
    "Deadlines",
    "escalation_schedule",
    "initial_deadlines",
    "isoz",
    "next_response_deadline",
    "warning_time",
]


def isoz(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with "Z" ("2026-11-23T13:12:00Z"); microseconds only when present."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        raise ValueError("isoz needs a timezone-aware datetime")
    utc = dt.astimezone(UTC)
    timespec = "microseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


@dataclass(frozen=True)
class Deadlines:
    """When each SLA clock runs out (aware UTC datetimes; None = no such clock)."""

    first_response: datetime | None
    next_response: datetime | None
    resolution: datetime | None

    def to_json(self) -> dict[str, str | None]:
        return {
            "first_response": isoz(self.first_response),
            "next_response": isoz(self.next_response),
            "resolution": isoz(self.resolution),
        }


def _due(calendar: BusinessCalendar, start: datetime, budget: timedelta | None) -> datetime | None:
    return None if budget is None else calendar.add(start, budget)


def initial_deadlines(
    policy: SlaPolicy, calendar: BusinessCalendar, created_at: datetime
) -> Deadlines:
    """Deadlines of a ticket created at `created_at` (next response not armed yet)."""
    return Deadlines(
        first_response=_due(calendar, created_at, policy.first_response),
        next_response=None,
        resolution=_due(calendar, created_at, policy.resolution),
    )


def next_response_deadline(
    policy: SlaPolicy, calendar: BusinessCalendar, customer_wrote_at: datetime
) -> datetime | None:
    """The next-response deadline armed when the customer writes after a human reply."""
    return _due(calendar, customer_wrote_at, policy.next_response)


def warning_time(
    policy: SlaPolicy, calendar: BusinessCalendar, start: datetime, budget: timedelta
) -> datetime | None:
    """When `warn_at` of a clock's business-time budget has been used (None: no warning)."""
    if policy.warn_at is None:
        return None
    return calendar.add(start, budget * policy.warn_at)


def escalation_schedule(
    policy: SlaPolicy, calendar: BusinessCalendar, missed_at: datetime
) -> tuple[tuple[datetime, EscalationStep], ...]:
    """When each escalation step falls due after a deadline was missed at `missed_at`.

    A step's `after` is business time past the miss, so "1h" after a 17:00 miss is 10:00 the
    next working morning. An `after = "0m"` step is due at the miss itself, even at closing
    time: telling the owner at once that a promise slipped costs nothing.
    """
    return tuple(
        (missed_at.astimezone(UTC) if not step.after else calendar.add(missed_at, step.after), step)
        for step in policy.escalation
    )
