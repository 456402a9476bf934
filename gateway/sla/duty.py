"""Who is on duty: working hours, absences and on-call, and the walk to the next person.

Pure: every function takes the rules and an instant. The escalator, the planner
(`gateway.sla.plan`), the router's assignment strategies and `rules check`'s coverage report
all ask these questions, so a person named in a mail is one these functions found on duty
(docs/decisions.md D11.1: the customer notice used `rules.resolve()` while the ladder used an
on-duty walk, and named a person the ladder then skipped).

A person is **on duty** at an instant when it lies in their calendar's opening hours (no
calendar: always) and its local date in that calendar's zone is not one of their `away`
days. The **walk** from a role tries owner -> backup -> manager (relative to the current
owner, as before), then the policy's `on_call` people, then `[defaults] owner`; the first
on duty wins. When nobody is on duty, the candidate on duty *soonest* is named (docs/design.md
§7: always a named human, never "nobody"), and the reason is kept for the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.model import Person, Rules, SlaPolicy

__all__ = [
    "ROLE_ORDER",
    "Resolved",
    "duty_intervals",
    "is_away",
    "next_on_duty",
    "on_duty",
    "on_duty_within",
    "owner_for_window",
    "pick_on_duty",
    "resolve",
    "walk_chain",
]

#: The relative roles in the order the walk tries them.
ROLE_ORDER: tuple[str, ...] = ("owner", "backup", "manager")
#: How far ahead "on duty soonest" looks (a person away for longer is not "soon").
HORIZON = timedelta(days=60)


def _zone(rules: Rules, person: Person) -> tzinfo:
    calendar = rules.calendars.get(person.calendar) if person.calendar else None
    return calendar.timezone if calendar is not None else UTC


def _away_range(person: Person, day: date) -> tuple[date, date] | None:
    for first, last in person.away:
        if first <= day <= last:
            return first, last
    return None


def is_away(rules: Rules, person: Person, at: datetime) -> bool:
    """True when `at`'s local date (the person's calendar's zone) is one of their away days."""
    if not person.away:
        return False
    return _away_range(person, at.astimezone(_zone(rules, person)).date()) is not None


def on_duty(rules: Rules, person: Person, at: datetime) -> bool:
    """In working hours and not away."""
    if is_away(rules, person, at):
        return False
    calendar = rules.calendars.get(person.calendar) if person.calendar else None
    return calendar is None or calendar.is_open(at)


def next_on_duty(
    rules: Rules, person: Person, at: datetime, horizon: timedelta = HORIZON
) -> datetime | None:
    """`at` when on duty, else the next instant they are (None: not within `horizon`)."""
    zone = _zone(rules, person)
    calendar = rules.calendars.get(person.calendar) if person.calendar else None
    t = at.astimezone(UTC)
    limit = t + horizon
    while t <= limit:
        span = _away_range(person, t.astimezone(zone).date()) if person.away else None
        if span is not None:
            back = datetime.combine(span[1] + timedelta(days=1), time(0), tzinfo=zone)
            t = back.astimezone(UTC)
            continue
        if calendar is not None and not calendar.is_open(t):
            t = calendar.next_open(t)
            continue
        return t
    return None


def duty_intervals(
    rules: Rules, person: Person, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """The intervals of [start, end) in which the person is on duty (UTC, in order)."""
    calendar = rules.calendars.get(person.calendar) if person.calendar else None
    spans = calendar.open_intervals(start, end) if calendar is not None else [(start, end)]
    if not person.away:
        return spans
    zone = _zone(rules, person)
    out: list[tuple[datetime, datetime]] = []
    for a, b in spans:
        # Cut each open interval at local midnights and drop the away days.
        t = a
        while t < b:
            local = t.astimezone(zone)
            midnight = datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=zone)
            piece_end = min(b, midnight.astimezone(UTC))
            if _away_range(person, local.date()) is None:
                if out and out[-1][1] == t:
                    out[-1] = (out[-1][0], piece_end)
                else:
                    out.append((t, piece_end))
            t = piece_end
    return out


def on_duty_within(rules: Rules, person: Person, start: datetime, end: datetime) -> bool:
    """True when the person is on duty at some instant of [start, end)."""
    found = next_on_duty(rules, person, start, horizon=max(end - start, timedelta(0)))
    return found is not None and found < end


@dataclass(frozen=True)
class Resolved:
    """Who a role resolved to at an instant, whether they are on duty then, and why others
    were passed over (for the event log and the staff mail)."""

    person: Person
    on_duty: bool
    skipped: tuple[str, ...] = ()


def walk_chain(
    rules: Rules,
    chain: list[tuple[str, Person | None]],
    at: datetime,
    policy: SlaPolicy | None = None,
    notes: tuple[str, ...] = (),
) -> Resolved:
    """The first person of `chain`, then the policy's on-call people, then the default owner,
    who is on duty at `at`; else the one on duty soonest (ties: earliest in the chain)."""
    full = list(chain)
    if policy is not None:
        full += [("on call", rules.people.get(pid)) for pid in policy.on_call]
    full.append(("default owner", rules.people.get(rules.defaults.owner)))
    skipped: list[str] = list(notes)
    seen: set[str] = set()
    candidates: list[tuple[str, Person]] = []
    for label, person in full:
        if person is None:
            if label in ROLE_ORDER:
                skipped.append(f"no {label}")
            continue
        if person.id in seen:
            continue
        seen.add(person.id)
        candidates.append((label, person))
        if on_duty(rules, person, at):
            if label == "default owner" and skipped:
                skipped.append(f"nobody on duty in the ladder: default owner {person.name} used")
            elif label == "on call" and skipped:
                skipped.append(f"{person.name} is on call")
            return Resolved(person, True, tuple(skipped))
        skipped.append(f"{person.name} ({label}) skipped: {_why_off(rules, person, at)}")
    if not candidates:
        raise ValueError("no person to walk to: [defaults] owner is unknown")
    return _soonest(rules, candidates, at, skipped)


def _soonest(
    rules: Rules, candidates: list[tuple[str, Person]], at: datetime, skipped: list[str]
) -> Resolved:
    """Nobody in the chain is on duty at `at`: the one on duty soonest (ties: earliest in
    the chain), else the last candidate, who stays named."""
    best: tuple[datetime, int, Person] | None = None
    for index, (_label, person) in enumerate(candidates):
        when = next_on_duty(rules, person, at)
        if when is not None and (best is None or (when, index) < best[:2]):
            best = (when, index, person)
    if best is None:
        person = candidates[-1][1]
        skipped.append(f"nobody on duty within {HORIZON.days} days: {person.name} stays named")
        return Resolved(person, False, tuple(skipped))
    when, _, person = best
    skipped.append(
        f"nobody on duty now: {person.name} is on duty soonest ({when.isoformat()}) and"
        " stays accountable"
    )
    return Resolved(person, False, tuple(skipped))


def _why_off(rules: Rules, person: Person, at: datetime) -> str:
    if is_away(rules, person, at):
        return "away"
    calendar = rules.calendars.get(person.calendar) if person.calendar else None
    hours = calendar.describe_hours() if calendar is not None else "?"
    return f"off duty ({hours})"


def resolve(
    rules: Rules, policy: SlaPolicy | None, who: str, owner: Person, at: datetime
) -> Resolved:
    """Resolve an escalation target ("owner", "backup", "manager" or a person id) relative
    to `owner` at `at`, walking on to whoever is on duty (see the module docstring)."""
    notes: list[str] = []
    if who in ROLE_ORDER:
        first = rules.resolve(who, owner)
        if first is None:
            notes.append(f"{owner.name} has no {who}")
        rest = ROLE_ORDER[ROLE_ORDER.index(who) + 1 :]
        chain: list[tuple[str, Person | None]] = [(who, first)] if first is not None else []
        chain += [(role, rules.resolve(role, owner)) for role in rest]
    else:
        person = rules.people.get(who)
        if person is None:
            notes.append(f"{who!r} names nobody")
            chain = []
        else:
            chain = [(who, person)]
            chain += [(role, rules.resolve(role, person)) for role in ("backup", "manager")]
    return walk_chain(rules, chain, at, policy, tuple(notes))


def owner_for_window(
    rules: Rules, policy: SlaPolicy | None, person: Person, start: datetime, end: datetime | None
) -> Resolved:
    """Who to name as owner for a response window [start, end): `person` when on duty at some
    instant of it, else the first of their backup, manager, the on-call people and the
    default owner who is; else whoever is on duty soonest. The acknowledgement never names
    someone away (or off duty) for the whole window (docs/decisions.md D11, "Coverage and
    absence")."""
    if end is None or end <= start:
        end = start + timedelta(minutes=1)
    chain: list[tuple[str, Person | None]] = [("owner", person)]
    chain += [(role, rules.resolve(role, person)) for role in ("backup", "manager")]
    if policy is not None:
        chain += [("on call", rules.people.get(pid)) for pid in policy.on_call]
    chain.append(("default owner", rules.people.get(rules.defaults.owner)))
    skipped: list[str] = []
    seen: set[str] = set()
    for label, candidate in chain:
        if candidate is None or candidate.id in seen:
            continue
        seen.add(candidate.id)
        if on_duty_within(rules, candidate, start, end):
            return Resolved(candidate, on_duty(rules, candidate, start), tuple(skipped))
        skipped.append(
            f"{candidate.name} ({label}) skipped: not on duty before {end.isoformat()}"
            f" ({_why_off(rules, candidate, start)})"
        )
    return walk_chain(rules, [("owner", person)], start, policy, tuple(skipped))


def pick_on_duty(rules: Rules, team: tuple[str, ...], at: datetime) -> tuple[str, ...]:
    """The members of `team` on duty at `at`; when none is, those on duty soonest (so
    round-robin and least-open never hand a new ticket to someone away or asleep while a
    colleague works). Order is kept; unknown ids are left to the loader's checks."""
    people = [rules.people[pid] for pid in team if pid in rules.people]
    now = tuple(p.id for p in people if on_duty(rules, p, at))
    if now:
        return now
    soonest: dict[str, datetime] = {}
    for p in people:
        when = next_on_duty(rules, p, at)
        if when is not None:
            soonest[p.id] = when
    if not soonest:
        return team
    first = min(soonest.values())
    return tuple(pid for pid in team if soonest.get(pid) == first)
