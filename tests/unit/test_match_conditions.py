"""The match-condition registry: a new key is one `Condition` and the loader, the engine and
the explanation all follow (docs/architecture.md "Adding a route match key")."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline.parse import parse
from gateway.pipeline.route import facts_from
from gateway.routing.conditions import CONDITIONS, Condition, Moment, Report
from gateway.routing.engine import evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import check_rules, load_rules

RULES = """\
[calendars.always]
timezone = "UTC"
hours = "24x7"

[people.alice]
name = "Alice Martin"
email = "alice@example.com"

[sla.standard]
calendar = "always"
first_response = "4h"

[defaults]
owner = "alice"
sla = "standard"

[[route]]
name = "big"
match = { size_over = 100 }
queue = "big"
"""

AT = datetime(2026, 11, 23, 10, tzinfo=UTC)


def _load_size(key: str, value: Any, report: Report) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    report.problem((key,), f"'{key}' must be a positive number of bytes")
    return None


def _check_size(limit: int, facts: MessageFacts, _: Moment) -> tuple[bool, str]:
    size = facts.fact("size_over")
    assert isinstance(size, int)
    if size > limit:
        return True, f"size {size} bytes is over {limit}"
    return False, f"size {size} bytes is not over {limit}"


@pytest.fixture
def size_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match key the gateway does not ship, registered the way the recipe says."""
    spec = Condition(
        "size_over", _load_size, _check_size, cost=35, fact=lambda parsed: len(parsed.text)
    )
    monkeypatch.setitem(CONDITIONS, "size_over", spec)


def _message(text: str) -> MessageFacts:
    raw = (
        "From: pat@customer.example\r\nTo: support@example.com\r\nSubject: Hi\r\n"
        f"Message-ID: <m1@customer.example>\r\n\r\n{text}\r\n"
    ).encode()
    parsed = parse(raw)
    return facts_from(parsed, [], parsed.from_address, authenticated=False)


def test_a_registered_condition_is_loaded_checked_and_explained(
    tmp_path: Path, size_condition: None
) -> None:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    rules = load_rules(tmp_path)
    assert rules.routes[0].match.get("size_over") == 100

    big = evaluate(rules, _message("x" * 500), AT)
    assert (big.route, big.queue) == ("big", "big")
    assert big.trace[0].why.startswith("size ")
    assert "is over 100" in big.trace[0].why

    small = evaluate(rules, _message("short"), AT)
    assert small.route is None
    assert "is not over 100" in small.trace[0].why


def test_a_registered_condition_reports_bad_values_at_their_line(
    tmp_path: Path, size_condition: None
) -> None:
    (tmp_path / "rules.toml").write_text(
        RULES.replace("size_over = 100", "size_over = -1"), encoding="utf-8"
    )
    assert check_rules(tmp_path) == [
        f"{tmp_path}/rules.toml:19: route 'big': 'size_over' must be a positive number of bytes"
    ]


def test_without_the_spec_the_key_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    [problem] = check_rules(tmp_path)
    assert problem.startswith(f"{tmp_path}/rules.toml:19: route 'big': unknown key 'size_over'")
    # The list of allowed keys is the registry, in documentation order.
    assert problem.endswith("allowed: " + ", ".join(CONDITIONS))


def test_not_may_hold_every_key_but_itself(tmp_path: Path) -> None:
    nested = RULES.replace("size_over = 100", 'not = { not = { to = "a@example.com" } }')
    (tmp_path / "rules.toml").write_text(nested, encoding="utf-8")
    [problem] = check_rules(tmp_path)
    assert problem.startswith(
        f"{tmp_path}/rules.toml:19: route 'big' (in 'not'): unknown key 'not'"
    ), problem
