"""`rules explain`: where a message would go, who owns it, when it is due, and why.

`explain` builds exactly the JSON object of docs/interface.md (`route`, `queue`, `priority`, `sla`,
`owner`, `acknowledge`, `deadlines`, `trace`) plus a few extra keys (`at`, `tags`, `notify`,
`assigned_by`, `matched_routes`, `calendar`, `business_hours_now`, and `letters`: the
language, brand and template file each letter would use). Deadlines are computed by
the same code the ticket store uses, as if the message arrived at `at`. `format_explain`
renders that object for a human, with every deadline in UTC and in the calendar's own zone.
Nothing here writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.letters.brands import identity
from gateway.letters.language import choose
from gateway.letters.templates import sources
from gateway.routing.engine import _NO_STATE, AssignmentState, cover_window, evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.model import Rules
from gateway.settings import Settings
from gateway.sla.deadlines import initial_deadlines, isoz

__all__ = ["explain", "format_explain"]

_CLOCK_LABELS = (
    ("first_response", "first response"),
    ("next_response", "next response"),
    ("resolution", "resolution"),
)


def letters_of(
    rules: Rules,
    route: str | None,
    language: str | None,
    brand: str | None,
    ack_template: bool | str,
    *,
    settings: Settings | None = None,
    content_language: Sequence[str] = (),
    text: str = "",
) -> dict[str, Any]:
    """The language, brand and template files a new ticket's letters would use (docs/decisions.md
    D17).

    The customer's earlier choice is not known here (no database): explain shows what the
    route, the header and the text say, as for a customer writing for the first time.
    """
    default = settings.outbound.default_language if settings is not None else "en"
    choice = choose(
        route=language,
        route_name=route,
        earlier=None,
        content_language=list(content_language),
        text=text,
        default=default,
    )
    templates_dir = settings.templates_path if settings is not None else None
    ack_name = ack_template if isinstance(ack_template, str) else "ack"
    every = sources(choice.lang, templates_dir, default_language=default, ack=ack_name)
    result: dict[str, Any] = {
        "language": choice.lang,
        "language_reason": choice.reason,
        "brand": brand,
        # Every letter of the registry (gateway.letters.templates.LETTERS): its file, and
        # its language in "template_languages" (staff letters are English).
        "templates": {letter: source for letter, (_lang, source) in every.items()},
        "template_languages": {letter: code for letter, (code, _src) in every.items()},
    }
    if settings is not None:
        me = identity(settings, rules, brand)
        result["from"] = me.from_address
        result["signature"] = me.signature
    return result


def explain(
    rules: Rules,
    facts: MessageFacts,
    at: datetime,
    state: AssignmentState = _NO_STATE,
    *,
    settings: Settings | None = None,
    content_language: Sequence[str] = (),
    text: str = "",
) -> dict[str, Any]:
    """The `rules explain --json` object for a message arriving at `at`."""
    decision = cover_window(rules, evaluate(rules, facts, at, state), at)
    policy = rules.policy(decision.sla)
    calendar = rules.calendar_for_policy(decision.sla)
    deadlines = initial_deadlines(policy, calendar, at)
    owner = decision.owner
    return {
        "route": decision.route,
        "queue": decision.queue,
        "priority": decision.priority,
        "sla": decision.sla,
        "owner": {"id": owner.id, "name": owner.name, "email": owner.email},
        "acknowledge": decision.acknowledge,
        "deadlines": deadlines.to_json(),
        "trace": [entry.to_json() for entry in decision.trace],
        "at": isoz(at),
        "tags": list(decision.tags),
        "notify": list(decision.notify),
        "assigned_by": decision.assigned_by,
        "matched_routes": list(decision.matched_routes),
        "disposition": decision.disposition,  # "ticket" | "junk" (docs/decisions.md D18)
        "calendar": {
            "id": calendar.id,
            "timezone": calendar.timezone.key,
            "hours": calendar.describe_hours(),
        },
        "business_hours_now": calendar.is_open(at),
        "letters": letters_of(
            rules,
            decision.route,
            decision.language,
            decision.brand,
            decision.acknowledge,
            settings=settings,
            content_language=content_language,
            text=text,
        ),
    }


def _both_zones(value: str | None, zone: ZoneInfo | None) -> str:
    """ "2026-11-23T14:00:00Z (Mon 2026-11-23 15:00 CET, Europe/Berlin)"."""
    if value is None:
        return "none"
    if zone is None:
        return value
    local = datetime.fromisoformat(value).astimezone(zone)
    return f"{value} ({local:%a %Y-%m-%d %H:%M} {local.tzname()}, {zone.key})"


def _ack_text(acknowledge: Any) -> str:
    if acknowledge is True:
        return "yes"
    if acknowledge is False:
        return "no"
    return f"yes, with template '{acknowledge}'"


def _arrived_lines(result: dict[str, Any], zone: ZoneInfo | None) -> list[str]:
    if not result.get("at"):
        return []
    arrived = f"Arrived at:   {_both_zones(result['at'], zone)}"
    if "business_hours_now" in result:
        arrived += ", " + (
            "inside business hours" if result["business_hours_now"] else "outside business hours"
        )
    return [arrived]


def _deadline_lines(result: dict[str, Any], zone: ZoneInfo | None) -> list[str]:
    lines = ["Deadlines:"]
    deadlines = result.get("deadlines") or {}
    for key, label in _CLOCK_LABELS:
        value = deadlines.get(key)
        if value is None and key == "next_response":
            text = "not running (starts when the customer writes after a reply)"
        else:
            text = _both_zones(value, zone)
        lines.append(f"  {label:<15} {text}")
    return lines


def _letters_lines(letters: dict[str, Any] | None) -> list[str]:
    if not letters:
        return []
    brand = letters.get("brand") or "(none: the installation's own address)"
    lines = [
        f"Language:     {letters['language']} ({letters['language_reason']})",
        f"Brand:        {brand}" + (f", from {letters['from']}" if letters.get("from") else ""),
        "Templates:",
    ]
    codes = letters.get("template_languages", {})
    for letter, source in letters["templates"].items():
        lines.append(f"  {letter:<15} {codes.get(letter, letters['language'])}  {source}")
    return lines


def _trace_lines(trace: list[dict[str, Any]]) -> list[str]:
    lines = ["Trace:"]
    if not trace:
        lines.append("  (no routes defined)")
    for entry in trace:
        mark = "MATCH" if entry["matched"] else "no   "
        lines.append(f"  {mark} {entry['route']}: {entry['why']}")
    return lines


def format_explain(result: dict[str, Any]) -> str:
    """Readable text for `rules explain` without `--json`."""
    calendar = result.get("calendar") or {}
    zone = ZoneInfo(calendar["timezone"]) if calendar.get("timezone") else None
    owner = result["owner"]
    route = result["route"] or "(no route matched: defaults)"
    ack_text = _ack_text(result["acknowledge"])
    lines = [
        f"Route:        {route}",
        f"Queue:        {result['queue']}",
        f"Priority:     {result['priority']}",
        f"Owner:        {owner['name']} <{owner['email']}> ({owner['id']}"
        + (f", assigned by {result['assigned_by']}" if result.get("assigned_by") else "")
        + ")",
        f"Acknowledge:  {ack_text}",
    ]
    if result.get("disposition") == "junk":
        # docs/decisions.md D18: no ticket, no acknowledgement, no notification, no clock.
        lines.insert(0, "Disposition:  JUNK (kept in the junk folder: no ticket, no ack, no clock)")
    if result.get("tags"):
        lines.append(f"Tags:         {', '.join(result['tags'])}")
    if result.get("notify"):
        lines.append(f"Notify:       {', '.join(result['notify'])}")
    sla_line = f"SLA:          {result['sla']}"
    if calendar:
        sla_line += f" (calendar {calendar['id']}: {calendar['hours']})"
    lines.append(sla_line)
    lines += _arrived_lines(result, zone)
    lines += _deadline_lines(result, zone)
    lines += _letters_lines(result.get("letters"))
    lines += _trace_lines(result.get("trace") or [])
    return "\n".join(lines)
