"""The routing engine: matching, first-match/continue, team assignment and the trace."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.routing.engine import AssignmentState, Decision, TraceEntry, evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import load_rules
from gateway.routing.model import Rules

RULES = """\
[calendars.berlin]
timezone = "Europe/Berlin"
hours = { mon-fri = "09:00-17:00" }

[calendars.always]
timezone = "UTC"
hours = "24x7"

[people.alice]
name = "Alice Martin"
email = "alice@example.com"

[people.bob]
name = "Bob Stone"
email = "bob@example.com"

[people.carol]
name = "Carol Diaz"
email = "carol@example.com"

[people.dave]
name = "Dave Kim"
email = "dave@example.com"

[sla.standard]
calendar = "berlin"
first_response = "4h"

[sla.vip]
calendar = "always"
first_response = "1h"

[defaults]
owner = "alice"
queue = "support"
sla = "standard"

[[route]]
name = "vip"
match = { from = ["*@bigcustomer.example", "ceo@partner.example"] }
sla = "vip"
priority = "high"
tags = ["vip"]
notify = ["carol"]
continue = true

[[route]]
name = "billing"
match = { to = "billing@example.com", subject = "(?i)invoice" }
queue = "billing"
owner = "bob"
tags = ["billing"]

[[route]]
name = "after-hours"
match = { business_hours = false }
tags = ["after-hours"]
notify = ["dave", "carol"]
continue = true

[[route]]
name = "urgent-header"
match = { header = { X-Priority = "^1" } }
priority = "urgent"
queue = "urgent"
continue = true

[[route]]
name = "secure"
match = { authenticated = true, has_attachment = true }
queue = "secure-docs"
owner = "dave"

[[route]]
name = "password"
match = { body = ["(?i)password reset", "(?i)locked out"] }
queue = "accounts"
owner = "carol"

[[route]]
name = "support-rr"
match = { to = "support@example.com", not = { from = "*@example.com", subject = "(?i)newsletter" } }
team = ["alice", "bob", "carol"]
assign = "round-robin"

[[route]]
name = "internal"
match = { from = "*@example.com" }
team = ["alice", "bob", "carol"]
assign = "least-open"
"""

ROUTE_NAMES = [
    "vip",
    "billing",
    "after-hours",
    "urgent-header",
    "secure",
    "password",
    "support-rr",
    "internal",
]

MONDAY_MORNING = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # 11:00 in Berlin: open
SATURDAY = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def rules(tmp_path: Path) -> Rules:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    return load_rules(tmp_path)


def facts(
    to: str | tuple[str, ...] = "info@example.com",
    sender: str = "pat@customer.example",
    subject: str = "Hello",
    body: str = "Hi there",
    **extra: object,
) -> MessageFacts:
    recipients = (to,) if isinstance(to, str) else to
    return MessageFacts(recipients, sender, subject, body, **extra)  # type: ignore[arg-type]


def route(rules: Rules, message: MessageFacts, at: datetime = MONDAY_MORNING) -> Decision:
    return evaluate(rules, message, at)


def test_no_match_falls_back_to_defaults_and_explains_every_route(rules: Rules) -> None:
    decision = route(rules, facts())
    assert decision.route is None
    assert decision.owner.id == "alice"
    assert (decision.queue, decision.sla, decision.priority) == ("support", "standard", "normal")
    assert decision.assigned_by == "default"
    assert decision.acknowledge is True
    assert (decision.tags, decision.notify, decision.matched_routes) == ((), (), ())
    assert [e.route for e in decision.trace] == ROUTE_NAMES
    assert not any(e.matched for e in decision.trace)
    assert [e.why for e in decision.trace] == [
        "from: pat@customer.example not in *@bigcustomer.example, ceo@partner.example",
        "to: info@example.com not in billing@example.com",
        "inside business hours of calendar 'berlin' (route wants outside)",
        "header X-Priority: absent (route wants ^1)",
        "authenticated: no (route wants yes)",
        "body did not match (?i)password reset or (?i)locked out",
        "to: info@example.com not in support@example.com",
        "from: pat@customer.example not in *@example.com",
    ]


def test_first_match_wins_and_the_trace_stops_there(rules: Rules) -> None:
    decision = route(rules, facts(to="billing@example.com", subject="Your Invoice 42"))
    assert decision.route == "billing"
    assert (decision.queue, decision.owner.id, decision.assigned_by) == ("billing", "bob", "route")
    assert decision.tags == ("billing",)
    assert decision.trace == (
        TraceEntry(
            "vip",
            False,
            "from: pat@customer.example not in *@bigcustomer.example, ceo@partner.example",
        ),
        TraceEntry("billing", True, "to: billing@example.com; subject matched (?i)invoice"),
    )


def test_all_match_keys_must_hold(rules: Rules) -> None:
    decision = route(rules, facts(to="billing@example.com", subject="Where is my parcel?"))
    assert decision.route is None
    assert decision.trace[1] == TraceEntry(
        "billing", False, 'subject "Where is my parcel?" did not match (?i)invoice'
    )


def test_addresses_and_globs_compare_case_insensitively(rules: Rules) -> None:
    decision = route(
        rules,
        facts(
            to=("someone@example.com", "Billing@Example.COM"),
            sender="Joe@BigCustomer.Example",
            subject="INVOICE",
        ),
    )
    assert decision.matched_routes == ("vip", "billing")
    assert decision.trace[0].why == "from: Joe@BigCustomer.Example matches *@bigcustomer.example"
    assert decision.trace[1].why == (
        "to: Billing@Example.COM matches billing@example.com; subject matched (?i)invoice"
    )


def test_a_list_means_any_of(rules: Rules) -> None:
    decision = route(rules, facts(sender="ceo@partner.example"))
    assert decision.trace[0] == TraceEntry("vip", True, "from: ceo@partner.example")


def test_continue_accumulates_tags_and_notify_and_later_scalars_override(rules: Rules) -> None:
    message = facts(
        to="billing@example.com",
        sender="joe@bigcustomer.example",
        subject="invoice",
        headers=(("X-Priority", "1"),),
    )
    decision = route(rules, message)
    # vip (continue) then billing (stops): vip's SLA and priority stay, billing's queue/owner.
    assert decision.route == "billing"
    assert decision.matched_routes == ("vip", "billing")
    assert (decision.sla, decision.priority, decision.queue, decision.owner.id) == (
        "vip",
        "high",
        "billing",
        "bob",
    )
    assert decision.tags == ("vip", "billing")
    assert decision.notify == ("carol",)


def test_notify_accumulates_without_duplicates_and_priority_is_overridden(rules: Rules) -> None:
    # Saturday, non-VIP: after-hours (continue) + urgent-header (continue) + defaults owner.
    message = facts(headers=(("x-priority", "3"), ("X-PRIORITY", "1 (Highest)")))
    decision = route(rules, message, SATURDAY)
    assert decision.matched_routes == ("after-hours", "urgent-header")
    assert decision.route == "urgent-header"
    assert decision.tags == ("after-hours",)
    assert decision.notify == ("dave", "carol")
    assert (decision.priority, decision.queue) == ("urgent", "urgent")
    assert (decision.owner.id, decision.assigned_by) == ("alice", "default")
    assert decision.trace[2].why == "outside business hours of calendar 'berlin'"
    assert decision.trace[3].why == "header X-Priority matched ^1"

    vip = route(rules, facts(sender="joe@bigcustomer.example", subject="x"), SATURDAY)
    assert vip.notify == ("carol",)  # vip's notify, then nothing new


def test_header_values_that_do_not_match_are_shown(rules: Rules) -> None:
    decision = route(rules, facts(headers=(("X-Priority", "3 (Normal)"),)))
    assert decision.trace[3].why == "header X-Priority: 3 (Normal) did not match ^1"


def test_business_hours_are_judged_in_the_calendar_of_the_routes_sla(rules: Rules) -> None:
    # A VIP's SLA is 24x7, so "after hours" never holds for them, even on a Saturday.
    decision = route(rules, facts(sender="joe@bigcustomer.example"), SATURDAY)
    assert decision.trace[2] == TraceEntry(
        "after-hours", False, "inside business hours of calendar 'always' (route wants outside)"
    )
    assert "after-hours" not in decision.tags


def test_bool_conditions(rules: Rules) -> None:
    both = route(rules, facts(authenticated=True, has_attachment=True))
    assert (both.route, both.queue, both.owner.id) == ("secure", "secure-docs", "dave")
    assert both.trace[-1].why == "authenticated: yes; has attachment: yes"
    only_auth = route(rules, facts(authenticated=True))
    assert only_auth.trace[4].why == "has attachment: no (route wants yes)"


def test_body_regexes(rules: Rules) -> None:
    decision = route(rules, facts(body="Hello,\nI am LOCKED OUT of my account."))
    assert (decision.route, decision.owner.id) == ("password", "carol")
    assert decision.trace[-1].why == "body matched (?i)locked out"


def test_not_fails_when_any_of_its_conditions_holds(rules: Rules) -> None:
    colleague = route(rules, facts(to="support@example.com", sender="bob@example.com"))
    assert colleague.trace[6] == TraceEntry(
        "support-rr", False, "not: from: bob@example.com matches *@example.com"
    )
    assert colleague.route == "internal"  # caught by the next route instead

    newsletter = route(rules, facts(to="support@example.com", subject="Our Newsletter"))
    assert newsletter.trace[6].why == "not: subject matched (?i)newsletter"
    assert newsletter.route is None

    customer = route(rules, facts(to="support@example.com"))
    assert customer.trace[6] == TraceEntry(
        "support-rr",
        True,
        "to: support@example.com; not: from: pat@customer.example not in *@example.com; "
        'subject "Hello" did not match (?i)newsletter',
    )


@pytest.mark.parametrize(
    ("last", "expected"),
    [(None, "alice"), ("alice", "bob"), ("bob", "carol"), ("carol", "alice"), ("gone", "alice")],
)
def test_round_robin_takes_the_next_after_the_last_and_wraps(
    rules: Rules, last: str | None, expected: str
) -> None:
    state = AssignmentState(last_assigned={"support-rr": last} if last else {})
    decision = evaluate(rules, facts(to="support@example.com"), MONDAY_MORNING, state)
    assert (decision.owner.id, decision.assigned_by) == (expected, "round-robin")


@pytest.mark.parametrize(
    ("open_tickets", "expected"),
    [
        ({}, "alice"),
        ({"alice": 3, "bob": 1, "carol": 1}, "bob"),
        ({"alice": 2, "bob": 2, "carol": 0}, "carol"),
        ({"alice": 0, "bob": 0, "carol": 0, "dave": -5}, "alice"),
    ],
)
def test_least_open_picks_fewest_open_with_ties_in_team_order(
    rules: Rules, open_tickets: dict[str, int], expected: str
) -> None:
    state = AssignmentState(open_tickets=open_tickets)
    decision = evaluate(rules, facts(sender="dave@example.com"), MONDAY_MORNING, state)
    assert (decision.route, decision.owner.id, decision.assigned_by) == (
        "internal",
        expected,
        "least-open",
    )


def test_a_route_without_conditions_matches_everything(tmp_path: Path) -> None:
    text = RULES.split("[[route]]", maxsplit=1)[0] + '[[route]]\nname = "all"\nqueue = "triage"\n'
    (tmp_path / "rules.toml").write_text(text, encoding="utf-8")
    decision = evaluate(load_rules(tmp_path), facts(), MONDAY_MORNING)
    assert decision.trace == (TraceEntry("all", True, "no conditions (matches every message)"),)
    assert (decision.route, decision.queue, decision.assigned_by) == ("all", "triage", "default")


def test_empty_sender_and_recipients_are_described(rules: Rules) -> None:
    decision = route(rules, MessageFacts((), "", "", ""))
    assert decision.trace[0].why == (
        "from: (no sender) not in *@bigcustomer.example, ceo@partner.example"
    )
    assert decision.trace[1].why == "to: (no recipients) not in billing@example.com"


def test_naive_time_is_refused(rules: Rules) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(rules, facts(), datetime(2026, 11, 23, 10))
