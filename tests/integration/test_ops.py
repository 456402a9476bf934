"""Running it like an admin would (docs/decisions.md D14): metrics, health, status, errors, help,
logs.

Everything here goes through the real surfaces: SMTP over loopback into the real daemon,
HTTP GETs to its admin listener, the CLI as a subprocess, and the daemon's own log output.
Faults are real: the database folder and the spool folder are moved away under a running
daemon; a port is taken by another listener; stdout is a pipe whose reader has gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiosmtplib
import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.security.dns import StaticResolver
from tests.conftest import make_settings
from tests.integration.test_daemon_process import RULES, free_port
from tests.integration.test_staff_email import Env, _customer, _staff
from tests.integration.test_staff_email import env as staff_env  # noqa: F401 (a fixture)
from tests.support.cli import run as run_cli
from tests.support.gateway import make_mail, running_gateway, send
from tests.support.relay import CaptureRelay


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    total = None
    for line in metrics.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(3))
    return total or 0.0


def cli(
    cfg: Path | None,
    *args: str,
    cwd: Path | None = None,
    env_extra: dict[str, str] | None = None,
    process: bool = False,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """The command in this process (tests/support/cli.py), or with ``process=True`` as a
    child process (a `serve` that gets as far as binding its ports)."""
    pre = ["--config", str(cfg)] if cfg is not None else []
    if not process:
        return run_cli([*pre, *args], cwd=cwd, env_extra=env_extra, stdin=stdin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *pre, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The failure is one line on stderr, never a traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    assert "Traceback" not in r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- metrics and health on the in-process gateway (FrozenClock, test-driven pipeline) ------


async def test_metrics_count_ten_messages_and_health_follows_the_stores(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        http={"listen": "127.0.0.1:0"},
        storage={
            "database_url": f"sqlite:///{tmp_path}/db/gateway.db",
            "spool_dir": str(tmp_path / "spool"),
        },
    )
    clock = FrozenClock()
    async with running_gateway(settings, clock) as gw:
        assert gw.http_port
        for i in range(10):
            await send(gw, make_mail(subject=f"Printer {i}", sender=f"c{i}@customer.example"))
        clock.advance(90)
        _, before = await aget(gw.http_port, "/metrics")
        assert sample(before, "support_gateway_smtp_messages_accepted_total") == 10
        assert sample(before, "support_gateway_spool_messages", state="pending") == 10
        assert sample(before, "support_gateway_spool_oldest_age_seconds") >= 90
        assert sample(before, "support_gateway_pipeline_processed_total") == 0

        assert await gw.pipeline.run_once() == 10
        code, text = await aget(gw.http_port, "/metrics")
        assert code == 200
        assert sample(text, "support_gateway_smtp_messages_accepted_total") == 10
        assert sample(text, "support_gateway_pipeline_processed_total") == 10
        assert sample(text, "support_gateway_pipeline_failed_total") == 0
        assert sample(text, "support_gateway_spool_messages", state="pending") == 0
        assert sample(text, "support_gateway_quarantine_messages") == 0
        assert sample(text, "support_gateway_tickets_open", status="open") == 10
        assert sample(text, "support_gateway_tickets_open", queue="support", owner="alice") == 10
        assert sample(text, "support_gateway_acks_sent_total") == 10
        assert sample(text, "support_gateway_outbox_messages", state="queued", kind="ack") == 10
        assert "support_gateway_rules_reloads_total" in text
        assert "support_gateway_dns_errors_total 0.0" in text
        # The shipped Grafana dashboard uses only names that /metrics exposes.
        dashboard = (
            Path(__file__).parents[2] / "contrib" / "grafana-support-gateway.json"
        ).read_text()
        used = set(re.findall(r"support_gateway_[a-z_]+", dashboard))
        exposed = set(re.findall(r"^# TYPE (support_gateway_[a-z_]+)", text, re.M))
        exposed |= {n + "_total" for n in exposed}
        assert used, used - exposed
        assert used <= exposed, used - exposed
        # A second scrape counts the event log incrementally: no double counting.
        _, again = await aget(gw.http_port, "/metrics")
        assert sample(again, "support_gateway_acks_sent_total") == 10

        assert await aget(gw.http_port, "/healthz") == (200, "ok\n")
        assert (await aget(gw.http_port, "/readyz"))[0] == 200

        # The database's folder goes away (an unmounted volume): not ready, and says why.
        (tmp_path / "db").rename(tmp_path / "db-away")
        code, why = await aget(gw.http_port, "/readyz")
        assert code == 503, why
        assert why.startswith("database:"), why
        assert (await aget(gw.http_port, "/healthz"))[0] == 200  # alive all the same
        (tmp_path / "db-away").rename(tmp_path / "db")
        assert (await aget(gw.http_port, "/readyz"))[0] == 200

        # The spool folder goes away: not ready either.
        (tmp_path / "spool").rename(tmp_path / "spool-away")
        code, why = await aget(gw.http_port, "/readyz")
        assert code == 503, why
        assert "spool:" in why, why
        (tmp_path / "spool-away").rename(tmp_path / "spool")
        assert (await aget(gw.http_port, "/readyz"))[0] == 200
        assert (await aget(gw.http_port, "/nope"))[0] == 404


async def test_metrics_count_deferrals_by_reply_code(tmp_path: Path) -> None:
    # A disk "too full" for smtp.min_free_disk: MAIL FROM answers 452, counted as deferred.
    settings = make_settings(
        tmp_path, http={"listen": "127.0.0.1:0"}, smtp={"min_free_disk": 2**62}
    )
    async with running_gateway(settings, FrozenClock()) as gw:
        assert gw.port
        assert gw.http_port
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=10) as smtp:
            with pytest.raises(aiosmtplib.SMTPResponseException) as err:
                await smtp.sendmail("pat@customer.example", ["support@example.com"], b"x\r\n")
            assert err.value.code == 452
        _, text = await aget(gw.http_port, "/metrics")
        assert sample(text, "support_gateway_smtp_messages_deferred_total", code="452") == 1
        assert sample(text, "support_gateway_smtp_messages_accepted_total") == 0
        code, why = await aget(gw.http_port, "/readyz")
        assert code == 503
        assert "min_free_disk" in why


async def test_two_gateways_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    a = make_settings(tmp_path / "a", http={"listen": "127.0.0.1:0"})
    b = make_settings(tmp_path / "b", http={"listen": "127.0.0.1:0"})
    async with running_gateway(a, FrozenClock()) as ga, running_gateway(b, FrozenClock()) as gb:
        await send(ga, make_mail())
        assert ga.http_port
        assert gb.http_port
        _, ta = await aget(ga.http_port, "/metrics")
        _, tb = await aget(gb.http_port, "/metrics")
        assert sample(ta, "support_gateway_smtp_messages_accepted_total") == 1
        assert sample(tb, "support_gateway_smtp_messages_accepted_total") == 0


async def test_rules_are_read_off_the_event_loop(tmp_path: Path) -> None:
    """SIGHUP's reload and the file watch read the rules (TOML, holiday calendars) in a
    worker thread: on the event loop a reload stalled every SMTP session."""
    import threading

    from tests.integration.test_fault_infra import wait_until

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    settings = make_settings(tmp_path, rules_dir=str(rules))
    async with running_gateway(settings, FrozenClock(), workers=True) as gw:
        threads: list[threading.Thread] = []
        read = gw.rules._reload

        def recording() -> bool:
            threads.append(threading.current_thread())
            return read()

        gw.rules._reload = recording  # type: ignore[method-assign]
        assert await gw.reload_rules_off_loop() is True  # what SIGHUP runs
        edited = rules / "rules.toml"
        edited.write_text(edited.read_text() + "\n# edited\n")
        await wait_until(lambda: len(threads) == 2, what="the file watch's reload")
        assert gw.services.rules is gw.rules.current
    assert threading.main_thread() not in threads


async def test_metrics_count_dns_errors_and_failed_rules_reloads(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    settings = make_settings(tmp_path, rules_dir=str(rules), http={"listen": "127.0.0.1:0"})
    # The sender's SPF lookup times out (a real DnsTempError from the resolver).
    dns = StaticResolver(temp_errors=[("customer.example", "TXT")])
    gw = Gateway(settings, clock=FrozenClock(), resolver=dns)
    await gw.start(workers=False)
    try:
        assert gw.http_port
        await send(gw, make_mail())
        await gw.pipeline.run_once()
        (rules / "zz-broken.toml").write_text("[[route]]\nname = \n")
        assert gw.reload_rules() is False
        _, text = await aget(gw.http_port, "/metrics")
        assert sample(text, "support_gateway_dns_errors_total") >= 1
        assert sample(text, "support_gateway_rules_reloads_total", result="failed") == 1
        assert sample(text, "support_gateway_rules_reloads_total", result="ok") == 0
        assert sample(text, "support_gateway_pipeline_processed_total") == 1
    finally:
        await gw.stop()


# -- the real daemon: `serve` in its own process, pipeline in a child process --------------


def ops_config(
    tmp_path: Path, *, smtp_port: int, http_port: int, relay: int, extra: str = ""
) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'rules_dir = "{RULES}"\n{extra}'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "mx.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/gw.db"\nspool_dir = "{tmp_path}/spool"\n'
        '[security]\nsecret_key = "ops-test-secret-0123456789abcdefghij"\nverify_senders = false\n'
        # ack_window 0s: each of the test's mails is acknowledged on its own (no bundling).
        f'[outbound]\nrelay = "127.0.0.1:{relay}"\nack_window = "0s"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
    )
    return cfg


class Serve:
    """`support-gateway serve` as a child process; stderr (the log) kept in a file."""

    def __init__(self, cfg: Path, *opts: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.log_path = cfg.parent / f"serve-{time.monotonic_ns()}.log"
        self.out_path = cfg.parent / f"serve-{time.monotonic_ns()}.out"
        with open(self.log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(cfg), *opts, "serve"],
                stdout=out,
                stderr=err,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def started(self) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:  # bounded wait for start-up (work, not a deadline)
            if b"listening on" in self.out_path.read_bytes():
                return
            assert self.proc.poll() is None, self.log()
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon did not start: {self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_for(predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:  # bounded poll for work to finish
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _quit_cleanly(port: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.quit()


@pytest.mark.slow
async def test_real_daemon_metrics_status_and_log_lines(tmp_path: Path) -> None:
    async with CaptureRelay() as relay:
        smtp_port, http_port = free_port(), free_port()
        cfg = ops_config(tmp_path, smtp_port=smtp_port, http_port=http_port, relay=relay.port)
        daemon = Serve(cfg)
        try:
            await daemon.started()
            for i in range(10):
                m = make_mail(
                    subject=f"Invoice question {i}", message_id=f"<q{i}@customer.example>"
                )
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port) as smtp:
                    await smtp.send_message(m)
            await _quit_cleanly(smtp_port)

            async def processed() -> bool:
                code, text = await aget(http_port, "/metrics")
                return (
                    code == 200
                    and sample(text, "support_gateway_pipeline_processed_total") == 10
                    and sample(text, "support_gateway_deliveries_total", outcome="sent") >= 10
                )

            # Pipeline counts cross the process boundary over the notify pipe.
            await wait_for(processed, "10 processed and delivered")
            _, text = await aget(http_port, "/metrics")
            # The figure for the closing note (pytest -n 0 -s prints it).
            print(*[x for x in text.splitlines() if x.startswith("support_gateway_")], sep="\n")
            assert sample(text, "support_gateway_smtp_messages_accepted_total") == 10
            assert sample(text, "support_gateway_tickets_open") == 10
            # One sender, ten new requests: outbound.daily_ack_cap (5) acknowledged, the rest
            # suppressed and counted by reason.
            assert sample(text, "support_gateway_acks_sent_total") == 5
            assert sample(text, "support_gateway_acks_suppressed_total", reason="daily_cap") == 5
            assert (await aget(http_port, "/readyz"))[0] == 200

            r = await asyncio.to_thread(cli, cfg, "status", "--json")
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            assert st["daemon"]["running"] is True
            assert st["daemon"]["rules_loaded_at"]
            assert st["spool"]["pending"] == 0
            assert st["quarantine"]["count"] == 0
            assert st["tickets"]["open"] == 10
            assert st["tickets"]["by_owner"] == {"alice": 10}
            assert st["outbox"]["sent"] >= 10
            assert st["version"]
            assert st["node"] == "mx.example.com"
            text_status = await asyncio.to_thread(cli, cfg, "status")
            assert "tickets:    10 open" in text_status.stdout
        finally:
            await asyncio.to_thread(daemon.stop)
    log = daemon.log()
    assert log.count("gateway.smtp: accepted ") == 10
    assert "message_id=<q3@customer.example>" in log
    processed_lines = [x for x in log.splitlines() if "processed spool=" in x]
    assert len(processed_lines) == 10
    assert all("ticket=ACME-" in x for x in processed_lines)
    delivered = [x for x in log.splitlines() if " delivered outbox=" in x]
    assert len(delivered) >= 10
    assert all("reply=" in x for x in delivered)
    assert "alembic" not in log.lower()
    assert "Connection lost" not in log


@pytest.mark.slow
async def test_json_log_lines_and_delivery_failures_logged(tmp_path: Path) -> None:
    # The relay is a port where nothing listens: every delivery fails temporarily.
    smtp_port, http_port = free_port(), free_port()
    cfg = ops_config(tmp_path, smtp_port=smtp_port, http_port=http_port, relay=free_port())
    daemon = Serve(cfg, "--log-format", "json")
    try:
        await daemon.started()
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port) as smtp:
            await smtp.send_message(make_mail(message_id="<j1@customer.example>"))

        async def deferred() -> bool:
            _, text = await aget(http_port, "/metrics")
            return sample(text, "support_gateway_delivery_failures_total", kind="temporary") >= 1

        await wait_for(deferred, "a deferred delivery")
    finally:
        await asyncio.to_thread(daemon.stop)
    records = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    assert records, "no log lines"
    accepted = [r for r in records if r.get("event") == "accepted"]
    assert accepted
    assert accepted[0]["message_id"] == "<j1@customer.example>"
    assert any(r.get("event") == "processed" and r["ticket"].startswith("ACME-") for r in records)
    failures = [r for r in records if r.get("event") == "delivery"]
    assert failures
    assert all(r["level"] == "WARNING" and r["state"] == "queued" for r in failures)


# -- clear errors: one line, the right exit status, never a traceback -----------------------


def test_rules_explain_missing_file_is_one_line(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path, smtp_port=0, http_port=0, relay=9)
    r = cli(cfg, "rules", "explain", str(tmp_path / "nonexistent.eml"))
    assert r.returncode == 1
    assert "nonexistent.eml: No such file or directory" in one_line_error(r)


def test_garbage_listen_from_the_environment_names_the_key(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path, smtp_port=0, http_port=0, relay=9)
    r = cli(cfg, "serve", env_extra={"GATEWAY_SMTP__LISTEN": "garbage"})
    assert r.returncode == 78
    assert "smtp.listen = 'garbage'" in one_line_error(r)
    r = cli(cfg, "serve", env_extra={"GATEWAY_HTTP__LISTEN": "[::1"})
    assert r.returncode == 78
    assert "http.listen" in one_line_error(r)


def test_listen_port_in_use_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ops_config(tmp_path, smtp_port=port, http_port=0, relay=9)
        r = cli(cfg, "serve", process=True)
        assert r.returncode == 1
        line = one_line_error(r)
        assert f"smtp.listen = '127.0.0.1:{port}'" in line
        assert "already in use" in line
        cfg = ops_config(tmp_path, smtp_port=0, http_port=port, relay=9)
        r = cli(cfg, "serve", process=True)
        assert r.returncode == 1
        assert "http.listen" in one_line_error(r)


def test_closed_pipe_is_a_quiet_exit(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path, smtp_port=0, http_port=0, relay=9)
    assert cli(cfg, "db", "upgrade").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # `outbox list | head`: the reader is gone before we write (closed at once, before the
    # interpreter has even started); --help is long enough for one write to hit it too.
    for args in (["outbox", "list", "--json"], ["status"], ["--help"]):
        p = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert p.stdout is not None
        assert p.stderr is not None
        p.stdout.close()
        err = p.stderr.read().decode()
        p.stderr.close()
        assert p.wait(timeout=60) == 0, err
        assert "Traceback" not in err, err
        assert "BrokenPipe" not in err, err


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (
        ["tickets", "list"],
        ["tickets", "show", "ACME-1000"],
        ["outbox", "list"],
        ["sla", "upcoming"],
        ["status"],
    ):
        r = cli(None, *args, cwd=elsewhere)
        assert r.returncode == 1, (args, r.stderr)
        line = one_line_error(r)
        assert "no database at var/gateway.db" in line
        assert "--config" in line
    r = cli(None, "quarantine", "list", cwd=elsewhere)
    assert r.returncode == 1
    assert "no spool at" in one_line_error(r)
    assert list(elsewhere.iterdir()) == []


def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path, smtp_port=0, http_port=0, relay=9)
    assert cli(cfg, "db", "upgrade").returncode == 0
    r = cli(cfg, "sla", "upcoming", "--at", "yesterday")
    assert r.returncode == 2
    assert "--at 'yesterday'" in one_line_error(r)
    r = cli(cfg, "tickets", "list", "--status", "pending")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_tickets_show_text_has_deadline_lines(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path, smtp_port=0, http_port=0, relay=9)
    r = cli(
        cfg,
        "ingest",
        "-f",
        "pat@customer.example",
        "-r",
        "support@example.com",
        stdin=make_mail().as_bytes(),
    )
    assert r.returncode == 0, r.stderr
    assert cli(cfg, "process").returncode == 0
    text = cli(cfg, "tickets", "show", "ACME-1000").stdout
    assert "{" not in text.split("deadlines:")[1].split("\n  20")[0], text
    assert re.search(r"^  first response: +\d{4}-\d\d-\d\dT", text, re.M), text
    assert re.search(r"^  next response: +-$", text, re.M), text
    data = json.loads(cli(cfg, "tickets", "show", "ACME-1000", "--json").stdout)
    assert set(data["deadlines"]) == {"first_response", "next_response", "resolution"}


# -- help -------------------------------------------------------------------------------------


def _walk(parser: argparse.ArgumentParser, path: str = "support-gateway"):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "(command)", helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_option_has_help_text() -> None:
    from gateway.cli import _parser

    missing = [f"{where}: {what}" for where, what, text in _walk(_parser()) if not text]
    assert missing == []
    names = {where for where, what, _ in _walk(_parser()) if what == "(command)"}
    assert {
        "support-gateway status",
        "support-gateway serve",
        "support-gateway rules check",
    } <= names


def test_help_refers_only_to_documents_in_the_repository() -> None:
    from gateway.cli import _parser

    repo = Path(__file__).parents[2]
    text = _parser().format_help()
    refs = set(re.findall(r"[\w./-]+\.md\b|config\.example\.toml", text))
    assert refs, text
    for ref in refs:
        assert (repo / ref).exists(), f"--help mentions {ref}, which is not in the repository"


# -- the staff reply's log line ----------------------------------------------------------------


async def test_relayed_staff_reply_is_logged_as_staff_reply(
    staff_env: Env,  # noqa: F811 (the imported fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = staff_env
    _, ref = await _customer(env, subject="Printer on fire")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.pipeline"):
        await _staff(env, ref, "Hello Pat,\nturn it off and on again.\nAlice\n")
    assert len(env.sent_to("pat@customer.example")) == 2  # the ack, then the relayed reply
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("processed ")]
    assert len(lines) == 1
    assert f"ticket={ref}" in lines[0]
    assert "kind=staff_reply" in lines[0], lines[0]
    [record] = [r for r in caplog.records if r.getMessage().startswith("processed ")]
    fields = record.__dict__.get("fields") or {}
    assert fields.get("kind") == "staff_reply"
    assert fields.get("event") == "processed"
