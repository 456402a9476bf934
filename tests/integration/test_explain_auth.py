"""`rules explain` computes the facts the way the pipeline does: a route on `authenticated`
explains as it routes (the explanation used to assume every sender unauthenticated)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cli import cli, ingest
from tests.integration.test_daemon_process import free_port, write_config
from tests.support.gateway import make_mail

RULES = """\
[people.ann]
name = "Ann Lee"
email = "ann@example.com"

[calendars.always]
timezone = "UTC"
hours = "24x7"

[sla.std]
calendar = "always"
first_response = "4h"

[defaults]
owner = "ann"
sla = "std"

[[route]]
name = "verified"
match = { authenticated = true }
queue = "verified"
"""

# What a trusted front MTA wrote after checking the mail (RFC 8601): DMARC passed.
VERDICT = "mx.front.example; dmarc=pass header.from=customer.example"


def _setup(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.toml").write_text(RULES, encoding="utf-8")
    cfg = write_config(tmp_path, free_port(), rules)
    # The front MTA's verdicts count (docs/security.md); no DNS leaves the machine.
    with cfg.open("a", encoding="utf-8") as f:
        f.write('trusted_authserv_ids = ["mx.front.example"]\n')
    return cfg


def test_explain_matches_authenticated_as_the_pipeline_routed_it(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    raw = make_mail(headers={"Authentication-Results": VERDICT}).as_bytes()

    # The pipeline routes it by `authenticated = true`.
    ingest(cfg, raw, "pat@customer.example")
    assert cli(cfg, "process").returncode == 0
    shown = cli(cfg, "tickets", "show", "ACME-1000", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["queue"] == "verified"

    # Explaining the same message says the same, for the same reason.
    eml = tmp_path / "m.eml"
    eml.write_bytes(raw)
    r = cli(cfg, "rules", "explain", str(eml), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert (result["route"], result["queue"]) == ("verified", "verified")
    assert result["trace"] == [{"route": "verified", "matched": True, "why": "authenticated: yes"}]


def test_explain_of_an_unproven_sender_does_not_match(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    eml = tmp_path / "m.eml"
    # The same verdict from a host nobody trusts proves nothing.
    eml.write_bytes(
        make_mail(
            headers={"Authentication-Results": VERDICT.replace("mx.front", "mx.other")}
        ).as_bytes()
    )
    r = cli(cfg, "rules", "explain", str(eml), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["route"] is None
    assert result["trace"][0]["why"] == "authenticated: no (route wants yes)"
