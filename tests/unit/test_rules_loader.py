"""Loading and checking rules/*.toml: merged values, and every mistake at its line."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest

from gateway.routing.loader import Problem, RulesError, check_rules, load_rules
from gateway.routing.model import Defaults, EscalationStep, Person

REPO = Path(__file__).resolve().parents[2]

CALENDARS = """\
[calendars.berlin]
timezone = "Europe/Berlin"
hours = { mon-fri = "09:00-17:00" }
holidays = ["2026-12-24"]

[calendars.always]
timezone = "UTC"
hours = "24x7"
"""

PEOPLE = """\
[people.alice]
name = "Alice Martin"
email = "alice@example.com"
calendar = "berlin"
backup = "bob"
manager = "carol"

[people.bob]
name = "Bob Stone"
email = "bob@example.com"

[people.carol]
name = "Carol Diaz"
email = "carol@example.com"
"""

SLA = """\
[sla.standard]
calendar = "berlin"
first_response = "4h"
next_response = "8h"
resolution = "5d"
escalation = [
  { after = "0m", notify = "owner" },
  { after = "1h", assign = "backup" },
  { after = "4h", assign = "manager" },
]

[sla.vip]
calendar = "always"
first_response = "1h30m"
resolution = "2d"
customer_notice = false
warn_at = 0.8
"""

ROUTES = """\
[defaults]
owner = "alice"
queue = "support"
sla = "standard"

[[route]]
name = "vip"
match = { from = "*@bigcustomer.example" }
sla = "vip"
continue = true

[[route]]
name = "billing"
match = { to = ["billing@example.com"], subject = "(?i)invoice|refund" }
queue = "billing"
owner = "bob"
priority = "high"
tags = ["billing"]
"""

BASE = {
    "calendars.toml": CALENDARS,
    "people.toml": PEOPLE,
    "sla.toml": SLA,
    "routes.toml": ROUTES,
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Error messages name files as given; run from tmp_path and pass Path("rules").
    monkeypatch.chdir(tmp_path)


def write(files: dict[str, str | None] | None = None) -> Path:
    """Write the base rules with some files replaced (or removed with None)."""
    merged: dict[str, str | None] = {**BASE, **(files or {})}
    folder = Path("rules")
    folder.mkdir()
    for name, text in merged.items():
        if text is not None:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def problems(files: dict[str, str | None] | None = None) -> list[str]:
    return check_rules(write(files))


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --------------------------------------------------------------------------- valid rules


def test_valid_rules_are_loaded_and_merged() -> None:
    rules = load_rules(write())
    assert rules.people["alice"] == Person(
        "alice", "Alice Martin", "alice@example.com", "berlin", "bob", "carol"
    )
    assert rules.person("bob").email == "bob@example.com"
    assert rules.defaults == Defaults(owner="alice", queue="support", sla="standard")
    standard, vip = rules.sla["standard"], rules.sla["vip"]
    assert standard.first_response == timedelta(hours=4)
    assert standard.next_response == timedelta(hours=8)
    # "5d" = five working days of the 8-hour Berlin calendar.
    assert standard.resolution == timedelta(hours=40)
    assert standard.customer_notice is True
    assert standard.escalation == (
        EscalationStep(timedelta(0), notify="owner"),
        EscalationStep(timedelta(hours=1), assign="backup"),
        EscalationStep(timedelta(hours=4), assign="manager"),
    )
    # In the 24x7 calendar a day is 24 hours.
    assert vip.first_response == timedelta(hours=1, minutes=30)
    assert vip.next_response is None
    assert vip.resolution == timedelta(days=2)
    assert vip.customer_notice is False
    assert vip.warn_at == 0.8
    assert rules.calendar_for_policy("vip").describe_hours() == "24x7 UTC"
    assert rules.calendars["berlin"].holidays == frozenset({date(2026, 12, 24)})
    assert [r.name for r in rules.routes] == ["vip", "billing"]
    assert [r.source for r in rules.routes] == ["rules/routes.toml:6", "rules/routes.toml:12"]
    billing = rules.routes[1]
    assert billing.match.get("to") == ("billing@example.com",)
    assert [p.text for p in billing.match.get("subject")] == ["(?i)invoice|refund"]
    assert (billing.queue, billing.owner, billing.priority, billing.tags) == (
        "billing",
        "bob",
        "high",
        ("billing",),
    )
    assert rules.routes[0].continue_ is True
    assert billing.continue_ is False
    assert [str(f) for f in rules.files] == [
        "rules/calendars.toml",
        "rules/people.toml",
        "rules/routes.toml",
        "rules/sla.toml",
    ]
    assert check_rules(Path("rules")) == []


def test_the_shipped_example_rules_are_valid() -> None:
    rules_dir = REPO / "rules"
    assert check_rules(rules_dir) == []
    rules = load_rules(rules_dir)
    assert set(rules.people) == {"alice", "bob", "carol", "nina"}
    assert set(rules.calendars) == {"berlin", "always", "oncall"}
    assert set(rules.sla) == {"standard", "vip"}
    assert rules.defaults.owner == "alice"
    assert all(p.email.endswith("@example.com") for p in rules.people.values())
    assert rules.policy("vip").on_call == ("nina",)
    assert rules.person("bob").away  # the shipped example shows an absence


def test_routes_keep_file_order_then_order_within_file() -> None:
    routes = ROUTES.split("[[route]]", maxsplit=1)[0]
    write(
        {
            "routes.toml": routes,
            "20-late.toml": '[[route]]\nname = "late"\n',
            "10-early.toml": '[[route]]\nname = "early-1"\n\n[[route]]\nname = "early-2"\n',
        }
    )
    rules = load_rules(Path("rules"))
    assert [(r.name, r.source) for r in rules.routes] == [
        ("early-1", "rules/10-early.toml:1"),
        ("early-2", "rules/10-early.toml:4"),
        ("late", "rules/20-late.toml:1"),
    ]


def test_table_form_of_match_and_people_inline_tables_are_located() -> None:
    extra = """\
[[route]]
name = "tables"
owner = "ghost"

[route.match]
subject = "(?i)x"
header = { X-Priority = "((" }
"""
    assert problems({"zz.toml": extra}) == [
        "rules/zz.toml:3: route 'tables': unknown person 'ghost'",
        "rules/zz.toml:7: route 'tables': bad regular expression in header X-Priority '((': "
        "missing ), unterminated subpattern at position 1",
    ]


# --------------------------------------------------------------------------- syntax


def test_toml_syntax_error_reports_the_parser_line() -> None:
    found = problems({"routes.toml": edit(ROUTES, 'queue = "billing"', "queue = ")})
    assert found == [
        "rules/routes.toml:15: TOML syntax error: Invalid value (at line 15, column 9)"
    ]


def test_syntax_error_does_not_bury_itself_in_unknown_reference_noise() -> None:
    # people.toml is broken, so every owner would look unknown; only real problems show.
    found = problems(
        {
            "people.toml": PEOPLE + "[people.dave\n",
            "routes.toml": edit(ROUTES, 'priority = "high"', 'priority = "asap"'),
        }
    )
    assert found == [
        "rules/people.toml:15: TOML syntax error: Expected ']' at the end of a table declaration "
        "(at line 15, column 13)",
        "rules/routes.toml:17: route 'billing': bad priority 'asap'; use one of low, normal, "
        "high, urgent",
    ]


# --------------------------------------------------------------------------- keys


def test_typo_in_a_key_is_named_with_a_suggestion() -> None:
    found = problems({"routes.toml": edit(ROUTES, 'owner = "bob"', 'ownr = "bob"')})
    assert len(found) == 1
    assert found[0].startswith(
        "rules/routes.toml:16: route 'billing': unknown key 'ownr' (did you mean 'owner'?); "
        "allowed: name, description, match"
    )


def test_unknown_match_key_and_unknown_top_level_section() -> None:
    found = problems(
        {
            "routes.toml": edit(ROUTES, "{ from =", "{ form ="),
            "people.toml": PEOPLE + '\n[peple.dave]\nname = "Dave"\n',
        }
    )
    assert [f.split(";")[0] for f in found] == [
        "rules/people.toml:16: rules file: unknown key 'peple' (did you mean 'people'?)",
        "rules/routes.toml:8: route 'vip': unknown key 'form' (did you mean 'from'?)",
    ]


def test_routes_must_be_an_array_of_tables() -> None:
    found = problems({"zz.toml": '[route]\nname = "x"\n'})
    assert found == ["rules/zz.toml:1: routes must be written as [[route]] tables"]


# --------------------------------------------------------------------------- references


def test_unknown_person_in_route_owner() -> None:
    found = problems({"routes.toml": edit(ROUTES, 'owner = "bob"', 'owner = "ghost"')})
    assert found == ["rules/routes.toml:16: route 'billing': unknown person 'ghost'"]
    with pytest.raises(RulesError) as caught:
        load_rules(Path("rules"))
    assert caught.value.problems == [
        Problem("rules/routes.toml", 16, "route 'billing': unknown person 'ghost'")
    ]
    assert str(caught.value) == "rules/routes.toml:16: route 'billing': unknown person 'ghost'"


def test_unknown_references_everywhere_are_reported_together() -> None:
    found = problems(
        {
            "people.toml": edit(PEOPLE, 'backup = "bob"', 'backup = "bobb"').replace(
                'calendar = "berlin"', 'calendar = "paris"'
            ),
            "sla.toml": edit(SLA, 'calendar = "always"', 'calendar = "nowhere"').replace(
                'assign = "backup"', 'assign = "ghost"'
            ),
            "routes.toml": edit(ROUTES, 'sla = "vip"', 'sla = "standrad"').replace(
                'owner = "alice"', 'owner = "nobody"'
            ),
        }
    )
    assert found == [
        "rules/people.toml:4: person 'alice': unknown calendar 'paris'",
        "rules/people.toml:5: person 'alice': unknown person 'bobb' (did you mean 'bob'?)",
        "rules/routes.toml:2: [defaults]: unknown person 'nobody'",
        "rules/routes.toml:9: route 'vip': unknown SLA policy 'standrad' (did you mean "
        "'standard'?)",
        "rules/sla.toml:8: sla 'standard' escalation step 2: unknown person 'ghost'",
        "rules/sla.toml:13: sla 'vip': unknown calendar 'nowhere'",
    ]


def test_team_and_notify_members_are_located_on_their_own_lines() -> None:
    extra = """\
[[route]]
name = "team"
team = [
  "alice",
  "ghost",
]
assign = "least-open"
notify = ["carol", "phantom"]
"""
    assert problems({"zz.toml": extra}) == [
        "rules/zz.toml:5: route 'team': unknown person 'ghost'",
        "rules/zz.toml:8: route 'team': unknown person 'phantom'",
    ]


def test_escalation_roles_are_not_person_references() -> None:
    rules = load_rules(write())
    assert [s.assign for s in rules.sla["standard"].escalation] == [None, "backup", "manager"]


def test_reserved_person_ids() -> None:
    found = problems({"people.toml": PEOPLE + '\n[people.owner]\nname = "O"\nemail = "o@x.y"\n'})
    assert found == [
        "rules/people.toml:16: person 'owner': 'owner' is reserved for escalation steps"
    ]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "sla.toml",
            'first_response = "4h"',
            'first_response = "4 hours"',
            "rules/sla.toml:3: sla 'standard': first_response: bad duration \"4 hours\"",
        ),
        (
            "sla.toml",
            '{ after = "1h", assign',
            '{ after = "1x", assign',
            "rules/sla.toml:8: sla 'standard' escalation step 2: after: bad duration \"1x\"",
        ),
        (
            "sla.toml",
            "warn_at = 0.8",
            "warn_at = 80",
            "rules/sla.toml:17: sla 'vip': 'warn_at' must be a fraction between 0 and 1",
        ),
        (
            "calendars.toml",
            '"09:00-17:00"',
            '"9-5"',
            "rules/calendars.toml:3: calendar 'berlin': bad hours \"9-5\" for mon-fri",
        ),
        (
            "calendars.toml",
            '"Europe/Berlin"',
            '"Europe/Berlinn"',
            "rules/calendars.toml:2: calendar 'berlin': unknown time zone \"Europe/Berlinn\"",
        ),
        (
            "calendars.toml",
            '["2026-12-24"]',
            '["2026-24-12"]',
            "rules/calendars.toml:4: calendar 'berlin': bad holiday date '2026-24-12'",
        ),
        (
            "calendars.toml",
            'hours = "24x7"',
            'hours = "24x7"\ncountry = "XX"',
            "rules/calendars.toml:9: calendar 'always': unknown holiday country/subdivision",
        ),
        (
            "routes.toml",
            'subject = "(?i)invoice|refund"',
            'subject = "(?i)invoice(|refund"',
            "rules/routes.toml:14: route 'billing': bad regular expression in subject "
            "'(?i)invoice(|refund': missing ), unterminated subpattern at position 11",
        ),
        (
            "routes.toml",
            'priority = "high"',
            'priority = "HIGH"',
            "rules/routes.toml:17: route 'billing': bad priority 'HIGH'; use one of low, normal, "
            "high, urgent",
        ),
        (
            "routes.toml",
            'owner = "bob"',
            'team = ["bob", "carol"]\nassign = "random"',
            "rules/routes.toml:17: route 'billing': bad assign mode 'random'; use one of "
            "round-robin, least-open",
        ),
        (
            "routes.toml",
            'owner = "bob"',
            'owner = "bob"\nteam = ["carol"]',
            "rules/routes.toml:17: route 'billing': give either 'owner' or 'team', not both",
        ),
        (
            "routes.toml",
            "continue = true",
            'continue = "yes"',
            "rules/routes.toml:10: route 'vip': 'continue' must be true or false",
        ),
        (
            "routes.toml",
            '{ from = "*@bigcustomer.example" }',
            '{ from = "bigcustomer" }',
            "rules/routes.toml:8: route 'vip': 'from' value 'bigcustomer' is not an address",
        ),
        (
            "people.toml",
            'email = "bob@example.com"',
            'email = "bob"',
            "rules/people.toml:10: person 'bob': bad email address 'bob'",
        ),
    ],
)
def test_bad_values_are_reported_at_their_line(
    file: str, old: str, new: str, expected: str
) -> None:
    found = problems({file: edit(BASE[file], old, new)})
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_missing_required_keys_point_at_the_table() -> None:
    found = problems(
        {
            "people.toml": edit(PEOPLE, 'email = "carol@example.com"', ""),
            "sla.toml": edit(SLA, '{ after = "4h", assign = "manager" }', '{ assign = "manager" }'),
        }
    )
    assert found == [
        "rules/people.toml:12: person 'carol': missing required key 'email'",
        "rules/sla.toml:9: sla 'standard' escalation step 3: missing required key 'after'",
    ]


# --------------------------------------------------------------------------- the whole set


def test_duplicate_ids_across_files() -> None:
    found = problems(
        {
            "staff.toml": '[people.bob]\nname = "Other Bob"\nemail = "bob2@example.com"\n',
            "zz-calendars.toml": '[calendars.always]\ntimezone = "UTC"\nhours = "24x7"\n',
            "zz-routes.toml": '[defaults]\nowner = "bob"\nsla = "vip"\n\n[[route]]\nname = "vip"\n',
        }
    )
    assert found == [
        "rules/staff.toml:1: duplicate person 'bob' (already defined at rules/people.toml:8)",
        "rules/zz-calendars.toml:1: duplicate calendar 'always' (already defined at "
        "rules/calendars.toml:6)",
        "rules/zz-routes.toml:1: duplicate [defaults] (already defined at rules/routes.toml:1)",
        "rules/zz-routes.toml:5: duplicate route 'vip' (already defined at rules/routes.toml:6)",
    ]


def test_missing_defaults() -> None:
    found = problems({"routes.toml": ROUTES.replace(ROUTES.split("[[route]]", maxsplit=1)[0], "")})
    assert found == [
        "rules/calendars.toml:1: missing [defaults] table: add [defaults] with owner = "
        '"<person id>" and sla = "<policy id>" to one of the rules files'
    ]


def test_missing_default_owner() -> None:
    found = problems({"routes.toml": edit(ROUTES, 'owner = "alice"\n', "")})
    assert found == ["rules/routes.toml:1: [defaults]: missing required key 'owner'"]


def test_empty_or_missing_folder() -> None:
    Path("empty").mkdir()
    assert check_rules(Path("empty")) == ["empty: no rules files (*.toml) found"]
    assert check_rules(Path("absent")) == ["absent: rules folder not found"]


def test_hours_errors_point_at_the_bad_day_and_sub_tables_work() -> None:
    extra = """\
[calendars.shop]
timezone = "Europe/Berlin"

[calendars.shop.hours]
mon-fri = "09:00-18:00"
sat = "10:00-9:00"
"""
    found = problems({"zz.toml": extra})
    assert found == [
        "rules/zz.toml:6: calendar 'shop': bad hours \"10:00-9:00\" for sat: the end must be "
        "after the start (split overnight shifts at 24:00 into two days)"
    ]


def test_escalation_steps_must_be_in_order() -> None:
    found = problems({"sla.toml": edit(SLA, 'after = "4h"', 'after = "30m"')})
    assert found == ["rules/sla.toml:6: sla 'standard': escalation steps must be in 'after' order"]


# --------------------------------------------------------------------------- the schema


def test_values_are_never_coerced_and_python_names_are_not_keys() -> None:
    found = problems(
        {
            "sla.toml": edit(SLA, "customer_notice = false", 'customer_notice = "no"'),
            "routes.toml": edit(ROUTES, "continue = true", "continue_ = true"),
        }
    )
    assert found == [
        "rules/routes.toml:10: route 'vip': unknown key 'continue_' (did you mean 'continue'?); "
        "allowed: name, description, match, queue, owner, team, assign, sla, priority, tags, "
        "acknowledge, notify, continue, disposition, known_customer, language, brand",
        "rules/sla.toml:16: sla 'vip': 'customer_notice' must be true or false",
    ]


def test_nested_tables_name_their_unknown_keys() -> None:
    brands = (
        '[brands.acme]\nfrom_address = "help@acme.example"\n\n'
        '[brands.acme.dkim]\ndomain = "acme.example"\nselectr = "s1"\nkey_file = "/k"\n'
    )
    found = problems(
        {
            "sla.toml": edit(SLA, '{ after = "1h", assign', '{ after = "1h", asign'),
            "zz-brands.toml": brands,
        }
    )
    assert [f.split("; allowed")[0] for f in found] == [
        "rules/sla.toml:8: sla 'standard' escalation step 2: unknown key 'asign' "
        "(did you mean 'assign'?)",
        "rules/sla.toml:8: sla 'standard' escalation step 2: give 'notify' or 'assign' (or both)",
        "rules/zz-brands.toml:4: brand 'acme': missing required key 'selector'",
        "rules/zz-brands.toml:6: brand 'acme': unknown key 'selectr' (did you mean 'selector'?)",
    ]


def test_every_mistake_of_one_table_is_reported_in_one_run() -> None:
    found = problems(
        {
            "routes.toml": edit(ROUTES, 'priority = "high"', 'priority = "asap"').replace(
                'owner = "bob"', 'owner = "ghost"'
            )
        }
    )
    assert found == [
        "rules/routes.toml:16: route 'billing': unknown person 'ghost'",
        "rules/routes.toml:17: route 'billing': bad priority 'asap'; use one of low, normal, "
        "high, urgent",
    ]
