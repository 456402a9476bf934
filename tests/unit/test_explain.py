"""`rules explain`: the docs/interface.md JSON object and its human rendering."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.explain import explain, format_explain
from gateway.routing.engine import AssignmentState
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import load_rules
from gateway.routing.model import Rules

REPO = Path(__file__).resolve().parents[2]

# The rules of docs/interface.md's example, plus a VIP route in front of billing.
RULES = """\
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

[calendars.berlin]
timezone = "Europe/Berlin"
@HOURS@
holidays = ["2026-12-24", "2026-12-25"]

[calendars.always]
timezone = "UTC"
hours = "24x7"

[sla.standard]
calendar = "berlin"
first_response = "4h"
next_response = "8h"
resolution = "5d"
customer_notice = true
escalation = [
  { after = "0m", notify = "owner" },
  { after = "1h", assign = "backup" },
  { after = "4h", assign = "manager" },
]

[sla.vip]
calendar = "always"
first_response = "1h"
resolution = "1d"

[defaults]
owner = "alice"
queue = "support"
sla = "standard"

[[route]]
name = "vip"
match = { from = "*@bigcustomer.com" }
sla = "vip"
acknowledge = "vip-ack"
owner = "carol"

[[route]]
name = "billing"
match = { to = ["billing@example.com"], subject = ["(?i)invoice", "(?i)refund"] }
queue = "billing"
owner = "bob"
sla = "standard"
priority = "high"
tags = ["billing"]

[[route]]
name = "support"
match = { to = "support@example.com" }
team = ["alice", "bob"]
assign = "round-robin"
"""

# Written exactly as in docs/interface.md (one line, too long for this file's line limit).
RULES = RULES.replace(
    "@HOURS@",
    'hours = { mon = "09:00-17:00", tue = "09:00-17:00", wed = "09:00-17:00", '
    'thu = "09:00-17:00", fri = "09:00-17:00" }',
)

AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # Monday, 11:00 in Berlin

BILLING_MAIL = MessageFacts(
    recipients=("billing@example.com",),
    sender="pat@customer.example",
    subject="Invoice 2026-118 is wrong",
    body="Please check.",
)


@pytest.fixture
def rules(tmp_path: Path) -> Rules:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    return load_rules(tmp_path)


def test_contract_example(rules: Rules) -> None:
    result = explain(rules, BILLING_MAIL, AT)
    contract_keys = ["route", "queue", "priority", "sla", "owner", "acknowledge", "deadlines"]
    assert {key: result[key] for key in contract_keys} == {
        "route": "billing",
        "queue": "billing",
        "priority": "high",
        "sla": "standard",
        "owner": {"id": "bob", "name": "Bob Stone", "email": "bob@example.com"},
        "acknowledge": True,
        "deadlines": {
            "first_response": "2026-11-23T14:00:00Z",
            "next_response": None,
            "resolution": "2026-11-30T10:00:00Z",
        },
    }
    assert result["trace"] == [
        {
            "route": "vip",
            "matched": False,
            "why": "from: pat@customer.example not in *@bigcustomer.com",
        },
        {
            "route": "billing",
            "matched": True,
            "why": "to: billing@example.com; subject matched (?i)invoice",
        },
    ]


def test_extra_keys_and_json_round_trip(rules: Rules) -> None:
    result = explain(rules, BILLING_MAIL, AT)
    assert json.loads(json.dumps(result)) == result
    assert list(result)[:8] == [
        "route",
        "queue",
        "priority",
        "sla",
        "owner",
        "acknowledge",
        "deadlines",
        "trace",
    ]
    assert result["at"] == "2026-11-23T10:00:00Z"
    assert result["tags"] == ["billing"]
    assert result["notify"] == []
    assert result["assigned_by"] == "route"
    assert result["matched_routes"] == ["billing"]
    assert result["calendar"] == {
        "id": "berlin",
        "timezone": "Europe/Berlin",
        "hours": "Mon–Fri 09:00–17:00 Europe/Berlin, closed on 2 listed dates",
    }
    assert result["business_hours_now"] is True


def test_deadlines_use_the_routed_sla_and_its_calendar(rules: Rules) -> None:
    vip = MessageFacts(("support@example.com",), "boss@bigcustomer.com", "Help", "")
    saturday_night = datetime(2026, 11, 28, 23, 30, tzinfo=UTC)
    result = explain(rules, vip, saturday_night)
    assert (result["route"], result["sla"], result["acknowledge"]) == ("vip", "vip", "vip-ack")
    assert result["owner"]["id"] == "carol"
    assert result["deadlines"] == {
        "first_response": "2026-11-29T00:30:00Z",
        "next_response": None,
        "resolution": "2026-11-29T23:30:00Z",
    }
    assert result["calendar"]["id"] == "always"
    assert result["business_hours_now"] is True


def test_deadlines_skip_holidays_and_defaults_apply(rules: Rules) -> None:
    other = MessageFacts(("hello@example.com",), "pat@customer.example", "Hi", "")
    # Wed 23 Dec 2026 16:00 CET: 1h that day, then 24/25 Dec and the weekend are closed.
    result = explain(rules, other, datetime(2026, 12, 23, 15, 0, tzinfo=UTC))
    assert result["route"] is None
    assert result["owner"] == {"id": "alice", "name": "Alice Martin", "email": "alice@example.com"}
    assert result["assigned_by"] == "default"
    assert result["deadlines"]["first_response"] == "2026-12-28T11:00:00Z"
    assert json.dumps(result).count('"route": null') == 1


def test_assignment_state_is_used(rules: Rules) -> None:
    mail = MessageFacts(("support@example.com",), "pat@customer.example", "Hi", "")
    state = AssignmentState(last_assigned={"support": "alice"})
    result = explain(rules, mail, AT, state)
    assert (result["owner"]["id"], result["assigned_by"]) == ("bob", "round-robin")


def test_format_explain_shows_utc_and_local_times(rules: Rules) -> None:
    text = format_explain(explain(rules, BILLING_MAIL, AT))
    assert text == (
        "Route:        billing\n"
        "Queue:        billing\n"
        "Priority:     high\n"
        "Owner:        Bob Stone <bob@example.com> (bob, assigned by route)\n"
        "Acknowledge:  yes\n"
        "Tags:         billing\n"
        "SLA:          standard (calendar berlin: Mon–Fri 09:00–17:00 Europe/Berlin, "
        "closed on 2 listed dates)\n"
        "Arrived at:   2026-11-23T10:00:00Z (Mon 2026-11-23 11:00 CET, Europe/Berlin), "
        "inside business hours\n"
        "Deadlines:\n"
        "  first response  2026-11-23T14:00:00Z (Mon 2026-11-23 15:00 CET, Europe/Berlin)\n"
        "  next response   not running (starts when the customer writes after a reply)\n"
        "  resolution      2026-11-30T10:00:00Z (Mon 2026-11-30 11:00 CET, Europe/Berlin)\n"
        "Language:     en (installation default; text too short to detect)\n"
        "Brand:        (none: the installation's own address)\n"
        "Templates:\n"
        "  ack             en  gateway/templates/ack.en.txt\n"
        "  notice          en  gateway/templates/notice.en.txt\n"
        "  late            en  gateway/templates/late.en.txt\n"
        "  bundled         en  gateway/templates/bundled.en.txt\n"
        "  cap             en  gateway/templates/cap.en.txt\n"
        "  notify          en  gateway/templates/notify.en.txt\n"
        "  handover        en  gateway/templates/handover.en.txt\n"
        "  alert           en  gateway/templates/alert.en.txt\n"
        "  staff           en  gateway/templates/staff.en.txt\n"
        "  escalation      en  gateway/templates/escalation.en.txt\n"
        "  common          en  gateway/templates/common.en.txt\n"
        "Trace:\n"
        "  no    vip: from: pat@customer.example not in *@bigcustomer.com\n"
        "  MATCH billing: to: billing@example.com; subject matched (?i)invoice"
    )


def test_format_explain_of_the_bare_contract_object() -> None:
    # Only the contract keys (e.g. JSON produced elsewhere): still readable, times in UTC.
    text = format_explain(
        {
            "route": None,
            "queue": "support",
            "priority": "normal",
            "sla": "standard",
            "owner": {"id": "alice", "name": "Alice Martin", "email": "alice@example.com"},
            "acknowledge": False,
            "deadlines": {"first_response": None, "next_response": None, "resolution": None},
            "trace": [],
        }
    )
    assert "Route:        (no route matched: defaults)" in text
    assert "Acknowledge:  no" in text
    assert "  first response  none" in text
    assert "  (no routes defined)" in text


def test_shipped_rules_explain_a_vip_billing_mail() -> None:
    rules = load_rules(REPO / "rules")
    mail = MessageFacts(
        ("billing@example.com",), "joe@bigcustomer.example", "Refund please", "Thanks"
    )
    result = explain(rules, mail, AT)
    assert (result["route"], result["owner"]["id"], result["sla"], result["priority"]) == (
        "billing",
        "bob",
        "vip",
        "high",
    )
    assert result["tags"] == ["vip", "billing"]
    assert result["notify"] == ["carol"]
    assert result["deadlines"]["first_response"] == "2026-11-23T11:00:00Z"
