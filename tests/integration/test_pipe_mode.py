"""Pipe mode as Postfix runs it (docs/decisions.md D14.2): several recipients, FILE vs address,
usage mistakes keep the mail (75, never a bounce), and `process` delivers the outbox."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from tests.integration.test_daemon_process import free_port, run_cli, spool_left, write_config
from tests.support.gateway import make_mail
from tests.support.relay import CaptureRelay


def spooled_recipients(tmp_path: Path) -> list[list[str]]:
    with sqlite3.connect(tmp_path / "spool" / "spool.sqlite3") as c:
        return [json.loads(r[0])["rcpt_tos"] for r in c.execute("SELECT envelope FROM spool")]


@pytest.mark.parametrize(
    "argv",
    [
        # pipe(8) with "--recipient ${recipient}": one flag, then every address
        ["--recipient", "support@example.com", "billing@example.com"],
        # pipe(8) with "--recipient=${recipient}": the argument is repeated per recipient
        ["--recipient=support@example.com", "--recipient=billing@example.com"],
        # "-- ${recipient}": plain positional addresses
        ["--", "support@example.com", "billing@example.com"],
    ],
)
def test_several_recipients_are_one_durable_message(tmp_path: Path, argv: list[str]) -> None:
    cfg = write_config(tmp_path, free_port())
    r = run_cli(cfg, "ingest", "--sender=pat@customer.example", *argv, stdin=make_mail().as_bytes())
    assert r.returncode == 0, r.stderr
    assert spooled_recipients(tmp_path) == [["support@example.com", "billing@example.com"]]


def test_a_file_path_is_still_the_message_and_an_address_never_is(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail(subject="from a file", to="sales@example.com").as_bytes())
    assert run_cli(cfg, "ingest", str(eml)).returncode == 0  # docs/interface.md: ingest [FILE]
    r = run_cli(cfg, "ingest", "--file", str(eml), "support@example.com")
    assert r.returncode == 0, r.stderr
    assert spooled_recipients(tmp_path) == [["sales@example.com"], ["support@example.com"]]


def test_null_sender_spelled_mailer_daemon_is_the_null_sender(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    r = run_cli(
        cfg,
        "ingest",
        "--sender=MAILER-DAEMON",
        "--recipient=support@example.com",
        stdin=make_mail().as_bytes(),
    )
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(tmp_path / "spool" / "spool.sqlite3") as c:
        [(env,)] = c.execute("SELECT envelope FROM spool").fetchall()
    assert json.loads(env)["mail_from"] == ""


@pytest.mark.parametrize("argv", [["--bogus"], ["one", "two"], ["--recipient"]])
def test_a_usage_mistake_keeps_the_mail_queued_at_the_mta(tmp_path: Path, argv: list[str]) -> None:
    # argparse's exit 2 would make pipe(8) bounce the customer's mail; 75 defers it.
    cfg = write_config(tmp_path, free_port())
    r = run_cli(cfg, "ingest", *argv, stdin=make_mail().as_bytes())
    assert r.returncode == 75, r.stderr
    assert b"Traceback" not in r.stderr


def test_ingest_works_from_any_working_directory_with_config(tmp_path: Path) -> None:
    # pipe(8) runs in Postfix's queue directory; everything comes from --config.
    import os
    import subprocess
    import sys

    cfg = write_config(tmp_path, free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(cfg),
            "ingest",
            "--recipient=support@example.com",
        ],
        input=make_mail().as_bytes(),
        capture_output=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert spool_left(tmp_path) == 1


async def test_process_delivers_the_acknowledgement(tmp_path: Path) -> None:
    async with CaptureRelay() as relay:
        cfg = write_config(tmp_path, free_port())
        cfg.write_text(cfg.read_text() + f'[outbound]\nrelay = "127.0.0.1:{relay.port}"\n')
        r = await asyncio.to_thread(
            run_cli,
            cfg,
            "ingest",
            "--sender=pat@customer.example",
            "--recipient=support@example.com",
            stdin=make_mail(subject="ack me").as_bytes(),
        )
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(run_cli, cfg, "process")
        assert r.returncode == 0, r.stderr
        assert b"delivered" in r.stdout
        got = await relay.wait_for(1)
        acks = [c for c in got if "pat@customer.example" in c.rcpt_tos]
        assert acks
        assert "ack me" in str(acks[0].message()["Subject"])


def test_one_invocation_per_recipient_still_files_once(tmp_path: Path) -> None:
    # support_destination_recipient_limit = 1: pipe(8) runs ingest once per recipient.
    cfg = write_config(tmp_path, free_port())
    raw = make_mail(to="support@example.com, billing@example.com").as_bytes()
    for rcpt in ("support@example.com", "billing@example.com"):
        r = run_cli(
            cfg, "ingest", "--sender=pat@customer.example", f"--recipient={rcpt}", stdin=raw
        )
        assert r.returncode == 0, r.stderr
    assert run_cli(cfg, "process", "--no-deliver").returncode == 0
    assert len(json.loads(run_cli(cfg, "tickets", "list", "--json").stdout)) == 1
