"""The validated rules: people, calendars, SLA policies, defaults and routes.

These are the typed, immutable values `loader.load_rules` builds from `rules/*.toml`
(docs/interface.md "Rules files"). Nothing here reads files or clocks; the engine and the SLA code
take a `Rules` and work on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from gateway.sla.business_time import BusinessCalendar

__all__ = [
    "ASSIGN_MODES",
    "DISPOSITIONS",
    "PRIORITIES",
    "ROLES",
    "Defaults",
    "EscalationStep",
    "Match",
    "Person",
    "Route",
    "Rules",
    "ScoreTest",
    "SlaPolicy",
]

#: Allowed priorities, lowest first.
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "urgent")
#: How a route with a `team` picks the owner.
ASSIGN_MODES: tuple[str, ...] = ("round-robin", "least-open")
#: What a route does with a message: open (or join) a ticket, or file it in the junk folder.
DISPOSITIONS: tuple[str, ...] = ("ticket", "junk")
#: Relative people an escalation step may name instead of a person id.
ROLES: tuple[str, ...] = ("owner", "backup", "manager")


@dataclass(frozen=True)
class Person:
    """A named human who can own tickets (docs/design.md §0: every owner is a named human)."""

    id: str
    name: str
    email: str
    calendar: str | None = None
    backup: str | None = None
    manager: str | None = None
    #: Days off, inclusive (first, last) local dates in the person's calendar's zone
    #: (`[people.X] away`, docs/rules.md "Absence and on-call").
    away: tuple[tuple[date, date], ...] = ()


@dataclass(frozen=True)
class EscalationStep:
    """One rung of the ladder: `after` this much business time past a missed deadline,
    notify and/or reassign. `notify`/`assign` are "owner", "backup", "manager" or a person id.
    """

    after: timedelta
    notify: str | None = None
    assign: str | None = None


@dataclass(frozen=True)
class SlaPolicy:
    """Deadlines (business time in `calendar`) and the escalation ladder."""

    id: str
    calendar: str
    first_response: timedelta | None = None
    next_response: timedelta | None = None
    resolution: timedelta | None = None
    customer_notice: bool = True
    escalation: tuple[EscalationStep, ...] = ()
    warn_at: float | None = None
    #: People on call for this policy: tried after owner -> backup -> manager when nobody of
    #: the ladder is on duty (`[sla.X] on_call`, docs/rules.md "Absence and on-call").
    on_call: tuple[str, ...] = ()


@dataclass(frozen=True)
class Defaults:
    """What a message gets when no route matches (and what routes start from)."""

    owner: str
    queue: str
    sla: str
    priority: str = "normal"
    acknowledge: bool | str = True


@dataclass(frozen=True)
class Pattern:
    """A compiled regular expression that remembers how the admin wrote it."""

    text: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def compile(cls, text: str) -> Pattern:
        return cls(text, re.compile(text))


@dataclass(frozen=True)
class ScoreTest:
    """``spam_score = ">= 5"``: a comparison with the trusted front filter's score."""

    op: str  # >=, >, <=, <
    value: float

    def holds(self, score: float) -> bool:
        return {
            ">=": score >= self.value,
            ">": score > self.value,
            "<=": score <= self.value,
            "<": score < self.value,
        }[self.op]

    @property
    def text(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Match:
    """The conditions of a route: (match key, loaded value) pairs. Every given condition must
    hold; lists are any-of. Keys and their meaning are the registry in
    `gateway.routing.conditions`; the `not` key holds a nested `Match` that fails the route
    when *any* of its conditions holds. An empty `Match` matches every message.
    """

    conditions: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str) -> Any:
        """The loaded value of match key `key` (None when the route does not give it)."""
        return next((value for k, value in self.conditions if k == key), None)

    @property
    def is_empty(self) -> bool:
        return not self.conditions


@dataclass(frozen=True)
class Route:
    """One `[[route]]`: conditions plus actions. Unset actions (None/empty) change nothing."""

    name: str
    match: Match = Match()
    queue: str | None = None
    owner: str | None = None
    team: tuple[str, ...] = ()
    assign: str | None = None
    sla: str | None = None
    priority: str | None = None
    tags: tuple[str, ...] = ()
    acknowledge: bool | str | None = None
    notify: tuple[str, ...] = ()
    continue_: bool = False
    disposition: str | None = None  # "ticket" | "junk" (None: unchanged, default ticket)
    source: str = ""
    # docs/decisions.md D12: overrides `tickets.known_customer` for mail this route matches.
    known_customer: str | None = None
    #: The letters' language ("de"), else chosen per customer (gateway.letters.language).
    language: str | None = None
    #: The identity the ticket's letters carry (a `[brands.X]` id), kept for its life.
    brand: str | None = None


@dataclass(frozen=True)
class Brand:
    """A support identity (`[brands.X]`): the From, signature and DKIM key of its letters.

    Like RT's per-queue CorrespondAddress: a ticket opened under a brand answers from the
    brand's address, its reply tokens and Message-IDs carry the brand's domain.
    """

    id: str
    from_address: str
    from_name: str = ""
    signature: str = ""
    business_name: str = ""
    #: The domain of signed reply addresses; default: the from_address's domain.
    reply_domain: str = ""
    dkim_domain: str = ""
    dkim_selector: str = ""
    dkim_key_file: str = ""

    @property
    def domain(self) -> str:
        return self.from_address.rpartition("@")[2].lower()

    @property
    def reply_to_domain(self) -> str:
        return (self.reply_domain or self.domain).lower()


@dataclass(frozen=True)
class Rules:
    """Everything in `rules/`, validated and cross-referenced."""

    people: dict[str, Person]
    calendars: dict[str, BusinessCalendar]
    sla: dict[str, SlaPolicy]
    defaults: Defaults
    routes: tuple[Route, ...]
    files: tuple[Path, ...] = ()
    brands: dict[str, Brand] = field(default_factory=dict)
    #: Where each policy and person is defined ("sla.vip" -> "rules/sla.toml:27"), for
    #: `rules check` warnings that point at a line.
    where: dict[str, str] = field(default_factory=dict, compare=False)

    def person(self, id: str) -> Person:
        """The person with this id (KeyError with the id when unknown)."""
        try:
            return self.people[id]
        except KeyError:
            raise KeyError(f"unknown person {id!r}") from None

    def policy(self, sla_id: str) -> SlaPolicy:
        try:
            return self.sla[sla_id]
        except KeyError:
            raise KeyError(f"unknown SLA policy {sla_id!r}") from None

    def calendar_for_policy(self, sla_id: str) -> BusinessCalendar:
        """The calendar an SLA policy counts business time in."""
        return self.calendars[self.policy(sla_id).calendar]

    def calendar_for_person(self, person_id: str) -> BusinessCalendar | None:
        """A person's working hours (to notify them while they work, docs/design.md §7)."""
        calendar = self.person(person_id).calendar
        return self.calendars[calendar] if calendar else None

    def resolve(self, who: str, owner: Person) -> Person | None:
        """Resolve an escalation target ("owner", "backup", "manager" or a person id)
        relative to the current owner; None when the owner has no such backup/manager."""
        if who == "owner":
            return owner
        if who in ("backup", "manager"):
            target = owner.backup if who == "backup" else owner.manager
            return self.people.get(target) if target else None
        return self.people.get(who)
