"""Spam verdicts (docs/decisions.md D18): reading the front filter's headers, trusting them only
from a trusted relay, and routing on them (``spam``, ``spam_score``, ``disposition = "junk"``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.explain import explain, format_explain
from gateway.routing.engine import evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import check_rules, load_rules
from gateway.security.spam import (
    authserv_ids_for,
    client_is_trusted_relay,
    read_spam_verdict,
    relay_client,
)
from gateway.settings import ConfigError
from tests.conftest import make_settings

AT = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "spam", "score"),
    [
        ([("X-Spam-Flag", "YES")], True, None),
        ([("X-Spam-Flag", "NO")], False, None),
        ([("X-Spam-Status", "Yes, score=7.3 required=5.0 tests=BAYES_99")], True, 7.3),
        ([("X-Spam-Status", "No, score=-0.1 required=5.0")], False, -0.1),
        ([("X-Spamd-Result", "default: True [12.40 / 15.00]; R_SPF_FAIL(1.0)")], True, 12.4),
        ([("X-Spamd-Result", "default: False [1.20 / 15.00]")], False, 1.2),
        ([("X-Rspamd-Action", "add header"), ("X-Rspamd-Score", "8.5")], True, 8.5),
        ([("X-Rspamd-Action", "no action")], False, None),
        ([("X-MS-Exchange-Organization-SCL", "6")], True, 6.0),
        ([("X-MS-Exchange-Organization-SCL", "-1")], False, -1.0),
        ([("Subject", "hello")], None, None),
        # rspamd's action is its final word, even over a "No" of another header.
        ([("X-Spam-Flag", "NO"), ("X-Rspamd-Action", "reject")], True, None),
        # The topmost copy is the front filter's (it prepends); a sender's copy is below.
        ([("X-Spam-Flag", "YES"), ("X-Spam-Flag", "NO")], True, None),
    ],
)
def test_front_filter_headers_are_read(
    headers: list[tuple[str, str]], spam: bool | None, score: float | None
) -> None:
    v = read_spam_verdict(headers, client_ip="10.0.0.5", trusted=True)
    assert (v.spam, v.score) == (spam, score)
    assert v.trusted is (spam is not None or score is not None)


def test_untrusted_verdict_is_recorded_but_never_routable() -> None:
    v = read_spam_verdict([("X-Spam-Flag", "YES")], client_ip="203.0.113.9", trusted=False)
    assert v.spam is True
    assert not v.trusted
    assert v.spam_for_routes is False
    assert v.score_for_routes is None
    assert "UNTRUSTED" in v.describe()
    assert "203.0.113.9" in v.describe()


@pytest.mark.parametrize(
    ("relays", "ip", "trusted"),
    [
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["127.0.0.1/32"], "127.0.0.2", False),
        (["10.0.0.0/8", "2001:db8::/32"], "10.20.30.40", True),
        (["10.0.0.0/8", "2001:db8::/32"], "2001:db8::25", True),
        (["10.0.0.5"], "::ffff:10.0.0.5", True),  # dual-stack listener
        ([], "127.0.0.1", False),  # nothing configured: nobody is trusted
        (["127.0.0.1/32"], "", False),
        (["127.0.0.1/32"], "not-an-ip", False),
    ],
)
def test_trusted_relays(relays: list[str], ip: str, trusted: bool) -> None:
    assert client_is_trusted_relay(relays, ip) is trusted


def test_pipe_mode_counts_as_the_local_host() -> None:
    assert relay_client("", "pipe") == "127.0.0.1"
    assert relay_client("192.0.2.1", "smtp") == "192.0.2.1"
    assert relay_client("", "smtp") == ""


def test_authentication_results_believed_only_from_a_trusted_relay() -> None:
    ids = ["mx.example.com"]
    assert authserv_ids_for(ids, ["10.0.0.0/8"], "10.1.2.3") == ids
    assert authserv_ids_for(ids, ["10.0.0.0/8"], "198.51.100.7") == []
    # No trusted relays configured: the behaviour before docs/decisions.md D18 (docs/spam.md).
    assert authserv_ids_for(ids, [], "198.51.100.7") == ids


def test_trusted_relays_setting_is_validated(tmp_path: Path) -> None:
    assert make_settings(tmp_path, security={"trusted_relays": ["10.0.0.0/8"]})
    with pytest.raises(ConfigError, match="trusted_relays"):
        make_settings(tmp_path, security={"trusted_relays": ["10.0.0.0/33"]})


# ------------------------------------------------------------------------------ routing

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
queue = "support"
sla = "standard"

[[route]]
name = "spam"
match = { spam = true }
disposition = "junk"

[[route]]
name = "likely-spam"
match = { spam_score = ">= 4.5" }
disposition = "junk"
"""


def _rules(tmp_path: Path, text: str = RULES) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "rules.toml").write_text(text)
    return d


def _facts(spam: bool = False, score: float | None = None) -> MessageFacts:
    return MessageFacts(
        recipients=("support@example.com",),
        sender="pat@customer.example",
        subject="hello",
        body="",
        spam=spam,
        spam_score=score,
    )


def test_spam_routes_to_junk_and_says_why(tmp_path: Path) -> None:
    rules = load_rules(_rules(tmp_path))
    d = evaluate(rules, _facts(spam=True, score=9.0), AT)
    assert (d.disposition, d.disposition_route) == ("junk", "spam")
    assert d.trace[0].why == "spam (trusted front filter): yes"

    d = evaluate(rules, _facts(score=4.5), AT)
    assert (d.disposition, d.disposition_route) == ("junk", "likely-spam")
    assert "spam score 4.5 >= 4.5" in d.trace[1].why

    d = evaluate(rules, _facts(score=1.0), AT)
    assert d.disposition == "ticket"
    assert d.trace[0].why == "spam (trusted front filter): no (route wants yes)"
    assert d.trace[1].why == "spam score 1 is not >= 4.5"

    d = evaluate(rules, _facts(), AT)  # no trusted verdict at all
    assert d.disposition == "ticket"
    assert "none from a trusted front filter" in d.trace[1].why

    result = explain(rules, _facts(spam=True), AT)
    assert result["disposition"] == "junk"
    assert "Disposition:  JUNK" in format_explain(result)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('disposition = "junk"\n\n[[route]]', 'disposition = "trash"\n\n[[route]]', "bad disp"),
        ('spam_score = ">= 4.5"', 'spam_score = "lots"', "'spam_score' must be"),
        ("spam = true", 'spam = "yes"', "'spam' must be true or false"),
    ],
)
def test_bad_spam_keys_are_reported(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in RULES
    problems = check_rules(_rules(tmp_path, RULES.replace(old, new, 1)))
    assert any(message in p for p in problems), problems


def test_bare_number_spam_score_means_at_least(tmp_path: Path) -> None:
    rules = load_rules(_rules(tmp_path, RULES.replace('">= 4.5"', "6")))
    assert evaluate(rules, _facts(score=6.0), AT).disposition == "junk"
    assert evaluate(rules, _facts(score=5.9), AT).disposition == "ticket"
