"""Read, validate and merge `rules/*.toml` into a `Rules` value.

Admins edit these files by hand and run `support-gateway rules check` before reloading, so
every mistake is reported at once, each as `file:line: message` with the best line we can
find. The work is split by role:

- `gateway.routing.locator`: the line of each key (`tomllib` gives lines only for syntax
  errors) and `Problem`;
- `gateway.routing.schema`: the shape of each table (pydantic, unknown keys forbidden);
- `gateway.routing.conditions`: the `match` table, one spec per match key;
- `gateway.routing.references`: ids defined twice and references to unknown ids;
- here: reading the files in order, what needs two values or another table (durations in a
  calendar's working days, `owner` or `team`, hours and holidays), and building `Rules`.

When a file has a syntax error the cross-file checks (unknown references, missing
`[defaults]`) are skipped: everything defined in the broken file would otherwise be reported
as unknown, burying the one real mistake under noise.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from gateway.routing import schema
from gateway.routing.conditions import load_match, unknown_key
from gateway.routing.locator import Key, Locator, Problem, RulesError, Source, syntax_line
from gateway.routing.model import (
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
from gateway.routing.references import Definitions, Reference, references_in, unknown
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


def _hours_key(value: Any) -> Key:
    """Where in `hours` a parse error lies: the first bad day entry, else `hours` itself."""
    if isinstance(value, dict):
        for key, day_value in value.items():
            try:
                day_indexes(key)
                parse_day(day_value, key)
            except ValueError:
                return ("hours", key)
    return ("hours",)


@dataclass
class _MatchReport:
    """Where the match conditions (gateway.routing.conditions) report their mistakes."""

    loader: _Loader
    source: Source
    path: Key
    label: str

    def problem(self, at: Key, message: str) -> None:
        self.loader.problem(self.source, (*self.path, *at), f"{self.label}: {message}")

    def nested(self, key: str) -> _MatchReport:
        return _MatchReport(
            self.loader, self.source, (*self.path, key), f"{self.label} (in '{key}')"
        )


@dataclass
class _Loader:
    problems: list[Problem] = field(default_factory=list)
    refs: list[Reference] = field(default_factory=list)
    defined: Definitions = field(default_factory=Definitions)
    people: dict[str, tuple[Person, str]] = field(default_factory=dict)
    calendars: dict[str, tuple[BusinessCalendar, str]] = field(default_factory=dict)
    policies: dict[str, tuple[SlaPolicy, str]] = field(default_factory=dict)
    defaults: Defaults | None = None
    defaults_seen: str | None = None
    routes: list[Route] = field(default_factory=list)
    brands: dict[str, Brand] = field(default_factory=dict)

    # -- reporting
    def problem(self, source: Source, path: Key, message: str) -> None:
        self.problems.append(Problem(source.name, source.line(path), message))

    def table(self, source: Source, path: Key, value: Any, label: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.problem(source, path, f"{label} must be a table")
        return None

    def check(
        self, model: type[Any], source: Source, path: Key, data: dict[str, Any], label: str
    ) -> Any:
        """The table's schema model (`gateway.routing.schema.validate`); mistakes reported."""
        table, found = schema.validate(model, data)
        for at, message in found:
            self.problem(source, (*path, *at), f"{label}: {message}")
        return table

    def define(self, kind: str, id: str, source: Source, path: Key) -> bool:
        """Record a definition; report a duplicate (across files) and return False."""
        before = self.defined.define(kind, id, source.where(path))
        if before is not None:
            self.problem(source, path, f"duplicate {kind} '{id}' (already defined at {before})")
            return False
        return True

    def refer(self, table: str, data: dict[str, Any], source: Source, path: Key, label: str,
              skip: Mapping[str, Iterable[str]] | None = None) -> None:  # fmt: skip
        skips = {key: set(ids) for key, ids in (skip or {}).items()}
        self.refs.extend(references_in(table, data, source, path, label, skips))

    # -- sections
    def load_calendar(self, source: Source, id: str, data: Any) -> None:
        path: Key = ("calendars", id)
        label = f"calendar '{id}'"
        if not self.define("calendar", id, source, path):
            return
        raw = self.table(source, path, data, label)
        if raw is None:
            return
        table = self.check(schema.CalendarTable, source, path, raw, label)
        ok = not any(key not in raw for key in schema.CalendarTable.required)

        def attempt(at: Key, parse: Callable[[], Any]) -> Any:
            nonlocal ok
            try:
                return parse()
            except ValueError as error:
                self.problem(source, (*path, *at), f"{label}: {error}")
                ok = False
                return None

        zone = (
            attempt(("timezone",), lambda: parse_timezone(table.timezone))
            if table.timezone
            else None
        )
        hours = (
            attempt(_hours_key(raw["hours"]), lambda: parse_hours(raw["hours"]))
            if "hours" in raw
            else None
        )
        dates = attempt(("holidays",), lambda: parse_holiday_dates(raw.get("holidays", [])))
        country, subdivision = table.country, table.subdivision
        if subdivision and not country:
            self.problem(source, (*path, "subdivision"), f"{label}: 'subdivision' needs 'country'")
            ok = False
        if country:
            attempt(("country",), lambda: public_holidays(country, subdivision))
        if ok and zone is not None and hours is not None and dates is not None:
            calendar = BusinessCalendar(
                id=id,
                timezone=zone,
                hours=hours,
                holidays=dates,
                country=country.upper() if country else None,
                subdivision=subdivision,
            )
            self.calendars[id] = (calendar, source.where(path))

    def load_person(self, source: Source, id: str, data: Any) -> None:
        path: Key = ("people", id)
        label = f"person '{id}'"
        if id in ROLES:
            self.problem(source, path, f"{label}: '{id}' is reserved for escalation steps")
        if not self.define("person", id, source, path):
            return
        raw = self.table(source, path, data, label)
        if raw is None:
            return
        table = self.check(schema.PersonTable, source, path, raw, label)
        for key in ("backup", "manager"):
            if getattr(table, key) == id:
                self.problem(source, (*path, key), f"{label}: cannot be their own {key}")
        self.refer("person", raw, source, path, label, {"backup": [id], "manager": [id]})
        away = self.away(source, path, raw, label)
        person = Person(
            id, table.name or id, table.email or "", table.calendar, table.backup,
            table.manager, away,
        )  # fmt: skip
        self.people[id] = (person, source.where(path))

    def away(
        self, source: Source, path: Key, table: dict[str, Any], label: str
    ) -> tuple[tuple[date, date], ...]:
        """`away = ["2026-12-21..2027-01-03", "2027-02-14"]`: dates or inclusive ranges."""
        if "away" not in table:
            return ()
        raw = table["away"]
        at: Key = (*path, "away")
        out: list[tuple[date, date]] = []
        for index, item in enumerate(raw if isinstance(raw, list) else [raw]):
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

    def load_policy(self, source: Source, id: str, data: Any) -> None:
        path: Key = ("sla", id)
        label = f"sla '{id}'"
        if not self.define("sla policy", id, source, path):
            return
        raw = self.table(source, path, data, label)
        if raw is None:
            return
        table = self.check(schema.PolicyTable, source, path, raw, label)
        self.refer("sla", raw, source, path, label)
        known = self.calendars.get(table.calendar or "")
        # "5d" means five of this calendar's working days (gateway.sla.durations).
        day = known[0].day if known else timedelta(days=1)

        def duration(key: str, data: dict[str, Any], at: Key, where: str) -> timedelta | None:
            if key not in data:
                return None
            try:
                return durations.parse(data[key]).business(day)
            except ValueError as error:
                self.problem(source, (*at, key), f"{where}: {key}: {error}")
                return None

        steps: list[EscalationStep] = []
        steps_ok = True
        for index, value in enumerate(table.escalation):
            at: Key = (*path, "escalation", index)
            step_label = f"{label} escalation step {index + 1}"
            step_raw = self.table(source, at, value, step_label)
            if step_raw is None:
                continue
            step = self.check(schema.StepTable, source, at, step_raw, step_label)
            after = duration("after", step_raw, at, step_label)
            steps_ok = steps_ok and after is not None
            if step.notify is None and step.assign is None:
                self.problem(source, at, f"{step_label}: give 'notify' or 'assign' (or both)")
            roles = {"notify": ROLES, "assign": ROLES}
            self.refer("step", step_raw, source, at, step_label, roles)
            steps.append(EscalationStep(after or timedelta(0), step.notify, step.assign))
        afters = [s.after for s in steps]
        if steps_ok and afters != sorted(afters):
            self.problem(
                source, (*path, "escalation"), f"{label}: escalation steps must be in 'after' order"
            )
        policy = SlaPolicy(
            id=id,
            calendar=table.calendar or "",
            first_response=duration("first_response", raw, path, label),
            next_response=duration("next_response", raw, path, label),
            resolution=duration("resolution", raw, path, label),
            customer_notice=True if table.customer_notice is None else table.customer_notice,
            escalation=tuple(steps),
            warn_at=table.warn_at,
            on_call=table.on_call,
        )
        self.policies[id] = (policy, source.where(path))

    def load_defaults(self, source: Source, data: Any) -> None:
        path: Key = ("defaults",)
        label = "[defaults]"
        if self.defaults_seen is not None:
            self.problem(
                source, path, f"duplicate [defaults] (already defined at {self.defaults_seen})"
            )
            return
        self.defaults_seen = source.where(path)
        raw = self.table(source, path, data, label)
        if raw is None:
            return
        table = self.check(schema.DefaultsTable, source, path, raw, label)
        self.refer("defaults", raw, source, path, label)
        if table.owner is not None and table.sla is not None:
            self.defaults = Defaults(
                table.owner,
                table.queue or "support",
                table.sla,
                table.priority or "normal",
                True if table.acknowledge is None else table.acknowledge,
            )

    def load_route(self, source: Source, index: int, data: Any) -> None:
        path: Key = ("route", index)
        raw = self.table(source, path, data, f"route #{index + 1}")
        if raw is None:
            return
        name = raw.get("name")
        name = name.strip() if isinstance(name, str) else ""
        label = f"route '{name}'" if name else f"route #{index + 1}"
        if name:
            self.define("route", name, source, path)
        table = self.check(schema.RouteTable, source, path, raw, label)
        match = (
            load_match(raw["match"], _MatchReport(self, source, (*path, "match"), label))
            if "match" in raw
            else Match()
        )
        if table.owner is not None and table.team:
            self.problem(
                source, (*path, "team"), f"{label}: give either 'owner' or 'team', not both"
            )
        if table.assign is not None and not table.team:
            self.problem(source, (*path, "assign"), f"{label}: 'assign' needs a 'team'")
        if len(set(table.team)) != len(table.team):
            self.problem(source, (*path, "team"), f"{label}: a person is listed twice in 'team'")
        self.refer("route", raw, source, path, label)
        self.routes.append(
            Route(
                name=table.name or f"#{index + 1}",
                match=match,
                queue=table.queue,
                owner=table.owner,
                team=table.team,
                assign=(table.assign or "round-robin") if table.team else None,
                sla=table.sla,
                priority=table.priority,
                tags=table.tags,
                acknowledge=table.acknowledge,
                notify=table.notify,
                continue_=bool(table.continue_),
                disposition=table.disposition,
                known_customer=table.known_customer,
                source=source.where(path),
                language=table.language,
                brand=table.brand,
            )
        )

    def load_brand(self, source: Source, id: str, data: Any) -> None:
        path: Key = ("brands", id)
        label = f"brand '{id}'"
        raw = self.table(source, path, data, label)
        if raw is None:
            return
        table = self.check(schema.BrandTable, source, path, raw, label)
        dkim = None
        if "dkim" in raw:
            dkim_raw = self.table(source, (*path, "dkim"), raw["dkim"], f"{label}: 'dkim'")
            if dkim_raw is not None:
                dkim = self.check(schema.DkimTable, source, (*path, "dkim"), dkim_raw, label)
        if table.from_address is None:
            return
        self.brands[id] = Brand(
            id=id,
            from_address=table.from_address,
            from_name=table.from_name or "",
            signature=table.signature or "",
            business_name=table.business_name or "",
            reply_domain=table.reply_domain or "",
            dkim_domain=(dkim.domain or "") if dkim else "",
            dkim_selector=(dkim.selector or "") if dkim else "",
            dkim_key_file=(dkim.key_file or "") if dkim else "",
        )

    # -- whole-set checks
    def check_refs(self) -> None:
        known = {
            "person": self.defined.ids("person"),
            "calendar": self.defined.ids("calendar"),
            "sla": self.defined.ids("sla policy"),
            "brand": set(self.brands),
        }
        for ref, message in unknown(self.refs, known):
            self.problem(ref.source, ref.path, message)


def _read_sources(rules_dir: Path, loader: _Loader) -> tuple[list[Source], list[Path], bool]:
    """Parse every *.toml in the folder (sorted by name); report syntax errors."""
    if not rules_dir.is_dir():
        loader.problems.append(Problem(str(rules_dir), None, "rules folder not found"))
        return [], [], False
    files = sorted(rules_dir.glob("*.toml"))
    if not files:
        loader.problems.append(Problem(str(rules_dir), None, "no rules files (*.toml) found"))
    sources: list[Source] = []
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
                Problem(str(path), syntax_line(message, text), f"TOML syntax error: {message}")
            )
            clean = False
            continue
        sources.append(Source(path, data, Locator(text)))
    return sources, files, clean


def _collect(rules_dir: Path) -> tuple[_Loader, list[Path]]:
    loader = _Loader()
    sources, files, clean = _read_sources(rules_dir, loader)
    _check_top_level(loader, sources)
    _load_tables(loader, sources)
    if clean:
        _check_complete(loader, sources)
    return loader, files


def _sections(sources: list[Source], name: str) -> Iterable[tuple[Source, Any]]:
    """(source, value) of every file that has the top-level key ``name``, in file order."""
    for source in sources:
        if name in source.data:
            yield source, source.data[name]


def _check_top_level(loader: _Loader, sources: list[Source]) -> None:
    for source in sources:
        for key in source.data:
            if key not in schema.TOP_LEVEL_KEYS:
                message = unknown_key(key, schema.TOP_LEVEL_KEYS)
                loader.problem(source, (key,), f"rules file: {message}")


def _load_tables(loader: _Loader, sources: list[Source]) -> None:
    # Calendars first: SLA durations in days need their calendar's working-day length.
    for name, loader_fn in (
        ("calendars", loader.load_calendar),
        ("people", loader.load_person),
        ("sla", loader.load_policy),
        ("brands", loader.load_brand),
    ):
        for source, table in _sections(sources, name):
            if loader.table(source, (name,), table, f"[{name}]") is None:
                continue
            for id, value in table.items():
                loader_fn(source, id, value)
    for source, table in _sections(sources, "defaults"):
        loader.load_defaults(source, table)
    for source, routes in _sections(sources, "route"):
        if not isinstance(routes, list):
            loader.problem(source, ("route",), "routes must be written as [[route]] tables")
            continue
        for index, data in enumerate(routes):
            loader.load_route(source, index, data)


def _check_complete(loader: _Loader, sources: list[Source]) -> None:
    """Cross-references and the [defaults] table, once every file parsed."""
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
        defaults=loader.defaults,
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
