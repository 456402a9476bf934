"""The commands an admin runs, on real files (docs/interface.md names): in this process
through the executable's own entry point (tests/support/cli.py), `serve` as a process."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import aiosmtplib
import pytest

from gateway.clock import FrozenClock
from tests.conftest import make_settings
from tests.integration.test_daemon_process import RULES, free_port, start_daemon, write_config
from tests.support.cli import run as run_cli
from tests.support.gateway import make_mail, running_gateway, send
from tests.support.tls import self_signed


def cli(cfg: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(cfg), *args], stdin=stdin)


def ingest(cfg: Path, mail: bytes, sender: str) -> None:
    argv = ["--config", str(cfg), "ingest", "--sender", sender]
    r = run_cli([*argv, "--recipient", "support@example.com"], stdin=mail)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path, free_port())


def test_tickets_show_json_has_the_contract_fields(cfg: Path) -> None:
    ingest(cfg, make_mail(subject="Printer on fire").as_bytes(), "pat@customer.example")
    assert cli(cfg, "process").returncode == 0
    r = cli(cfg, "tickets", "show", "ACME-1000", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in (
        "ref",
        "status",
        "subject",
        "requester",
        "participants",
        "owner",
        "queue",
        "priority",
        "tags",
        "created_at",
        "deadlines",
        "messages",
        "events",
        "links",
    ):
        assert key in d, key
    assert d["owner"] == {"id": "alice", "name": "Alice Martin", "email": "alice@example.com"}
    assert set(d["deadlines"]) == {"first_response", "next_response", "resolution"}
    m = d["messages"][0]
    for key in ("message_id", "direction", "kind", "from", "to", "subject", "at"):
        assert key in m, key
    assert d["created_at"].endswith("Z")
    text = cli(cfg, "tickets", "show", "1000")
    assert text.returncode == 0
    assert "ACME-1000" in text.stdout
    assert cli(cfg, "tickets", "show", "ACME-9").returncode == 1


def test_customers_merge_joins_history(cfg: Path) -> None:
    ingest(
        cfg,
        make_mail(sender="pat@customer.example", subject="one").as_bytes(),
        "pat@customer.example",
    )
    ingest(cfg, make_mail(sender="pat@home.example", subject="two").as_bytes(), "pat@home.example")
    assert cli(cfg, "process").returncode == 0
    r = cli(cfg, "customers", "merge", "pat@home.example", "pat@customer.example")
    assert r.returncode == 0, r.stderr
    assert "['pat@home.example']" in r.stdout
    assert "ACME-1001" in r.stdout
    again = cli(cfg, "customers", "merge", "pat@home.example", "pat@customer.example")
    assert again.returncode == 1
    assert "already belong to one customer" in again.stderr
    show = json.loads(cli(cfg, "tickets", "show", "ACME-1001", "--json").stdout)
    assert any(e["type"] == "customer-merged" for e in show["events"])


def test_sla_upcoming_lists_deadlines_per_owner(cfg: Path) -> None:
    ingest(cfg, make_mail(subject="due soon").as_bytes(), "pat@customer.example")
    assert cli(cfg, "process").returncode == 0
    created = json.loads(cli(cfg, "tickets", "show", "ACME-1000", "--json").stdout)
    due = created["deadlines"]["first_response"]
    at = dt.datetime.fromisoformat(due.replace("Z", "+00:00"))
    before = (at - dt.timedelta(hours=1)).isoformat()
    r = cli(cfg, "sla", "upcoming", "--within", "2h", "--at", before, "--json")
    rows = json.loads(r.stdout)
    assert [(x["ref"], x["clock"], x["due"], x["overdue"]) for x in rows] == [
        ("ACME-1000", "first_response", due, False)
    ]
    assert rows[0]["owner"]["id"] == "alice"
    none = cli(cfg, "sla", "upcoming", "--within", "10m", "--at", before)
    assert "nothing due within 10m" in none.stdout
    late = cli(
        cfg, "sla", "upcoming", "--within", "1h", "--at", (at + dt.timedelta(minutes=5)).isoformat()
    )
    assert "MISSED" in late.stdout
    assert "Alice Martin" in late.stdout


RT_RULES = """
[people.ann]
name = "Ann Lee"
email = "ann@example.com"
[calendars.office]
timezone = "{tz}"
[calendars.office.hours]
mon = "09:00-18:00"
tue = "09:00-18:00"
wed = "09:00-18:00"
thu = "09:00-18:00"
fri = "09:00-18:00"
[sla.rt]
calendar = "office"
first_response = "2h"
[defaults]
owner = "ann"
sla = "rt"
"""


@pytest.mark.parametrize(
    ("tz", "due"),
    [("America/New_York", "2007-01-02T15:00:00Z"), ("Europe/Moscow", "2007-01-02T08:00:00Z")],
)
def test_rt_timezone_vectors_through_rules_explain(tmp_path: Path, tz: str, due: str) -> None:
    # RT t/sla/timezone.t: created 2007-01-01T22:00Z, 2 business hours (Business::Hours'
    # default Mon-Fri 09:00-18:00).
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rt.toml").write_text(RT_RULES.format(tz=tz))
    cfg = write_config(tmp_path, free_port(), rules)
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail().as_bytes())
    r = cli(cfg, "rules", "explain", str(eml), "--at", "2007-01-01T22:00:00Z", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["deadlines"]["first_response"] == due


def test_rules_check_reports_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.toml").write_text((RULES / "rules.toml").read_text())
    (rules / "routes.toml").write_text(
        '\n[[route]]\nname = "x"\nmatch = { to = ["a@example.com"] }\nowner = "ghost"\n'
    )
    cfg = write_config(tmp_path, free_port(), rules)
    r = cli(cfg, "rules", "check")
    assert r.returncode == 1
    assert f"{rules}/routes.toml:5: route 'x': unknown person 'ghost'" in r.stdout


async def test_rules_file_change_is_picked_up_and_broken_edit_kept_out(
    tmp_path: Path, clock: FrozenClock
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    original = (RULES / "rules.toml").read_text()
    (rules / "rules.toml").write_text(original)
    settings = make_settings(tmp_path, rules_dir=str(rules))
    async with running_gateway(settings, clock) as gw:
        (rules / "rules.toml").write_text(original.replace('owner = "alice"', 'owner = "carol"'))
        assert gw.rules.reload_if_changed()
        gw.services.rules = gw.rules.current
        assert gw.rules.current.defaults.owner == "carol"
        (rules / "rules.toml").write_text("this is = not [valid toml")
        assert not gw.rules.reload_if_changed()
        assert gw.rules.current.defaults.owner == "carol"  # previous rules stay in force
        assert gw.rules.failed_reloads == 1
        assert gw.rules.last_error
        await send(gw, make_mail())
        await gw.pipeline.run_once()
        from tests.support.gateway import all_tickets

        assert [t.owner for t in all_tickets(gw)] == ["carol"]


async def test_starttls_is_offered_with_a_certificate(tmp_path: Path, clock: FrozenClock) -> None:
    cert, key = self_signed(tmp_path, "mx.example.com")
    settings = make_settings(
        tmp_path,
        smtp={"tls_cert": str(cert), "tls_key": str(key)},
    )
    async with running_gateway(settings, clock) as gw:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=gw.port, start_tls=False, validate_certs=False
        )
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        await smtp.starttls()
        m = make_mail(subject="over TLS")
        errors, _ = await smtp.sendmail(m["From"], ["support@example.com"], m.as_bytes())
        assert not errors
        await smtp.quit()
        assert gw.spool.counts() == {"pending": 1}
    plain = make_settings(tmp_path / "plain")
    async with running_gateway(plain, clock) as gw:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        assert not smtp.supports_extension("starttls")
        await smtp.quit()


def test_serve_notifies_systemd_when_ready(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = str(sock_path)
        try:
            daemon = start_daemon(write_config(tmp_path, free_port()))
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            ready = sock.recv(4096).decode()
            assert "READY=1" in ready
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        stopping = sock.recv(4096).decode()
        assert "STOPPING=1" in stopping


def test_dkim_keygen_writes_a_key_and_prints_the_record(tmp_path: Path, cfg: Path) -> None:
    import dkim as dkimpy

    from gateway.outbound.dkim import load_key, sign

    key_path = tmp_path / "gw1.key"
    r = cli(cfg, "dkim", "keygen", "--out", str(key_path))
    assert r.returncode == 0, r.stderr
    assert "gw1._domainkey.example.com. IN TXT" in r.stdout
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    txt = "".join(part for part in r.stdout.split('"')[1::2])
    signed = sign(
        make_mail(sender="support@example.com").as_bytes(),
        [load_key(key_path, "example.com", "gw1")],
    )
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: txt.encode())
    again = cli(cfg, "dkim", "keygen", "--out", str(key_path))
    assert again.returncode == 1  # never overwrites a key
