"""The escalation letters to staff: the warning, the ladder step, the handover headline and
the "promise to the customer broken" mail (docs/design.md §7).

Pure: every function takes the facts (the ticket, the plan's fire and commitment, the
calendar, the customer's last message) and returns text; nothing is read or sent here. The
escalator (`gateway.escalation`) decides who gets which letter and queues it. The wording is
the ``escalation`` template (``gateway/templates/escalation.en.txt``, English like the other
letters to staff; an admin's ``escalation.en.txt`` in ``templates_dir`` overrides it phrase by
phrase, `gateway.letters.templates`). A letter never computes a person or a time: it states
the ones the plan (`gateway.sla.plan`) acts on.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.letters import templates
from gateway.letters.i18n import format_local
from gateway.sla.clocks import utc
from gateway.sla.deadlines import isoz

if TYPE_CHECKING:
    # Types only: the plan and the rows are the letter's facts, read elsewhere.
    from gateway.sla.business_time import BusinessCalendar
    from gateway.sla.plan import Commitment, Fire

__all__ = [
    "Facts",
    "Handover",
    "StaffLetter",
    "body",
    "broken_promise",
    "clock_name",
    "escalated",
    "handover",
    "load",
    "warning",
]


class Person(Protocol):
    """A person as a letter names them (`gateway.routing.model.Person` is one). These are
    protocols, so the letters import neither the rules model nor the tables
    (docs/architecture.md, "Layers")."""

    @property
    def name(self) -> str: ...

    @property
    def email(self) -> str: ...


class Ticket(Protocol):
    """What a letter states about a ticket (`gateway.store.models.Ticket` is one)."""

    @property
    def ref(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def requester(self) -> str: ...

    @property
    def owner(self) -> str: ...


class Message(Protocol):
    """The customer's message a letter quotes (`gateway.store.models.Message` is one)."""

    @property
    def at(self) -> datetime: ...

    @property
    def from_address(self) -> str: ...

    @property
    def text(self) -> str: ...


#: The clock names of the event log (English, like the log itself).
_CLOCK_NAMES = {
    "first_response": "first response",
    "next_response": "next response",
    "resolution": "resolution",
}


def clock_name(clock: str) -> str:
    """The clock as the event log names it ("first response")."""
    return _CLOCK_NAMES.get(clock, clock.replace("_", " "))


def load(templates_dir: Path | None) -> templates.Letter:
    """The escalation letter (English, with an admin's overrides from `templates_dir`)."""
    return templates.load("escalation", "en", templates_dir)


@dataclass(frozen=True)
class Facts:
    """What every escalation letter about one fire states."""

    letter: templates.Letter
    ticket: Ticket
    #: The ticket's owner as the rules know them (None: no owner, or an unknown id).
    owner: Person | None
    calendar: BusinessCalendar
    fire: Fire
    #: The customer's last inbound message, quoted in the body (None: none yet).
    last: Message | None

    def phrase(self, key: str, **facts: object) -> str:
        return self.letter.phrase(key, ref=self.ticket.ref, **facts)

    @property
    def clock(self) -> str:
        return self.letter.phrase(f"clock_{self.fire.clock}") or clock_name(self.fire.clock)

    @property
    def due_local(self) -> str:
        return format_local(self.fire.due_at, self.calendar)

    def step(self, steps: int) -> str:
        """ "escalation step 2 of 3" for this fire's ladder step."""
        return self.phrase("step", step=self.fire.step + 1, steps=steps)


@dataclass(frozen=True)
class StaffLetter:
    """A letter to one member of staff: its subject and text body."""

    subject: str
    body: str


def body(facts: Facts, headline: str, notes: list[str]) -> str:
    """The body every escalation letter shares: the headline, the ticket, the deadline, why
    someone was passed over (`notes`) and the customer's last message."""
    ticket, last = facts.ticket, facts.last
    owner = facts.owner
    if owner is not None:
        owner_text = f"{owner.name} <{owner.email}>"
    else:
        owner_text = ticket.owner or facts.phrase("no_owner")
    quoted = ""
    if last is not None:
        quoted = (
            "\n"
            + facts.phrase(
                "last_message",
                at=isoz(utc(last.at)),
                from_address=last.from_address,
                text=last.text.rstrip() or facts.phrase("no_text"),
            )
            + "\n"
        )
    values = {
        "headline": headline,
        "ref": ticket.ref,
        "subject": ticket.subject,
        "requester": ticket.requester,
        "owner": owner_text,
        "clock": facts.clock,
        "deadline_local": facts.due_local,
        "deadline_utc": isoz(facts.fire.due_at),
        "hours": facts.calendar.describe_hours(),
        "notes": "".join(facts.phrase("note", note=n) + "\n" for n in notes),
        "last_message": quoted,
    }
    # Not templates.render: it folds runs of blank lines, and the customer's quoted text is
    # given as written.
    return string.Template(facts.letter.body).safe_substitute(values).rstrip("\n") + "\n"


def warning(facts: Facts, notes: list[str]) -> StaffLetter:
    """The deadline is near (the policy's `warn_at`): to whoever acts for the owner now."""
    due = f"{facts.due_local} ({isoz(facts.fire.due_at)})"
    headline = facts.phrase("warning_headline", clock=facts.clock, due=due)
    return StaffLetter(
        facts.phrase("warning_subject", clock=facts.clock), body(facts, headline, notes)
    )


def escalated(facts: Facts, steps: int, notes: list[str]) -> StaffLetter:
    """A ladder step's `notify`: the deadline was missed, and this is step N of `steps`."""
    headline = facts.phrase(
        "escalation_headline", clock=facts.clock, due=facts.due_local, step=facts.step(steps)
    )
    return StaffLetter(
        facts.phrase("escalation_subject", clock=facts.clock), body(facts, headline, notes)
    )


@dataclass(frozen=True)
class Handover:
    """The texts of a ladder step's `assign`: the handover pack's subject and headline for the
    new holder, and the line the previous holder is told."""

    subject: str
    headline: str
    told: str


def handover(facts: Facts, steps: int, person: Person, commitment: Commitment) -> Handover:
    """The ticket is now `person`'s; with a time in `commitment`, they are asked to answer by
    it and told who has it after that (the plan's next step)."""
    calendar = facts.calendar
    step = facts.step(steps)
    headline = facts.phrase("handover_headline", clock=facts.clock, due=facts.due_local, step=step)
    if commitment.by is not None:
        by = format_local(commitment.by, calendar)
        if commitment.then is not None:
            ask = facts.phrase("handover_answer_by_then", by=by, then=commitment.then.name)
        else:
            ask = facts.phrase("handover_answer_by", by=by)
        headline += " " + ask
    told = facts.phrase(
        "handover_told", clock=facts.clock, due=facts.due_local, step=step, who=person.name
    )
    return Handover(facts.phrase("handover_subject", clock=facts.clock), headline, told)


def broken_promise(facts: Facts, by: datetime | None) -> StaffLetter:
    """To whoever is now responsible for a promise the customer was told was broken (`by`:
    the time the customer notice named, None when it named none)."""
    if by is not None:
        headline = facts.phrase("broken_headline_by", by=format_local(by, facts.calendar))
    else:
        headline = facts.phrase("broken_headline")
    return StaffLetter(facts.phrase("broken_subject"), body(facts, headline, []))
