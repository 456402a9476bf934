"""SLA clock transitions: what a customer message, a staff reply, waiting, closing, reopening
and snoozing do to a ticket's deadlines.

Pure with respect to I/O: every function takes the ticket (a `Ticket` row or anything with the
same attributes) and the instant the event happened, mutates only the clock fields of that
object and returns nothing that needs a database or a clock. The pipeline and the staff
commands call these, the escalator reads the result through `active_deadlines`.

The rules (docs/design.md §7, docs/rules.md "SLA policies"):

- **first response** runs from creation and is stopped by the first human reply
  (`first_responded_at`); it is never re-armed.
- **next response** re-arms when the customer writes again *after* a human reply. It counts
  from the OLDEST unanswered customer message: a second or third customer mail before we
  answer keeps the deadline the first one set (otherwise a chatty customer would push our
  deadline away by writing more). Before the first reply the first-response clock covers
  the customer, so next response is not armed.
- **resolution** runs from creation until the ticket is closed.
- **waiting on the customer pauses the clocks that depend on us** (docs/design.md §7). All three
  clocks measure *our* work (answering, resolving), and while the ball is in the customer's
  court none of it can be late, so all three pause. On resume each deadline that had not yet
  been missed when the pause began is moved by the business time spent waiting (its
  remaining budget is kept). A deadline already missed before the pause is not moved: the
  promise is broken, and its escalation ladder simply continues after the pause.
- **closed** stops every clock. **Reopening** resumes resolution like a pause (shifted by the
  business time the ticket was closed); the reopening customer message then re-arms next
  response through `on_customer_message` as usual.
- **snooze** hides a ticket from the escalator until a time; it does *not* move a deadline
  (the promise to the customer stands). When the snooze ends, steps that fell due meanwhile
  fire once, in order (the escalator's catch-up).
- An agent who has already answered is never escalated for "no update" (zammad#3140): a
  staff reply stops first response and clears next response, and `active_deadlines`
  double-checks that the last staff reply is older than the last customer message before it
  reports a response clock as running.

An out-of-office auto-reply from the customer is not a customer message for the clocks: the
caller must not call `on_customer_message` for robot mail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from gateway.sla.business_time import BusinessCalendar
from gateway.sla.deadlines import next_response_deadline

if TYPE_CHECKING:
    from gateway.routing.model import SlaPolicy

__all__ = [
    "CLOCKS",
    "ClockState",
    "active_deadlines",
    "on_close",
    "on_customer_message",
    "on_reopen",
    "on_resume",
    "on_snooze",
    "on_staff_reply",
    "on_waiting",
    "utc",
]

#: The three clocks, in the order they are reported.
CLOCKS: tuple[str, ...] = ("first_response", "next_response", "resolution")


class ClockState(Protocol):
    """The clock fields of a ticket (`gateway.store.models.Ticket` has all of them)."""

    status: str
    created_at: datetime
    closed_at: datetime | None
    first_response_due: datetime | None
    next_response_due: datetime | None
    resolution_due: datetime | None
    first_responded_at: datetime | None
    last_customer_at: datetime | None
    last_staff_at: datetime | None
    waiting_since: datetime | None
    snoozed_until: datetime | None


def utc(value: datetime | None) -> datetime | None:
    """Aware UTC; a naive value (SQLite hands those back) is taken to be UTC already."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _shift(
    due: datetime | None, paused_at: datetime, resumed_at: datetime, calendar: BusinessCalendar
) -> datetime | None:
    """`due` moved by the business time between `paused_at` and `resumed_at`.

    Computed as "the remaining budget at the pause, counted again from the resume", which is
    the same instant as adding the paused business time to the deadline but never moves a
    deadline that sits on a closing instant when no business time passed. Deadlines already
    missed at the pause are returned unchanged (see the module docstring).
    """
    due = utc(due)
    if due is None or due <= paused_at:
        return due
    if calendar.elapsed(paused_at, resumed_at) <= timedelta(0):
        return due  # no business time passed while paused: nothing to shift
    remaining = calendar.elapsed(paused_at, due)
    return calendar.add(resumed_at, remaining)


def _resume(
    ticket: ClockState, paused_at: datetime, at: datetime, calendar: BusinessCalendar
) -> None:
    at = utc(at) or at
    paused_at = utc(paused_at) or paused_at
    if at <= paused_at:
        return
    ticket.first_response_due = (
        _shift(ticket.first_response_due, paused_at, at, calendar)
        if ticket.first_responded_at is None
        else ticket.first_response_due
    )
    ticket.next_response_due = _shift(ticket.next_response_due, paused_at, at, calendar)
    ticket.resolution_due = _shift(ticket.resolution_due, paused_at, at, calendar)


def on_resume(ticket: ClockState, at: datetime, calendar: BusinessCalendar) -> None:
    """Waiting -> open (the customer wrote, or staff took the ticket off waiting): clocks run
    again, with every not-yet-missed deadline moved by the business time spent waiting."""
    if ticket.status != "waiting":
        return
    if ticket.waiting_since is not None:
        _resume(ticket, utc(ticket.waiting_since) or at, at, calendar)
    ticket.status = "open"
    ticket.waiting_since = None


def on_customer_message(
    ticket: ClockState, at: datetime, policy: SlaPolicy, calendar: BusinessCalendar
) -> None:
    """A human customer wrote into the ticket at `at` (never call this for robot mail such as
    an out-of-office: it would re-arm a clock nobody is owed).

    Resumes a waiting ticket (with the shift), then arms next response when the customer
    writes after a human reply, counted from the oldest unanswered message: an already armed,
    unanswered next-response deadline is kept. A closed ticket must be reopened first
    (`on_reopen`); here only its `last_customer_at` is updated.
    """
    at = utc(at) or at
    last = utc(ticket.last_customer_at)
    if last is None or at > last:
        ticket.last_customer_at = at
    if ticket.status == "closed":
        return
    if ticket.status == "waiting":
        on_resume(ticket, at, calendar)
    if ticket.first_responded_at is None:
        return  # the first-response clock is still running for this customer
    staff = utc(ticket.last_staff_at)
    if staff is not None and at < staff:
        return  # written before our last reply: already answered (late delivery)
    if ticket.next_response_due is None:
        ticket.next_response_due = next_response_deadline(policy, calendar, at)


def on_staff_reply(ticket: ClockState, at: datetime) -> None:
    """A human (staff) reply went to the customer at `at`: stops first response, answers
    every customer message so far (clears next response). zammad#3140: whoever answered is
    not escalated for "no update" afterwards."""
    at = utc(at) or at
    if ticket.first_responded_at is None:
        ticket.first_responded_at = at
    ticket.next_response_due = None
    last = utc(ticket.last_staff_at)
    if last is None or at > last:
        ticket.last_staff_at = at


def on_waiting(ticket: ClockState, at: datetime) -> None:
    """Open -> waiting on the customer: the clocks that depend on us pause (docs/design.md §7)."""
    if ticket.status != "open":
        return
    ticket.status = "waiting"
    ticket.waiting_since = utc(at)


def on_close(ticket: ClockState, at: datetime) -> None:
    """Closed: every clock stops (resolution is met; nothing more is owed)."""
    if ticket.status == "closed":
        return
    ticket.status = "closed"
    ticket.closed_at = utc(at)
    ticket.waiting_since = None
    ticket.snoozed_until = None


def on_reopen(ticket: ClockState, at: datetime, calendar: BusinessCalendar) -> None:
    """Closed -> open: resolution resumes, moved by the business time the ticket was closed;
    the reopening customer message then goes through `on_customer_message`."""
    if ticket.status != "closed":
        return
    closed_at = utc(ticket.closed_at)
    if closed_at is not None:
        _resume(ticket, closed_at, at, calendar)
    ticket.status = "open"
    ticket.closed_at = None


def on_snooze(ticket: ClockState, until: datetime | None) -> None:
    """Hide the ticket from the escalator until `until` (None: wake now). Deadlines stay."""
    ticket.snoozed_until = utc(until)


def active_deadlines(ticket: ClockState) -> list[tuple[str, datetime]]:
    """The running clocks of a ticket and when each runs out, as (clock, due) in CLOCKS order.

    Nothing runs unless the ticket is open. Snoozing is not considered here (it postpones
    escalation, not the deadline); the escalator checks `snoozed_until` itself.
    """
    if ticket.status != "open":
        return []
    out: list[tuple[str, datetime]] = []
    customer = utc(ticket.last_customer_at)
    staff = utc(ticket.last_staff_at)
    # zammad#3140: a reply newer than the customer's last message means nobody is waiting.
    answered = staff is not None and (customer is None or staff >= customer)
    first = utc(ticket.first_response_due)
    if first is not None and ticket.first_responded_at is None:
        out.append(("first_response", first))
    nxt = utc(ticket.next_response_due)
    if nxt is not None and not answered:
        out.append(("next_response", nxt))
    resolution = utc(ticket.resolution_due)
    if resolution is not None:
        out.append(("resolution", resolution))
    return out
