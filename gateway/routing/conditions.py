"""Route match conditions: one spec per `[route.match]` key, in one registry.

Each `Condition` says everything about one match key (docs/rules.md "Match keys"):

- ``key``: the TOML key under ``match``;
- ``load``: how its TOML value is validated and turned into the value the check uses
  (mistakes go to a `Report`, which the loader turns into ``file:line: message``);
- ``check``: whether it holds for a message's `MessageFacts`, and the words `rules explain`
  and the audit trail show for it (the explanation is part of the answer, so the trace says
  which address, glob or pattern decided);
- ``cost``: the evaluation order; cheap checks run first and a route stops at the first
  condition that fails;
- ``fact`` (optional): how to read a new fact from the parsed message, for a condition that
  needs one `MessageFacts` does not carry yet (`facts_from` fills ``MessageFacts.extra``).

The loader (`load_match`), the engine (`match_reasons`) and explain all iterate `CONDITIONS`;
adding a match key is one `Condition` here plus a row in docs/rules.md (recipe in
docs/architecture.md). Nothing here reads files or clocks.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Generic, Protocol, TypeVar

from gateway.routing.facts import MessageFacts
from gateway.routing.locator import Key
from gateway.routing.model import Match, Pattern, ScoreTest
from gateway.sla.business_time import BusinessCalendar

__all__ = [
    "CONDITIONS",
    "Condition",
    "Moment",
    "Report",
    "Verdict",
    "extra_facts",
    "load_match",
    "match_reasons",
    "unknown_key",
]

T = TypeVar("T")
#: Does the condition hold, and the words that say why (or why not).
Verdict = tuple[bool, str]


class Report(Protocol):
    """Where a condition's loader reports mistakes (the rules loader implements it)."""

    def problem(self, at: Key, message: str) -> None:
        """One mistake at ``at`` (relative to the match table); the loader adds the label."""

    def nested(self, key: str) -> Report:
        """The report for the table under ``key`` (``not``)."""


@dataclass(frozen=True)
class Moment:
    """When the message arrived and the calendar `business_hours` is judged in."""

    at: datetime
    calendar: BusinessCalendar


@dataclass(frozen=True)
class Condition(Generic[T]):
    """One match key: how to load it, check it and explain it (module docstring)."""

    key: str
    load: Callable[[str, Any, Report], T | None]
    #: One verdict, or one per part when the parts are conditions of their own (`header`).
    check: Callable[[T, MessageFacts, Moment], Verdict | list[Verdict]]
    cost: int
    #: Allowed inside ``not`` (``not`` itself is not: one level is enough to read).
    nested: bool = True
    #: Reads a new fact from the parsed message (gateway.pipeline.parse.ParsedMessage).
    fact: Callable[[Any], object] | None = None


def unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    """The words for a key nobody defined, with the closest allowed key as a hint."""
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"unknown key '{key}'{suggestion}; allowed: {', '.join(allowed)}"


# ------------------------------------------------------------------------------ loading


def _strings(key: str, value: Any, report: Report) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    if isinstance(value, str) and value.strip():
        return (value.strip(),)
    if isinstance(value, list) and not value:
        report.problem((key,), f"'{key}' must not be empty")
        return ()
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(v.strip() for v in value)
    report.problem((key,), f"'{key}' must be a string or a list of strings")
    return ()


def _load_addresses(key: str, value: Any, report: Report) -> tuple[str, ...]:
    values = _strings(key, value, report)
    for item in values:
        if "@" not in item and not any(c in item for c in "*?["):
            report.problem(
                (key,),
                f"'{key}' value '{item}' is not an address or a glob like *@example.com",
            )
    # Addresses compare case-insensitively (docs/design.md §4): lowercase once here.
    return tuple(v.lower() for v in values)


def _patterns(key: str, at: Key, value: Any, report: Report) -> tuple[Pattern, ...]:
    if isinstance(value, str):
        items: list[tuple[Key, str]] = [(at, value)]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items = [((*at, i), v) for i, v in enumerate(value)]
    else:
        report.problem(at, f"'{key}' must be a regular expression or a list of them")
        return ()
    compiled: list[Pattern] = []
    for where, text in items:
        try:
            compiled.append(Pattern.compile(text))
        except re.error as error:
            report.problem(where, f"bad regular expression in {key} '{text}': {error}")
    return tuple(compiled)


def _load_patterns(key: str, value: Any, report: Report) -> tuple[Pattern, ...]:
    return _patterns(key, (key,), value, report)


def _load_headers(
    key: str, value: Any, report: Report
) -> tuple[tuple[str, tuple[Pattern, ...]], ...]:
    if not isinstance(value, dict):
        report.problem((key,), f"'{key}' must be a table of header name to regular expression")
        return ()
    return tuple(
        (name, _patterns(f"header {name}", (key, name), patterns, report))
        for name, patterns in value.items()
    )


def _load_bool(key: str, value: Any, report: Report) -> bool | None:
    if isinstance(value, bool):
        return value
    report.problem((key,), f"'{key}' must be true or false")
    return None


_SCORE_RE = re.compile(r"(>=|>|<=|<)?\s*(-?\d+(?:\.\d+)?)")


def _load_score(key: str, value: Any, report: Report) -> ScoreTest | None:
    """``spam_score = ">= 5"`` (also >, <=, <), or a bare number meaning ">=" it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ScoreTest(">=", float(value))
    if isinstance(value, str) and (m := _SCORE_RE.fullmatch(value.strip())) is not None:
        return ScoreTest(m.group(1) or ">=", float(m.group(2)))
    report.problem(
        (key,),
        f"'{key}' must be a number or a comparison such as \">= 5\" (>=, >, <=, <)",
    )
    return None


def _load_not(key: str, value: Any, report: Report) -> Match:
    return load_match(value, report.nested(key), nested=True)


def load_match(value: Any, report: Report, *, nested: bool = False) -> Match:
    """A ``match`` table (or the ``not`` inside one) to a `Match`; mistakes to ``report``."""
    if not isinstance(value, dict):
        report.problem((), "'match' must be a table")
        return Match()
    allowed = tuple(c.key for c in CONDITIONS.values() if c.nested or not nested)
    for key in value:
        if key not in allowed:
            report.problem((key,), unknown_key(key, allowed))
    found: list[tuple[str, Any]] = []
    for condition in CONDITIONS.values():
        if condition.key not in value or condition.key not in allowed:
            continue
        loaded = condition.load(condition.key, value[condition.key], report)
        if loaded is not None and loaded != ():
            found.append((condition.key, loaded))
    return Match(tuple(found))


# ----------------------------------------------------------------------------- checking

_SUBJECT_SHOWN = 60


def _shorten(text: str, limit: int = _SUBJECT_SHOWN) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _first_glob(value: str, globs: tuple[str, ...]) -> str | None:
    # The loader lowercased the globs (docs/design.md §4: addresses are case-insensitive).
    lowered = value.lower()
    return next((g for g in globs if fnmatchcase(lowered, g)), None)


def _first_search(text: str, patterns: tuple[Pattern, ...]) -> Pattern | None:
    return next((p for p in patterns if p.regex.search(text)), None)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _check_to(globs: tuple[str, ...], facts: MessageFacts, _: Moment) -> tuple[bool, str]:
    hits = [(r, g) for r in facts.recipients if (g := _first_glob(r, globs))]
    if hits:
        address, glob = hits[0]
        return True, f"to: {address}" + (f" matches {glob}" if glob != address else "")
    shown = ", ".join(facts.recipients) or "(no recipients)"
    return False, f"to: {shown} not in {', '.join(globs)}"


def _check_from(globs: tuple[str, ...], facts: MessageFacts, _: Moment) -> tuple[bool, str]:
    glob = _first_glob(facts.sender, globs) if facts.sender else None
    sender = facts.sender or "(no sender)"
    if glob:
        return True, f"from: {sender}" + (f" matches {glob}" if glob != sender else "")
    return False, f"from: {sender} not in {', '.join(globs)}"


def _flag(label: str, fact: Callable[[MessageFacts], bool]) -> Callable[..., tuple[bool, str]]:
    """A yes/no condition on a yes/no fact ("authenticated: no (route wants yes)")."""

    def check(wanted: bool, facts: MessageFacts, _: Moment) -> tuple[bool, str]:
        actual = fact(facts)
        why = f"{label}: {_yes(actual)}"
        return actual == wanted, why + (
            "" if actual == wanted else f" (route wants {_yes(wanted)})"
        )

    return check


def _check_score(test: ScoreTest, facts: MessageFacts, _: Moment) -> tuple[bool, str]:
    score = facts.spam_score
    if score is None:
        return False, f"spam score: none from a trusted front filter (route wants {test.text})"
    if test.holds(score):
        return True, f"spam score {score:g} {test.text}"
    return False, f"spam score {score:g} is not {test.text}"


def _check_headers(
    headers: tuple[tuple[str, tuple[Pattern, ...]], ...], facts: MessageFacts, _: Moment
) -> list[Verdict]:
    # One verdict per named header: each is a condition of its own (inside `not`, any
    # header that matches makes the route fail).
    verdicts: list[Verdict] = []
    for name, patterns in headers:
        values = facts.header_values(name)
        hit = next((p for v in values if (p := _first_search(v, patterns))), None)
        wanted = " or ".join(p.text for p in patterns)
        if hit is not None:
            verdicts.append((True, f"header {name} matched {hit.text}"))
        elif not values:
            verdicts.append((False, f"header {name}: absent (route wants {wanted})"))
        else:
            shown = ", ".join(_shorten(v, 40) for v in values)
            verdicts.append((False, f"header {name}: {shown} did not match {wanted}"))
    return verdicts


def _check_subject(
    patterns: tuple[Pattern, ...], facts: MessageFacts, _: Moment
) -> tuple[bool, str]:
    hit = _first_search(facts.subject, patterns)
    if hit is not None:
        return True, f"subject matched {hit.text}"
    wanted = " or ".join(p.text for p in patterns)
    return False, f'subject "{_shorten(facts.subject)}" did not match {wanted}'


def _check_body(patterns: tuple[Pattern, ...], facts: MessageFacts, _: Moment) -> tuple[bool, str]:
    hit = _first_search(facts.body, patterns)
    if hit is not None:
        return True, f"body matched {hit.text}"
    return False, f"body did not match {' or '.join(p.text for p in patterns)}"


def _check_business_hours(wanted: bool, _: MessageFacts, when: Moment) -> tuple[bool, str]:
    is_open = when.calendar.is_open(when.at)
    text = f"{'inside' if is_open else 'outside'} business hours of calendar '{when.calendar.id}'"
    if is_open == wanted:
        return True, text
    return False, f"{text} (route wants {'inside' if wanted else 'outside'})"


def _check_not(none_of: Match, facts: MessageFacts, when: Moment) -> tuple[bool, str]:
    reasons: list[str] = []
    for holds, why in match_reasons(none_of, facts, when):
        if holds:
            return False, f"not: {why}"
        reasons.append(why)
    return True, "not: " + "; ".join(reasons)


def match_reasons(match: Match, facts: MessageFacts, when: Moment) -> Iterator[tuple[bool, str]]:
    """Each condition the match gives, as (holds, explanation), cheapest first.

    Callers stop at the first that fails.
    """
    for condition in sorted(CONDITIONS.values(), key=lambda c: c.cost):
        value = match.get(condition.key)
        if value is None:
            continue
        verdict = condition.check(value, facts, when)
        if isinstance(verdict, list):
            yield from verdict
        else:
            yield verdict


# ----------------------------------------------------------------------------- registry

#: Every match key, in the order docs/rules.md lists them (and error messages name them).
CONDITIONS: dict[str, Condition[Any]] = {
    c.key: c
    for c in (
        Condition("to", _load_addresses, _check_to, cost=10),
        Condition("from", _load_addresses, _check_from, cost=20),
        Condition("subject", _load_patterns, _check_subject, cost=80),
        Condition("body", _load_patterns, _check_body, cost=90),
        Condition("header", _load_headers, _check_headers, cost=70),
        Condition(
            "authenticated", _load_bool, _flag("authenticated", lambda f: f.authenticated), 30
        ),
        Condition(
            "has_attachment", _load_bool, _flag("has attachment", lambda f: f.has_attachment), 40
        ),
        Condition("business_hours", _load_bool, _check_business_hours, cost=100),
        # The trusted front filter's verdict (gateway.security.spam): untrusted headers never
        # make these hold.
        Condition("spam", _load_bool, _flag("spam (trusted front filter)", lambda f: f.spam), 50),
        Condition("spam_score", _load_score, _check_score, cost=60),
        Condition("not", _load_not, _check_not, cost=1000, nested=False),
    )
}


def extra_facts(parsed: Any) -> tuple[tuple[str, object], ...]:
    """The facts conditions with a ``fact`` reader add (`MessageFacts.extra`)."""
    return tuple((c.key, c.fact(parsed)) for c in CONDITIONS.values() if c.fact is not None)
