"""The routing engine: a pure function from (rules, message facts, time) to a decision.

`evaluate` tries the routes in order (files sorted by name, then order within the file),
records in words why each matched or not, and applies the actions of the first match; a route
with `continue = true` lets later routes add tags/notify and override its scalar actions. The
trace is what `rules explain` prints and what the pipeline stores as the audit trail
(ARCHITECTURE: "rules separate 'does it match' from 'what happens'").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from gateway.routing.conditions import Moment, match_reasons
from gateway.routing.facts import MessageFacts
from gateway.routing.model import Person, Route, Rules
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.deadlines import initial_deadlines
from gateway.sla.duty import owner_for_window, pick_on_duty

__all__ = ["AssignmentState", "Decision", "TraceEntry", "cover_window", "evaluate"]


@dataclass(frozen=True)
class AssignmentState:
    """What team assignment needs to know about the present (supplied by the store)."""

    open_tickets: Mapping[str, int] = field(default_factory=dict)  # person id -> open tickets
    last_assigned: Mapping[str, str] = field(default_factory=dict)  # route name -> person id


_NO_STATE = AssignmentState()


@dataclass(frozen=True)
class TraceEntry:
    """One route tried: did it match, and why (or why not) in words."""

    route: str
    matched: bool
    why: str

    def to_json(self) -> dict[str, str | bool]:
        return {"route": self.route, "matched": self.matched, "why": self.why}


@dataclass(frozen=True)
class Decision:
    """Where a message goes. `route` is the last matching route (None: defaults applied)."""

    route: str | None
    queue: str
    owner: Person
    sla: str
    priority: str
    tags: tuple[str, ...]
    acknowledge: bool | str
    notify: tuple[str, ...]
    trace: tuple[TraceEntry, ...]
    assigned_by: str  # "route" | "round-robin" | "least-open" | "default"
    matched_routes: tuple[str, ...] = ()
    disposition: str = "ticket"  # "ticket" | "junk" (docs/decisions.md D18)
    disposition_route: str | None = None  # the route that set it
    # docs/decisions.md D12: the matching route's `known_customer` policy (None:
    # tickets.known_customer).
    known_customer: str | None = None
    #: The letters' language the routes fixed (None: chosen per customer), and the brand.
    language: str | None = None
    brand: str | None = None


# --------------------------------------------------------------------------- matching


def _match(
    route: Route, facts: MessageFacts, at: datetime, calendar: BusinessCalendar
) -> tuple[bool, str]:
    if route.match.is_empty:
        return True, "no conditions (matches every message)"
    reasons: list[str] = []
    # Each condition is a spec of gateway.routing.conditions (key, load, check, explain).
    for holds, why in match_reasons(route.match, facts, Moment(at, calendar)):
        if not holds:
            return False, why
        reasons.append(why)
    return True, "; ".join(reasons)


# --------------------------------------------------------------------------- assignment


def _pick_from_team(
    route: Route, state: AssignmentState, rules: Rules, at: datetime
) -> tuple[str, str]:
    # Only people on duty now (or, if nobody is, on duty soonest) are candidates: a ticket
    # handed to someone on holiday is a promise nobody keeps (docs/decisions.md D11.7).
    on_duty = pick_on_duty(rules, route.team, at)
    team = on_duty or route.team
    if route.assign == "least-open":
        # Fewest open tickets; ties go to the earlier team member so the choice is stable.
        chosen = min(team, key=lambda pid: (state.open_tickets.get(pid, 0), team.index(pid)))
        return chosen, "least-open"
    # Round-robin walks the whole team from the cursor and takes the next one on duty.
    full = route.team
    last = state.last_assigned.get(route.name)
    start = full.index(last) + 1 if last in full else 0
    for offset in range(len(full)):
        candidate = full[(start + offset) % len(full)]
        if candidate in team:
            return candidate, "round-robin"
    return team[0], "round-robin"


def _add_unique(items: list[str], new: tuple[str, ...]) -> None:
    for item in new:
        if item not in items:
            items.append(item)


# --------------------------------------------------------------------------- evaluate


def evaluate(
    rules: Rules,
    facts: MessageFacts,
    at: datetime,
    state: AssignmentState = _NO_STATE,
) -> Decision:
    """Route one message arriving at `at` (aware datetime; used for `business_hours`)."""
    if at.tzinfo is None:
        raise ValueError("evaluate needs a timezone-aware datetime")
    defaults = rules.defaults
    queue, sla, priority = defaults.queue, defaults.sla, defaults.priority
    acknowledge: bool | str = defaults.acknowledge
    owner_id, assigned_by = defaults.owner, "default"
    tags: list[str] = []
    notify: list[str] = []
    trace: list[TraceEntry] = []
    matched: list[str] = []
    disposition, disposition_route = "ticket", None
    known_customer: str | None = None
    language: str | None = None
    brand: str | None = None

    for route in rules.routes:
        # `business_hours` is judged in the calendar of the SLA this route would apply:
        # its own `sla`, else the one chosen so far (defaults, or an earlier continue route).
        calendar = rules.calendar_for_policy(route.sla or sla)
        holds, why = _match(route, facts, at, calendar)
        trace.append(TraceEntry(route.name, holds, why))
        if not holds:
            continue
        matched.append(route.name)
        queue = route.queue or queue
        sla = route.sla or sla
        priority = route.priority or priority
        if route.acknowledge is not None:
            acknowledge = route.acknowledge
        if route.disposition is not None:
            disposition, disposition_route = route.disposition, route.name
        if route.known_customer is not None:
            known_customer = route.known_customer
        language = route.language or language
        brand = route.brand or brand
        if route.owner is not None:
            owner_id, assigned_by = route.owner, "route"
        elif route.team:
            owner_id, assigned_by = _pick_from_team(route, state, rules, at)
        _add_unique(tags, route.tags)
        _add_unique(notify, route.notify)
        if not route.continue_:
            break

    return Decision(
        route=matched[-1] if matched else None,
        queue=queue,
        owner=rules.person(owner_id),
        sla=sla,
        priority=priority,
        tags=tuple(tags),
        acknowledge=acknowledge,
        notify=tuple(notify),
        trace=tuple(trace),
        assigned_by=assigned_by,
        matched_routes=tuple(matched),
        disposition=disposition,
        disposition_route=disposition_route,
        known_customer=known_customer,
        language=language,
        brand=brand,
    )


def cover_window(rules: Rules, decision: Decision, received_at: datetime) -> Decision:
    """The owner the acknowledgement names must be on duty at some time before the first
    response is due (docs/decisions.md D11: never name someone away for the whole window). Otherwise
    the plan's walk (backup, manager, on call, default owner) picks who is, and the trace says
    why."""
    policy = rules.sla.get(decision.sla)
    if policy is None:
        return decision
    due = initial_deadlines(policy, rules.calendar_for_policy(decision.sla), received_at)
    end = due.first_response or due.resolution
    found = owner_for_window(rules, policy, decision.owner, received_at, end)
    if found.person.id == decision.owner.id:
        return decision
    why = "; ".join(found.skipped) or f"{decision.owner.name} is not on duty"
    entry = TraceEntry("(coverage)", True, f"owner {found.person.name}: {why}")
    return replace(decision, owner=found.person, trace=(*decision.trace, entry))
