"""The plan, duty and coverage (docs/decisions.md D11): who is on duty, who each step will reach,
what a notice may promise, and which hours of a policy nobody covers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.routing.coverage import coverage, coverage_report
from gateway.routing.loader import RulesError, load_rules
from gateway.routing.model import Rules
from gateway.sla.deadlines import initial_deadlines
from gateway.sla.duty import (
    is_away,
    next_on_duty,
    on_duty,
    owner_for_window,
    pick_on_duty,
    resolve,
)
from gateway.sla.plan import plan_ticket
from gateway.store.models import Ticket

REPO = Path(__file__).parents[2]

PEOPLE = """
[people.alice]
name = "Alice Martin"
email = "alice@example.com"
calendar = "berlin"
backup = "bob"
manager = "carol"
away = ["2026-12-21..2027-01-03", "2026-11-25"]

[people.bob]
name = "Bob Stone"
email = "bob@example.com"
calendar = "berlin"
backup = "alice"
manager = "carol"

[people.carol]
name = "Carol Diaz"
email = "carol@example.com"
calendar = "berlin"

[people.nina]
name = "Nina Night"
email = "nina@example.com"
calendar = "nights"
"""

CALENDARS = """
[calendars.berlin]
timezone = "Europe/Berlin"
hours = { mon-fri = "09:00-17:00" }

[calendars.nights]
timezone = "Europe/Berlin"
hours = { mon-fri = "00:00-09:00,17:00-24:00", sat-sun = "00:00-24:00" }

[calendars.always]
timezone = "UTC"
hours = "24x7"
"""


def rules_with(tmp_path: Path, sla: str, extra: str = "") -> Rules:
    (tmp_path / "people.toml").write_text(PEOPLE + extra)
    (tmp_path / "calendars.toml").write_text(CALENDARS)
    (tmp_path / "sla.toml").write_text(sla)
    (tmp_path / "routes.toml").write_text(
        '[defaults]\nowner = "bob"\nqueue = "support"\nsla = "vip"\n'
        '[[route]]\nname = "support"\nmatch = { to = "support@example.com" }\n'
        'team = ["alice", "bob"]\nassign = "round-robin"\n'
    )
    return load_rules(tmp_path)


VIP = """
[sla.vip]
calendar = "always"
first_response = "1h"
escalation = [
  { after = "0m", notify = "owner" },
  { after = "30m", assign = "backup", notify = "carol" },
  { after = "2h", assign = "manager" },
]
"""
VIP_ON_CALL = VIP + 'on_call = ["nina"]\n'

SUN_10Z = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)  # Sunday 11:00 Berlin
MON_10Z = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
WED_10Z = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def ticket(rules: Rules, at: datetime, owner: str = "bob") -> Ticket:
    d = initial_deadlines(rules.policy("vip"), rules.calendar_for_policy("vip"), at)
    return Ticket(
        ref="T-1",
        owner=owner,
        sla="vip",
        created_at=at,
        updated_at=at,
        first_response_due=d.first_response,
        resolution_due=d.resolution,
        last_customer_at=at,
    )


def test_away_days_are_local_dates_and_ranges(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP)
    alice = rules.person("alice")
    assert alice.away[0] == (datetime(2026, 11, 25).date(), datetime(2026, 11, 25).date())
    assert is_away(rules, alice, WED_10Z)
    assert not on_duty(rules, alice, WED_10Z)
    assert on_duty(rules, rules.person("bob"), WED_10Z)
    # 23:30Z on the 24th is already the 25th in Berlin: away.
    assert is_away(rules, alice, datetime(2026, 11, 24, 23, 30, tzinfo=UTC))
    # Back on Thursday 09:00 Berlin.
    assert next_on_duty(rules, alice, WED_10Z) == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    # The winter range: back on Monday 4 January 2027, 09:00 Berlin.
    xmas = datetime(2026, 12, 22, 10, 0, tzinfo=UTC)
    assert next_on_duty(rules, alice, xmas) == datetime(2027, 1, 4, 8, 0, tzinfo=UTC)


def test_bad_away_entries_are_reported_with_their_line(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as error:
        rules_with(
            tmp_path,
            VIP,
            '\n[people.dora]\nname = "D"\nemail = "d@x.example"\n'
            'away = ["2026-12-31..2026-12-01", "soon"]\n',
        )
    text = str(error.value)
    assert "people.toml:" in text
    assert "ends before it starts" in text
    assert "'soon'" in text


def test_walk_reaches_the_on_call_person_at_night(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP_ON_CALL)
    policy = rules.policy("vip")
    found = resolve(rules, policy, "owner", rules.person("bob"), SUN_10Z)
    assert found.person.id == "nina"
    assert found.on_duty
    assert any("Bob Stone (owner) skipped: off duty" in s for s in found.skipped)
    # Without on-call, nobody is on duty: the one on duty soonest stays accountable.
    plain = rules_with(tmp_path, VIP)
    found = resolve(plain, plain.policy("vip"), "owner", plain.person("bob"), SUN_10Z)
    assert found.person.id == "bob"
    assert not found.on_duty
    assert "stays accountable" in found.skipped[-1]


def test_plan_names_one_person_per_step_and_the_notice_commitment(tmp_path: Path) -> None:
    """Finding 1: on a Sunday the 24x7 ladder is walked with duty at each step's moment."""
    rules = rules_with(tmp_path, VIP_ON_CALL)
    t = ticket(rules, SUN_10Z)
    due = t.first_response_due
    assert due is not None
    plan = plan_ticket(t, "bob", "vip", rules, due)
    assert plan.acting.person.id == "nina"
    people = [
        (s.index, s.acting.id, s.holder.id) for s in plan.steps if s.clock == "first_response"
    ]
    # notify owner -> nina (on call); assign backup (alice, off) -> nina; manager -> nina.
    assert people == [(0, "nina", "bob"), (1, "nina", "nina"), (2, "nina", "nina")]
    after_first = plan_ticket(t, "bob", "vip", rules, due, [("first_response", due, 0)])
    commitment = after_first.commitment("first_response", due, rules.person("nina"))
    assert commitment.by == due + timedelta(minutes=30)
    assert commitment.then is None  # the next step keeps Nina: no "X takes over" invented


def test_plan_on_a_weekday_hands_over_to_the_backup(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP_ON_CALL)
    t = ticket(rules, MON_10Z)
    due = t.first_response_due
    assert due is not None
    plan = plan_ticket(t, "bob", "vip", rules, due, [("first_response", due, 0)])
    commitment = plan.commitment("first_response", due, rules.person("bob"))
    assert commitment.then is not None
    assert commitment.then.id == "alice"
    # Step 3 assigns the manager of the owner at that moment (alice -> carol).
    (last,) = [s for s in plan.steps if s.clock == "first_response" and s.index == 2]
    assert last.acting.id == "carol"


def test_ladder_exhausted_promises_no_time(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP_ON_CALL)
    t = ticket(rules, MON_10Z)
    due = t.first_response_due
    assert due is not None
    fired = [("first_response", due, i) for i in range(3)]
    plan = plan_ticket(t, "carol", "vip", rules, due + timedelta(hours=3), fired)
    commitment = plan.commitment("first_response", due, rules.person("carol"))
    assert commitment.by is None
    assert commitment.then is None


def test_acknowledgement_owner_is_on_duty_in_the_window(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP_ON_CALL)
    policy = rules.policy("vip")
    due = SUN_10Z + timedelta(hours=1)
    found = owner_for_window(rules, policy, rules.person("bob"), SUN_10Z, due)
    assert found.person.id == "nina"
    # Alice away on Wednesday: her backup Bob is named for a Wednesday window.
    found = owner_for_window(
        rules, policy, rules.person("alice"), WED_10Z, WED_10Z + timedelta(hours=1)
    )
    assert found.person.id == "bob"


def test_team_assignment_picks_only_people_on_duty(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP_ON_CALL)
    assert pick_on_duty(rules, ("alice", "bob"), WED_10Z) == ("bob",)
    assert pick_on_duty(rules, ("alice", "bob"), MON_10Z) == ("alice", "bob")
    # Sunday: nobody is on duty; both are back on Monday 09:00 -> both are "soonest".
    assert pick_on_duty(rules, ("alice", "bob"), SUN_10Z) == ("alice", "bob")
    from gateway.routing.engine import AssignmentState, evaluate
    from gateway.routing.facts import MessageFacts

    facts = MessageFacts(
        recipients=("support@example.com",),
        sender="p@c.example",
        subject="x",
        body="",
        headers=(),
        authenticated=False,
        has_attachment=False,
    )
    # Round-robin's cursor points at Bob; Alice would be next but is away: Bob again.
    state = AssignmentState(last_assigned={"support": "bob"})
    assert evaluate(rules, facts, WED_10Z, state).owner.id == "bob"
    assert evaluate(rules, facts, MON_10Z, state).owner.id == "alice"


def test_coverage_warns_about_hours_nobody_covers(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, VIP)
    start = datetime(2026, 11, 30, tzinfo=UTC)
    result = coverage(rules, "vip", start, start + timedelta(weeks=4))
    assert result.open_time == timedelta(weeks=4)
    assert result.uncovered == timedelta(weeks=4) - timedelta(hours=8 * 20)
    warnings, errors = coverage_report(rules, start)
    assert errors == []
    (warning,) = warnings
    assert warning.startswith(f"{tmp_path / 'sla.toml'}:2: warning: sla 'vip'")
    assert "512h of its 672h" in warning
    # With the on-call person, nothing is left uncovered.
    covered = rules_with(tmp_path, VIP_ON_CALL)
    assert coverage_report(covered, start) == ([], [])


def test_coverage_fails_a_policy_that_can_never_be_served(tmp_path: Path) -> None:
    weekend = """
[calendars.weekend]
timezone = "Europe/Berlin"
hours = { sat-sun = "10:00-16:00" }
"""
    (tmp_path / "extra.toml").write_text(weekend)
    sla = VIP.replace('calendar = "always"', 'calendar = "weekend"')
    rules = rules_with(tmp_path, sla)
    _, errors = coverage_report(rules, datetime(2026, 11, 30, tzinfo=UTC))
    (error,) = errors
    assert "sla 'vip' can never be served" in error
    assert error.startswith(str(tmp_path))


def test_shipped_rules_check_clean(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'rules_dir = "{REPO / "rules"}"\n')
    from tests.support.cli import run as run_cli

    out = run_cli(
        ["--config", str(config), "rules", "check", "--at", "2026-12-03T00:00:00Z"], cwd=REPO
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning" not in out.stdout
    assert "rules are valid" in out.stdout


def test_promise_states() -> None:
    from gateway.store.models import Promise
    from gateway.store.promises import settle_state

    made = MON_10Z
    due = MON_10Z + timedelta(hours=1)

    def state(now: datetime = due - timedelta(minutes=1), **ticket: object) -> str | None:
        t = Ticket(ref="T", created_at=made, updated_at=made, **ticket)  # type: ignore[arg-type]
        p = Promise(ticket_id=1, made_at=made, clock="next_response", due=due)
        return settle_state(p, t, now)

    assert state() is None  # open, before its time
    assert state(now=due) == "broken"
    assert state(last_staff_at=due - timedelta(minutes=5)) == "kept"
    assert state(last_staff_at=made - timedelta(minutes=5), now=due) == "broken"  # older reply
    assert state(status="closed", closed_at=due - timedelta(minutes=5), now=due) == "withdrawn"
    assert state(status="waiting", waiting_since=made, now=due) == "withdrawn"
    assert state(status="closed", closed_at=due + timedelta(minutes=5), now=due) == "broken"
