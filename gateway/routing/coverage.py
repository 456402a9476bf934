"""Coverage: can an SLA policy be kept by the people who would act on it?

docs/decisions.md D11.7: a 24x7 policy whose every ladder member works Berlin office hours passed
`rules check` without a word, and at night its promises went to people asleep. For each
policy this computes, over a window (the coming 4 weeks for `rules check`), the hours the
policy's calendar runs when **nobody** who could act on one of its tickets is on duty
(`gateway.sla.duty`: working hours minus `away` days):

- the people who can own such a ticket (owners and team members of the routes that can give
  it this policy, the default owner), and
- everyone its ladder reaches from them (backup, manager, person ids named in steps) and the
  policy's `on_call` people.

Hours uncovered are a warning (`file:line: warning: ...`, exit 0); a policy that no one can
serve at any of its hours in the window fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.routing.model import ROLES, Person, Rules
from gateway.sla.duty import duty_intervals

__all__ = ["Coverage", "candidates", "coverage", "coverage_report"]

#: `rules check` looks this far ahead.
WINDOW = timedelta(weeks=4)


@dataclass(frozen=True)
class Coverage:
    """One policy over [start, end): its open time, and the open time nobody covers."""

    policy: str
    people: tuple[str, ...]
    open_time: timedelta
    gaps: tuple[tuple[datetime, datetime], ...]

    @property
    def uncovered(self) -> timedelta:
        return sum((b - a for a, b in self.gaps), timedelta(0))

    @property
    def never(self) -> bool:
        """True when nobody is on duty at any of the policy's open hours."""
        return self.open_time > timedelta(0) and self.uncovered >= self.open_time


def _owners(rules: Rules, policy_id: str) -> list[str]:
    """Who can own a ticket under this policy: owners/teams of the routes that set it or
    follow a `continue` route that set it, and the default owner."""
    out: list[str] = [rules.defaults.owner]
    continuing = False
    for route in rules.routes:
        if (
            route.sla == policy_id
            or continuing
            or (route.sla is None and rules.defaults.sla == policy_id)
        ):
            out += ([route.owner] if route.owner else []) + list(route.team)
        # A continue route that sets the policy hands its tickets to the routes after it.
        continuing = continuing or (route.sla == policy_id and route.continue_)
    return out


def candidates(rules: Rules, policy_id: str) -> list[Person]:
    """Everyone who could act on a ticket of this policy (see the module docstring)."""
    policy = rules.policy(policy_id)
    ids = _owners(rules, policy_id)
    ids += [w for s in policy.escalation for w in (s.notify, s.assign) if w and w not in ROLES]
    ids += list(policy.on_call)
    seen: dict[str, Person] = {}
    todo = list(ids)
    while todo:
        pid = todo.pop(0)
        person = rules.people.get(pid)
        if person is None or pid in seen:
            continue
        seen[pid] = person
        todo += [p for p in (person.backup, person.manager) if p]
    return list(seen.values())


def _merge(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def coverage(rules: Rules, policy_id: str, start: datetime, end: datetime) -> Coverage:
    """The open time of the policy's calendar in [start, end) and the parts nobody covers."""
    calendar = rules.calendar_for_policy(policy_id)
    people = candidates(rules, policy_id)
    opened = _merge(calendar.open_intervals(start, end))
    duty = _merge([span for p in people for span in duty_intervals(rules, p, start, end)])
    gaps: list[tuple[datetime, datetime]] = []
    for a, b in opened:
        t = a
        for c, d in duty:
            if d <= t or c >= b:
                continue
            if c > t:
                gaps.append((t, c))
            t = max(t, d)
            if t >= b:
                break
        if t < b:
            gaps.append((t, b))
    total = sum((b - a for a, b in opened), timedelta(0))
    return Coverage(policy_id, tuple(p.id for p in people), total, tuple(_merge(gaps)))


def _hours(value: timedelta) -> str:
    hours = value.total_seconds() / 3600
    return f"{hours:.0f}h" if hours == int(hours) else f"{hours:.1f}h"


def coverage_report(rules: Rules, start: datetime) -> tuple[list[str], list[str]]:
    """(`warnings`, `errors`) for `rules check`, each a `file:line: ...` line."""
    warnings: list[str] = []
    errors: list[str] = []
    end = start + WINDOW
    for policy_id in sorted(rules.sla):
        result = coverage(rules, policy_id, start, end)
        if not result.gaps:
            continue
        where = rules.where.get(f"sla.{policy_id}", f"sla.{policy_id}")
        calendar = rules.calendar_for_policy(policy_id)
        who = ", ".join(result.people) or "nobody"
        if result.never:
            errors.append(
                f"{where}: sla '{policy_id}' can never be served: none of {who} is on duty"
                f" during its hours ({calendar.describe_hours()}) in the 4 weeks from"
                f" {start.date().isoformat()}; add people or on_call, or change its calendar"
            )
            continue
        zone = calendar.timezone
        shown = ", ".join(
            f"{a.astimezone(zone):%a %Y-%m-%d %H:%M}-{b.astimezone(zone):%a %H:%M}"
            for a, b in result.gaps[:3]
        )
        more = f" and {len(result.gaps) - 3} more" if len(result.gaps) > 3 else ""
        warnings.append(
            f"{where}: warning: sla '{policy_id}' has {_hours(result.uncovered)} of its"
            f" {_hours(result.open_time)} in the 4 weeks from {start.date().isoformat()} when"
            f" nobody on its ladder ({who}) is on duty: {shown}{more} ({zone.key});"
            " add on_call people or change the policy's calendar"
        )
    return warnings, errors
