"""Read, validate and merge `rules/*.toml` into a `Rules` value.

Admins edit these files by hand and run `support-gateway rules check` before reloading, so
every mistake is reported at once, each as `file:line: message` with the best line we can
find. `tomllib` gives line numbers only for syntax errors; for everything else a small
scanner (`_Locator`) maps each key path ("route", 2, "owner") to the line it was written on.

When a file has a syntax error the cross-file checks (unknown references, missing
`[defaults]`) are skipped: everything defined in the broken file would otherwise be reported
as unknown, burying the one real mistake under noise.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from gateway.routing.conditions import load_match
from gateway.routing.model import (
    ASSIGN_MODES,
    DISPOSITIONS,
    PRIORITIES,
    ROLES,
    Brand,
    Defaults,
    EscalationStep,
    Match,
    Person,
    Route,
    Rules,
    SlaPolicy,
)
from gateway.sla import durations
from gateway.sla.business_time import (
    BusinessCalendar,
    day_indexes,
    parse_day,
    parse_holiday_dates,
    parse_hours,
    parse_timezone,
    public_holidays,
)

__all__ = ["Problem", "RulesError", "check_rules", "load_rules"]

Key = tuple[str | int, ...]

TOP_LEVEL_KEYS = ("people", "calendars", "sla", "defaults", "route", "brands")
BRAND_KEYS = (
    "from_address",
    "from_name",
    "signature",
    "business_name",
    "reply_domain",
    "dkim",
    "description",
)
BRAND_DKIM_KEYS = ("domain", "selector", "key_file")
LANGUAGE_CODES = ("en", "de", "fr", "es", "ru")
PERSON_KEYS = ("name", "email", "calendar", "backup", "manager", "away")
CALENDAR_KEYS = ("timezone", "hours", "holidays", "country", "subdivision", "description")
SLA_KEYS = (
    "calendar",
    "first_response",
    "next_response",
    "resolution",
    "customer_notice",
    "escalation",
    "warn_at",
    "on_call",
    "description",
)
STEP_KEYS = ("after", "notify", "assign")
#: A route's `known_customer` (issue 12, docs/threading.md), as `tickets.known_customer`.
KNOWN_CUSTOMER = ("same-subject", "separate")
DEFAULTS_KEYS = ("owner", "queue", "sla", "priority", "acknowledge")
ROUTE_KEYS = (
    "name",
    "description",
    "match",
    "queue",
    "owner",
    "team",
    "assign",
    "sla",
    "priority",
    "tags",
    "acknowledge",
    "notify",
    "continue",
    "disposition",
    "known_customer",
    "language",
    "brand",
)

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")
_TEMPLATE_RE = re.compile(r"[A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One mistake in the rules, printed as `file:line: message`."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class RulesError(Exception):
    """The rules are invalid; `problems` lists every mistake found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- locating lines


class _Locator:
    """Maps key paths to the line they appear on, by scanning TOML text the parser accepted.

    Paths use ints for array positions, so the third `[[route]]`'s owner is
    ("route", 2, "owner") and the second escalation step is ("sla", "std", "escalation", 1).
    Best effort: on anything unexpected it keeps what it found so far.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[Key, int] = {}
        self._text = text
        self._pos = 0
        self._line = 1
        with contextlib.suppress(IndexError, ValueError):
            self._scan()

    def line(self, path: Key) -> int:
        """Line of `path`, else of its closest recorded ancestor, else 1."""
        for end in range(len(path), 0, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return 1

    # -- scanning
    def _peek(self, ahead: int = 0) -> str:
        index = self._pos + ahead
        return self._text[index] if index < len(self._text) else ""

    def _skip(self, newlines: bool = False) -> None:
        while self._pos < len(self._text):
            char = self._text[self._pos]
            if char in " \t\r":
                self._pos += 1
            elif char == "#":
                while self._pos < len(self._text) and self._text[self._pos] != "\n":
                    self._pos += 1
            elif char == "\n" and newlines:
                self._line += 1
                self._pos += 1
            else:
                return

    def _string(self) -> str:
        quote = self._peek()
        start = self._pos + 1
        self._pos = start
        if quote == "'":
            end = self._text.index("'", start)
            self._pos = end + 1
            return self._text[start:end]
        chars: list[str] = []
        while self._peek() != '"':
            if self._peek() == "\\":
                chars.append(self._text[self._pos : self._pos + 2])
                self._pos += 2
            else:
                chars.append(self._peek())
                self._pos += 1
        self._pos += 1
        return "".join(chars)

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip()
            if self._peek() in ("'", '"'):
                parts.append(self._string())
            else:
                start = self._pos
                while self._peek() and (self._peek().isalnum() or self._peek() in "_-"):
                    self._pos += 1
                if self._pos == start:
                    raise ValueError("no key")
                parts.append(self._text[start : self._pos])
            self._skip()
            if self._peek() != ".":
                return tuple(parts)
            self._pos += 1

    def _multiline(self) -> None:
        quote = self._text[self._pos : self._pos + 3]
        index = self._pos + 3
        while True:
            end = self._text.index(quote, index)
            backslashes = 0
            while quote == '"""' and self._text[end - 1 - backslashes] == "\\":
                backslashes += 1
            if backslashes % 2 == 0:
                break
            index = end + 1
        end += 3
        while end < len(self._text) and self._text[end] == quote[0] and end - self._pos < 8:
            end += 1  # up to two quotes may be part of the content
        self._line += self._text.count("\n", self._pos, end)
        self._pos = end

    def _value(self, path: Key) -> None:
        self._skip()
        char = self._peek()
        if self._text.startswith('"""', self._pos) or self._text.startswith("'''", self._pos):
            self._multiline()
        elif char in ("'", '"'):
            self._string()
        elif char == "[":
            self._pos += 1
            index = 0
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._pos += 1
                    return
                self.lines.setdefault((*path, index), self._line)
                self._value((*path, index))
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._pos += 1
                    index += 1
                elif self._peek() != "]":
                    raise ValueError("bad array")
        elif char == "{":
            self._pos += 1
            while True:
                self._skip(newlines=True)
                if self._peek() == "}":
                    self._pos += 1
                    return
                sub = (*path, *self._key())
                self.lines.setdefault(sub, self._line)
                if self._peek() != "=":
                    raise ValueError("bad inline table")
                self._pos += 1
                self._value(sub)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._pos += 1
        else:
            while self._peek() and self._peek() not in ",]}\n#":
                self._pos += 1

    def _scan(self) -> None:
        table: Key = ()
        arrays: dict[tuple[str, ...], int] = {}
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            if self._peek() == "[":
                double = self._peek(1) == "["
                self._pos += 2 if double else 1
                raw = self._key()
                self._pos += 2 if double else 1
                resolved: list[str | int] = []
                for end in range(1, len(raw) + 1):
                    resolved.append(raw[end - 1])
                    if raw[:end] in arrays and not (double and end == len(raw)):
                        resolved.append(arrays[raw[:end]])
                if double:
                    self.lines.setdefault(tuple(resolved), self._line)
                    arrays[raw] = arrays.get(raw, -1) + 1
                    resolved.append(arrays[raw])
                table = tuple(resolved)
                for end in range(1, len(table) + 1):
                    self.lines.setdefault(table[:end], self._line)
            else:
                path = (*table, *self._key())
                for end in range(len(table) + 1, len(path) + 1):
                    self.lines.setdefault(path[:end], self._line)
                if self._peek() != "=":
                    raise ValueError("bad key/value")
                self._pos += 1
                self._value(path)
            self._skip()


def _hours_key(value: Any) -> str | tuple[str, str]:
    """Where in `hours` a parse error lies: the first bad day entry, else `hours` itself."""
    if isinstance(value, dict):
        for key, day_value in value.items():
            try:
                day_indexes(key)
                parse_day(day_value, key)
            except ValueError:
                return ("hours", key)
    return "hours"


def _syntax_line(message: str, text: str) -> int:
    match = re.search(r"at line (\d+)", message)
    if match:
        return int(match.group(1))
    return max(1, len(text.splitlines()))  # "at end of document"


# --------------------------------------------------------------------------- loading


@dataclass
class _Source:
    """One parsed rules file."""

    path: Path
    data: dict[str, Any]
    locator: _Locator

    @property
    def name(self) -> str:
        return str(self.path)

    def where(self, path: Key) -> str:
        return f"{self.name}:{self.locator.line(path)}"


@dataclass
class _Ref:
    """A reference to a person, calendar or SLA policy, checked once everything is loaded."""

    kind: str  # "person" | "calendar" | "sla" | "brand"
    id: str
    source: _Source
    path: Key
    label: str


@dataclass
class _Loader:
    rules_dir: Path
    problems: list[Problem] = field(default_factory=list)
    refs: list[_Ref] = field(default_factory=list)
    # id -> (value, where it was defined)
    people: dict[str, tuple[Person, str]] = field(default_factory=dict)
    calendars: dict[str, tuple[BusinessCalendar, str]] = field(default_factory=dict)
    calendar_ids: dict[str, str] = field(default_factory=dict)  # incl. invalid ones
    policies: dict[str, tuple[SlaPolicy, str]] = field(default_factory=dict)
    policy_ids: dict[str, str] = field(default_factory=dict)
    defaults: tuple[Defaults, _Source] | None = None
    defaults_seen: str | None = None
    routes: list[Route] = field(default_factory=list)
    route_names: dict[str, str] = field(default_factory=dict)
    brands: dict[str, Brand] = field(default_factory=dict)

    # -- reporting
    def problem(self, source: _Source, path: Key, message: str) -> None:
        self.problems.append(Problem(source.name, source.locator.line(path), message))

    def unknown_keys(
        self,
        source: _Source,
        path: Key,
        data: Mapping[str, Any],
        allowed: tuple[str, ...],
        label: str,
    ) -> None:
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.problem(
                    source,
                    (*path, key),
                    f"{label}: unknown key '{key}'{suggestion}; allowed: {', '.join(allowed)}",
                )

    # -- typed getters: report and return None on a wrong type
    def string(
        self,
        source: _Source,
        path: Key,
        data: Mapping[str, Any],
        key: str,
        label: str,
        required: bool = False,
    ) -> str | None:
        if key not in data:
            if required:
                self.problem(source, path, f"{label}: missing required key '{key}'")
            return None
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            self.problem(source, (*path, key), f"{label}: '{key}' must be a non-empty string")
            return None
        return value.strip()

    def boolean(
        self, source: _Source, path: Key, data: Mapping[str, Any], key: str, label: str
    ) -> bool | None:
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, bool):
            self.problem(source, (*path, key), f"{label}: '{key}' must be true or false")
            return None
        return value

    def strings(
        self, source: _Source, path: Key, data: Mapping[str, Any], key: str, label: str
    ) -> tuple[str, ...]:
        """A string or a list of strings."""
        if key not in data:
            return ()
        value = data[key]
        if isinstance(value, str) and value.strip():
            return (value.strip(),)
        if isinstance(value, list) and not value:
            self.problem(source, (*path, key), f"{label}: '{key}' must not be empty")
            return ()
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) and v.strip() for v in value)
        ):
            return tuple(v.strip() for v in value)
        self.problem(
            source, (*path, key), f"{label}: '{key}' must be a string or a list of strings"
        )
        return ()

    def table(self, source: _Source, path: Key, value: Any, label: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.problem(source, path, f"{label} must be a table")
        return None

    def ref(self, kind: str, id: str | None, source: _Source, path: Key, label: str) -> None:
        if id is not None:
            self.refs.append(_Ref(kind, id, source, path, label))

    def priority(
        self, source: _Source, path: Key, data: Mapping[str, Any], label: str
    ) -> str | None:
        value = self.string(source, path, data, "priority", label)
        if value is not None and value not in PRIORITIES:
            self.problem(
                source,
                (*path, "priority"),
                f"{label}: bad priority '{value}'; use one of {', '.join(PRIORITIES)}",
            )
            return None
        return value

    def known_customer(
        self, source: _Source, path: Key, data: Mapping[str, Any], label: str
    ) -> str | None:
        """Issue 12: the route's own policy for a known customer writing again."""
        if "known_customer" not in data:
            return None
        value = data["known_customer"]
        if value in KNOWN_CUSTOMER:
            return str(value)
        self.problem(
            source,
            (*path, "known_customer"),
            f"{label}: 'known_customer' must be one of {', '.join(KNOWN_CUSTOMER)}",
        )
        return None

    def acknowledge(
        self, source: _Source, path: Key, data: Mapping[str, Any], label: str
    ) -> bool | str | None:
        if "acknowledge" not in data:
            return None
        value = data["acknowledge"]
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and _TEMPLATE_RE.fullmatch(value):
            return value
        self.problem(
            source,
            (*path, "acknowledge"),
            f"{label}: 'acknowledge' must be true, false or a template name",
        )
        return None

    def disposition(
        self, source: _Source, path: Key, data: Mapping[str, Any], label: str
    ) -> str | None:
        if "disposition" not in data:
            return None
        value = data["disposition"]
        if isinstance(value, str) and value.strip() in DISPOSITIONS:
            return value.strip()
        self.problem(
            source,
            (*path, "disposition"),
            f"{label}: bad disposition {value!r}; use one of "
            + ", ".join(f'"{d}"' for d in DISPOSITIONS),
        )
        return None

    def define(
        self, kind: str, id: str, where: str, seen: dict[str, str], source: _Source, path: Key
    ) -> bool:
        """Record a definition; report a duplicate (across files) and return False."""
        if id in seen:
            self.problem(source, path, f"duplicate {kind} '{id}' (already defined at {seen[id]})")
            return False
        seen[id] = where
        return True

    # -- sections
    def load_calendar(self, source: _Source, id: str, data: Any) -> None:
        path: Key = ("calendars", id)
        label = f"calendar '{id}'"
        where = source.where(path)
        if not self.define("calendar", id, where, self.calendar_ids, source, path):
            return
        table = self.table(source, path, data, label)
        if table is None:
            return
        self.unknown_keys(source, path, table, CALENDAR_KEYS, label)
        ok = True

        def attempt(key: str | tuple[str, ...], parse: Callable[[], Any]) -> Any:
            nonlocal ok
            try:
                return parse()
            except ValueError as error:
                where = key if isinstance(key, tuple) else (key,)
                self.problem(source, (*path, *where), f"{label}: {error}")
                ok = False
                return None

        zone_name = self.string(source, path, table, "timezone", label, required=True)
        zone = attempt("timezone", lambda: parse_timezone(zone_name)) if zone_name else None
        if "hours" not in table:
            self.problem(source, path, f"{label}: missing required key 'hours'")
            ok = False
        hours = attempt(_hours_key(table.get("hours")), lambda: parse_hours(table.get("hours")))
        dates = attempt("holidays", lambda: parse_holiday_dates(table.get("holidays", [])))
        country = self.string(source, path, table, "country", label)
        subdivision = self.string(source, path, table, "subdivision", label)
        if subdivision and not country:
            self.problem(source, (*path, "subdivision"), f"{label}: 'subdivision' needs 'country'")
            ok = False
        if country:
            attempt("country", lambda: public_holidays(country, subdivision))
        if ok and zone is not None and hours is not None and dates is not None:
            calendar = BusinessCalendar(
                id=id,
                timezone=zone,
                hours=hours,
                holidays=dates,
                country=country.upper() if country else None,
                subdivision=subdivision,
            )
            self.calendars[id] = (calendar, where)

    def load_person(self, source: _Source, id: str, data: Any) -> None:
        path: Key = ("people", id)
        label = f"person '{id}'"
        where = source.where(path)
        if id in ROLES:
            self.problem(source, path, f"{label}: '{id}' is reserved for escalation steps")
        seen = {k: w for k, (_, w) in self.people.items()}
        if not self.define("person", id, where, seen, source, path):
            return
        table = self.table(source, path, data, label)
        if table is None:
            return
        self.unknown_keys(source, path, table, PERSON_KEYS, label)
        name = self.string(source, path, table, "name", label, required=True)
        email = self.string(source, path, table, "email", label, required=True)
        if email is not None and not _EMAIL_RE.fullmatch(email):
            self.problem(source, (*path, "email"), f"{label}: bad email address '{email}'")
        calendar = self.string(source, path, table, "calendar", label)
        backup = self.string(source, path, table, "backup", label)
        manager = self.string(source, path, table, "manager", label)
        self.ref("calendar", calendar, source, (*path, "calendar"), label)
        for key, other in (("backup", backup), ("manager", manager)):
            if other == id:
                self.problem(source, (*path, key), f"{label}: cannot be their own {key}")
            else:
                self.ref("person", other, source, (*path, key), label)
        away = self.away(source, path, table, label)
        self.people[id] = (
            Person(id, name or id, email or "", calendar, backup, manager, away),
            where,
        )

    def away(
        self, source: _Source, path: Key, table: Mapping[str, Any], label: str
    ) -> tuple[tuple[date, date], ...]:
        """`away = ["2026-12-21..2027-01-03", "2027-02-14"]`: dates or inclusive ranges."""
        if "away" not in table:
            return ()
        raw = table["away"]
        items = raw if isinstance(raw, list) else [raw]
        out: list[tuple[date, date]] = []
        for index, item in enumerate(items):
            at: Key = (*path, "away")
            text = item.isoformat() if isinstance(item, date) else item
            if not isinstance(text, str):
                self.problem(source, at, f"{label}: 'away' entries are dates or 'first..last'")
                continue
            first, _, last = text.partition("..")
            try:
                start = date.fromisoformat(first.strip())
                end = date.fromisoformat(last.strip()) if last else start
            except ValueError:
                self.problem(
                    source,
                    at,
                    f"{label}: away entry {index + 1} '{text}' is not a date (2026-12-24)"
                    " or a range (2026-12-21..2027-01-03)",
                )
                continue
            if end < start:
                self.problem(source, at, f"{label}: away range '{text}' ends before it starts")
                continue
            out.append((start, end))
        return tuple(sorted(out))

    def load_policy(self, source: _Source, id: str, data: Any) -> None:
        path: Key = ("sla", id)
        label = f"sla '{id}'"
        where = source.where(path)
        if not self.define("sla policy", id, where, self.policy_ids, source, path):
            return
        table = self.table(source, path, data, label)
        if table is None:
            return
        self.unknown_keys(source, path, table, SLA_KEYS, label)
        calendar_id = self.string(source, path, table, "calendar", label, required=True)
        self.ref("calendar", calendar_id, source, (*path, "calendar"), label)
        known = self.calendars.get(calendar_id or "")
        # "5d" means five of this calendar's working days (gateway.sla.durations).
        day = known[0].day if known else timedelta(days=1)

        def duration(
            key: str, data: Mapping[str, Any], at: Key, where: str = label
        ) -> timedelta | None:
            if key not in data:
                return None
            try:
                return durations.parse(data[key]).business(day)
            except ValueError as error:
                self.problem(source, (*at, key), f"{where}: {key}: {error}")
                return None

        steps: list[EscalationStep] = []
        steps_ok = True
        raw_steps = table.get("escalation", [])
        if not isinstance(raw_steps, list):
            self.problem(source, (*path, "escalation"), f"{label}: 'escalation' must be a list")
            raw_steps = []
        for index, raw in enumerate(raw_steps):
            at: Key = (*path, "escalation", index)
            step_label = f"{label} escalation step {index + 1}"
            step = self.table(source, at, raw, step_label)
            if step is None:
                continue
            self.unknown_keys(source, at, step, STEP_KEYS, step_label)
            if "after" not in step:
                self.problem(source, at, f"{step_label}: missing required key 'after'")
            after = duration("after", step, at, step_label)
            steps_ok = steps_ok and after is not None
            notify = self.string(source, at, step, "notify", step_label)
            assign = self.string(source, at, step, "assign", step_label)
            if notify is None and assign is None:
                self.problem(source, at, f"{step_label}: give 'notify' or 'assign' (or both)")
            for key, who in (("notify", notify), ("assign", assign)):
                if who is not None and who not in ROLES:
                    self.ref("person", who, source, (*at, key), step_label)
            steps.append(EscalationStep(after or timedelta(0), notify, assign))
        afters = [s.after for s in steps]
        if steps_ok and afters != sorted(afters):
            self.problem(
                source, (*path, "escalation"), f"{label}: escalation steps must be in 'after' order"
            )

        warn_at: float | None = None
        if "warn_at" in table:
            raw_warn = table["warn_at"]
            if (
                isinstance(raw_warn, int | float)
                and not isinstance(raw_warn, bool)
                and (0 < raw_warn < 1)
            ):
                warn_at = float(raw_warn)
            else:
                self.problem(
                    source,
                    (*path, "warn_at"),
                    f"{label}: 'warn_at' must be a fraction between 0 and 1, e.g. 0.8",
                )
        notice = self.boolean(source, path, table, "customer_notice", label)
        on_call = self.strings(source, path, table, "on_call", label)
        for who in on_call:
            self.ref("person", who, source, (*path, "on_call"), label)
        policy = SlaPolicy(
            id=id,
            calendar=calendar_id or "",
            first_response=duration("first_response", table, path),
            next_response=duration("next_response", table, path),
            resolution=duration("resolution", table, path),
            customer_notice=True if notice is None else notice,
            escalation=tuple(steps),
            warn_at=warn_at,
            on_call=on_call,
        )
        self.policies[id] = (policy, where)

    def load_defaults(self, source: _Source, data: Any) -> None:
        path: Key = ("defaults",)
        label = "[defaults]"
        if self.defaults_seen is not None:
            self.problem(
                source, path, f"duplicate [defaults] (already defined at {self.defaults_seen})"
            )
            return
        self.defaults_seen = source.where(path)
        table = self.table(source, path, data, label)
        if table is None:
            return
        self.unknown_keys(source, path, table, DEFAULTS_KEYS, label)
        owner = self.string(source, path, table, "owner", label, required=True)
        sla = self.string(source, path, table, "sla", label, required=True)
        queue = self.string(source, path, table, "queue", label) or "support"
        priority = self.priority(source, path, table, label) or "normal"
        acknowledge = self.acknowledge(source, path, table, label)
        self.ref("person", owner, source, (*path, "owner"), label)
        self.ref("sla", sla, source, (*path, "sla"), label)
        if owner is not None and sla is not None:
            defaults = Defaults(
                owner, queue, sla, priority, True if acknowledge is None else acknowledge
            )
            self.defaults = (defaults, source)

    def load_route(self, source: _Source, index: int, data: Any) -> None:
        path: Key = ("route", index)
        table = self.table(source, path, data, f"route #{index + 1}")
        if table is None:
            return
        name = self.string(source, path, table, "name", f"route #{index + 1}", required=True)
        label = f"route '{name}'" if name else f"route #{index + 1}"
        if name is not None:
            self.define("route", name, source.where(path), self.route_names, source, path)
        self.unknown_keys(source, path, table, ROUTE_KEYS, label)
        match = (
            load_match(table["match"], _MatchReport(self, source, (*path, "match"), label))
            if "match" in table
            else Match()
        )
        owner = self.string(source, path, table, "owner", label)
        team = self.strings(source, path, table, "team", label)
        assign = self.string(source, path, table, "assign", label)
        if owner is not None and team:
            self.problem(
                source, (*path, "team"), f"{label}: give either 'owner' or 'team', not both"
            )
        if assign is not None and assign not in ASSIGN_MODES:
            self.problem(
                source,
                (*path, "assign"),
                f"{label}: bad assign mode '{assign}'; use one of {', '.join(ASSIGN_MODES)}",
            )
            assign = None
        if assign is not None and not team:
            self.problem(source, (*path, "assign"), f"{label}: 'assign' needs a 'team'")
        if len(set(team)) != len(team):
            self.problem(source, (*path, "team"), f"{label}: a person is listed twice in 'team'")
        self.ref("person", owner, source, (*path, "owner"), label)
        team_is_list = isinstance(table.get("team"), list)
        for i, member in enumerate(team):
            at: Key = (*path, "team", i) if team_is_list else (*path, "team")
            self.ref("person", member, source, at, label)
        notify = self.strings(source, path, table, "notify", label)
        notify_is_list = isinstance(table.get("notify"), list)
        for i, who in enumerate(notify):
            at = (*path, "notify", i) if notify_is_list else (*path, "notify")
            self.ref("person", who, source, at, label)
        sla = self.string(source, path, table, "sla", label)
        self.ref("sla", sla, source, (*path, "sla"), label)
        continue_ = self.boolean(source, path, table, "continue", label)
        language = self.string(source, path, table, "language", label)
        if language is not None and language not in LANGUAGE_CODES:
            self.problem(
                source,
                (*path, "language"),
                f"{label}: no letters in language '{language}'; use one of "
                f"{', '.join(LANGUAGE_CODES)}",
            )
            language = None
        brand = self.string(source, path, table, "brand", label)
        self.ref("brand", brand, source, (*path, "brand"), label)
        route = Route(
            name=name or f"#{index + 1}",
            match=match,
            queue=self.string(source, path, table, "queue", label),
            owner=owner,
            team=team,
            assign=(assign or "round-robin") if team else None,
            sla=sla,
            priority=self.priority(source, path, table, label),
            tags=self.strings(source, path, table, "tags", label),
            acknowledge=self.acknowledge(source, path, table, label),
            notify=notify,
            continue_=bool(continue_),
            disposition=self.disposition(source, path, table, label),
            known_customer=self.known_customer(source, path, table, label),
            source=source.where(path),
            language=language,
            brand=brand,
        )
        self.routes.append(route)

    def load_brand(self, source: _Source, id: str, data: Any) -> None:
        path: Key = ("brands", id)
        label = f"brand '{id}'"
        table = self.table(source, path, data, label)
        if table is None:
            return
        self.unknown_keys(source, path, table, BRAND_KEYS, label)
        address = self.string(source, path, table, "from_address", label, required=True)
        if address is not None and not _EMAIL_RE.fullmatch(address):
            self.problem(
                source, (*path, "from_address"), f"{label}: 'from_address' must be an address"
            )
            address = None
        dkim: dict[str, str] = {}
        if "dkim" in table:
            dkim_table = self.table(source, (*path, "dkim"), table["dkim"], f"{label}: 'dkim'")
            if dkim_table is not None:
                self.unknown_keys(source, (*path, "dkim"), dkim_table, BRAND_DKIM_KEYS, label)
                for key in BRAND_DKIM_KEYS:
                    value = self.string(source, (*path, "dkim"), dkim_table, key, label, True)
                    dkim[key] = value or ""
        if address is None:
            return
        self.brands[id] = Brand(
            id=id,
            from_address=address.lower(),
            from_name=self.string(source, path, table, "from_name", label) or "",
            signature=self.string(source, path, table, "signature", label) or "",
            business_name=self.string(source, path, table, "business_name", label) or "",
            reply_domain=self.string(source, path, table, "reply_domain", label) or "",
            dkim_domain=dkim.get("domain", ""),
            dkim_selector=dkim.get("selector", ""),
            dkim_key_file=dkim.get("key_file", ""),
        )

    # -- whole-set checks
    def check_refs(self) -> None:
        known = {
            "person": set(self.people),
            "calendar": set(self.calendar_ids),
            "sla": set(self.policy_ids),
            "brand": set(self.brands),
        }
        names = {"person": "person", "calendar": "calendar", "sla": "SLA policy", "brand": "brand"}
        for ref in self.refs:
            if ref.id in known[ref.kind]:
                continue
            hint = difflib.get_close_matches(ref.id, sorted(known[ref.kind]), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            self.problem(
                ref.source,
                ref.path,
                f"{ref.label}: unknown {names[ref.kind]} '{ref.id}'{suggestion}",
            )


@dataclass
class _MatchReport:
    """Where the match conditions (gateway.routing.conditions) report their mistakes."""

    loader: _Loader
    source: _Source
    path: Key
    label: str

    def problem(self, at: Key, message: str) -> None:
        self.loader.problem(self.source, (*self.path, *at), f"{self.label}: {message}")

    def nested(self, key: str) -> _MatchReport:
        return _MatchReport(
            self.loader, self.source, (*self.path, key), f"{self.label} (in '{key}')"
        )


def _read_sources(rules_dir: Path, loader: _Loader) -> tuple[list[_Source], list[Path], bool]:
    """Parse every *.toml in the folder (sorted by name); report syntax errors."""
    if not rules_dir.is_dir():
        loader.problems.append(Problem(str(rules_dir), None, "rules folder not found"))
        return [], [], False
    files = sorted(rules_dir.glob("*.toml"))
    if not files:
        loader.problems.append(Problem(str(rules_dir), None, "no rules files (*.toml) found"))
    sources: list[_Source] = []
    clean = True
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            loader.problems.append(Problem(str(path), None, f"cannot read: {error}"))
            clean = False
            continue
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            message = str(error)
            loader.problems.append(
                Problem(str(path), _syntax_line(message, text), f"TOML syntax error: {message}")
            )
            clean = False
            continue
        sources.append(_Source(path, data, _Locator(text)))
    return sources, files, clean


def _collect(rules_dir: Path) -> tuple[_Loader, list[Path]]:
    loader = _Loader(rules_dir)
    sources, files, clean = _read_sources(rules_dir, loader)

    def sections(name: str) -> Iterable[tuple[_Source, Any]]:
        for source in sources:
            if name in source.data:
                yield source, source.data[name]

    for source in sources:
        loader.unknown_keys(source, (), source.data, TOP_LEVEL_KEYS, "rules file")

    # Calendars first: SLA durations in days need their calendar's working-day length.
    for name, loader_fn in (
        ("calendars", loader.load_calendar),
        ("people", loader.load_person),
        ("sla", loader.load_policy),
        ("brands", loader.load_brand),
    ):
        for source, table in sections(name):
            if loader.table(source, (name,), table, f"[{name}]") is None:
                continue
            for id, value in table.items():
                loader_fn(source, id, value)
    for source, table in sections("defaults"):
        loader.load_defaults(source, table)
    for source, routes in sections("route"):
        if not isinstance(routes, list):
            loader.problem(source, ("route",), "routes must be written as [[route]] tables")
            continue
        for index, data in enumerate(routes):
            loader.load_route(source, index, data)

    if clean:
        loader.check_refs()
        if loader.defaults_seen is None and sources:
            loader.problems.append(
                Problem(
                    sources[0].name,
                    1,
                    'missing [defaults] table: add [defaults] with owner = "<person id>" and '
                    'sla = "<policy id>" to one of the rules files',
                )
            )
    return loader, files


def _sorted(problems: list[Problem], files: list[Path]) -> list[Problem]:
    order = {str(path): index for index, path in enumerate(files)}
    return sorted(problems, key=lambda p: (order.get(p.file, -1), p.line or 0))


def load_rules(rules_dir: Path) -> Rules:
    """Read and merge every `*.toml` in `rules_dir`; raise RulesError listing every problem."""
    loader, files = _collect(Path(rules_dir))
    if loader.problems or loader.defaults is None:
        raise RulesError(_sorted(loader.problems, files))
    return Rules(
        people={id: person for id, (person, _) in loader.people.items()},
        calendars={id: calendar for id, (calendar, _) in loader.calendars.items()},
        sla={id: policy for id, (policy, _) in loader.policies.items()},
        defaults=loader.defaults[0],
        routes=tuple(loader.routes),
        files=tuple(files),
        brands=dict(loader.brands),
        where={
            **{f"sla.{id}": where for id, (_, where) in loader.policies.items()},
            **{f"people.{id}": where for id, (_, where) in loader.people.items()},
        },
    )


def check_rules(rules_dir: Path) -> list[str]:
    """[] when the rules are valid, else one `file:line: message` per problem."""
    try:
        load_rules(rules_dir)
    except RulesError as error:
        return [str(problem) for problem in error.problems]
    return []
