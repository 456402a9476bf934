"""The daemon as an admin runs it: `support-gateway serve` in its own process, killed with
SIGKILL mid-traffic, stopped with SIGTERM, reloaded with SIGHUP; pipe mode; config errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import cli as in_process
from tests.support.gateway import make_mail

pytestmark = pytest.mark.slow  # a real `serve` per test

RULES = Path(__file__).parents[1] / "support" / "rules"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, rules: Path = RULES) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'rules_dir = "{rules}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/gw.db"\nspool_dir = "{tmp_path}/spool"\n'
        '[security]\nsecret_key = "crash-test-secret-0123456789abcdef"\n'
        "verify_senders = false\n"  # no DNS lookups leave this machine in tests
    )
    return cfg


class Daemon:
    """`support-gateway serve` in a child process, its log in a file (a pipe nobody reads
    would fill up and block the daemon)."""

    def __init__(self, cfg: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.log_path = cfg.parent / f"daemon-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        # Bounded wait for start-up (work, not a deadline), as long as test_multinode's: with
        # four test workers on two cores, several children import the gateway at once.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b"listening on" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()  # reaped here, not later as a warning inside another test
        self.close()
        raise AssertionError(f"daemon did not start: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # fail this test, and leave no child to a later one's warnings
            self.proc.wait()
            raise
        finally:
            self.close()
        return code

    def close(self) -> None:
        if not self.log.closed:
            self.log.close()


def start_daemon(cfg: Path) -> Daemon:
    return Daemon(cfg)


def stored_message_ids(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "gw.db") as c:
        return [r[0] for r in c.execute("SELECT message_id FROM message WHERE direction='in'")]


def spool_left(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "spool" / "spool.sqlite3") as c:
        return int(
            c.execute("SELECT count(*) FROM spool WHERE state != 'quarantined'").fetchone()[0]
        )


def wait_until_processed(tmp_path: Path, timeout: float = 60) -> None:
    # Waiting for the worker to drain the spool (work, not a deadline): bounded poll.
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if spool_left(tmp_path) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"spool not drained: {spool_left(tmp_path)} left")


async def test_sigkill_mid_traffic_loses_nothing_that_got_250(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port)
    proc = start_daemon(cfg)
    acked: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            mid = f"<crash-{n}-{i}@customer.example>"
            i += 1
            m = make_mail(sender=f"c{n}@customer.example", message_id=mid, subject=f"crash {n} {i}")
            try:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
                    errors, _ = await smtp.sendmail(
                        m["From"], ["support@example.com"], m.as_bytes()
                    )
                    if not errors:
                        acked.append(mid)  # the server said 250: it must never be lost
            except (aiosmtplib.SMTPException, OSError):
                return  # the daemon died under us: this message was never acknowledged

    clients = [asyncio.create_task(client(n)) for n in range(8)]
    end = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < end:
        await asyncio.sleep(0.01)
    assert len(acked) >= 150, f"only {len(acked)} acknowledged: {proc.output()}"
    proc.signal(signal.SIGKILL)  # no goodbye: a crash at an arbitrary moment
    proc.wait()
    stop.set()
    await asyncio.gather(*clients)

    proc = start_daemon(cfg)  # recovery: claimed entries go back in line
    try:
        wait_until_processed(tmp_path)
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    stored = stored_message_ids(tmp_path)
    missing = set(acked) - set(stored)
    dupes = len(stored) - len(set(stored))
    print(
        f"crash test: {len(acked)} messages got 250 before SIGKILL; checked all: "
        f"{len(missing)} missing, {dupes} duplicates"
    )
    assert not missing
    assert dupes == 0


async def test_sigterm_stops_gracefully_and_sighup_reloads_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.toml").write_text((RULES / "rules.toml").read_text())
    port = free_port()
    proc = start_daemon(write_config(tmp_path, port, rules))
    try:
        # A broken edit, then SIGHUP: the old rules stay in force, the daemon keeps serving.
        (rules / "rules.toml").write_text("[defaults]\nowner = 'ghost'\n")
        proc.signal(signal.SIGHUP)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            m = make_mail()
            errors, _ = await smtp.sendmail(m["From"], ["support@example.com"], m.as_bytes())
            assert not errors
        wait_until_processed(tmp_path)
        with sqlite3.connect(tmp_path / "gw.db") as c:
            assert c.execute("SELECT owner FROM ticket").fetchall() == [("alice",)]
    finally:
        proc.signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        out = proc.output()
    assert code == 0
    assert "rules reload FAILED" in out
    assert "unknown person 'ghost'" in out
    assert "stopping" in out


def run_cli(
    cfg: Path, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return in_process.run(["--config", str(cfg), *args], stdin=stdin, text=False)


def test_pipe_mode_ingest_is_durable_and_processed_later(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    raw = make_mail(subject="via postfix pipe").as_bytes()
    r = run_cli(
        cfg,
        "ingest",
        "--sender",
        "pat@customer.example",
        "--recipient",
        "support@example.com",
        stdin=raw,
    )
    assert r.returncode == 0, r.stderr
    assert b"queued as 1" in r.stdout
    assert spool_left(tmp_path) == 1
    r = run_cli(cfg, "process")
    assert r.returncode == 0, r.stderr
    r = run_cli(cfg, "tickets", "list", "--json")
    [t] = json.loads(r.stdout)
    assert t["subject"] == "via postfix pipe"
    assert t["requester"] == "pat@customer.example"
    assert t["owner"]["name"] == "Alice Martin"


def test_pipe_mode_temporary_failure_exits_75(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    (tmp_path / "spool").write_text("not a directory")  # the spool cannot be created
    r = run_cli(cfg, "ingest", stdin=make_mail().as_bytes())
    assert r.returncode == 75
    assert b"temporary failure" in r.stderr


def test_invalid_config_names_key_value_and_expectation(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[smtp]\nlisten = "localhost:99999"\nmax_message_size = "lots"\n')
    r = run_cli(cfg, "serve")
    assert r.returncode == 78
    err = r.stderr.decode()
    assert "smtp.listen = 'localhost:99999': expected a port number from 0 to 65535" in err
    assert "smtp.max_message_size = 'lots': expected a size" in err


@pytest.mark.parametrize("value", ["0.0.0.0:2626", "[::1]:2525"])
def test_environment_overrides_config(tmp_path: Path, value: str) -> None:
    from gateway.settings import load_settings

    cfg = write_config(tmp_path, 2525)
    os.environ["GATEWAY_SMTP__LISTEN"] = value
    try:
        s = load_settings(str(cfg))
    finally:
        del os.environ["GATEWAY_SMTP__LISTEN"]
    assert s.smtp.listen == value
    assert s.smtp.hostname == "mx.example.com"


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


async def test_pipeline_process_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    port = free_port()
    daemon = start_daemon(write_config(tmp_path, port))
    try:
        # The pipeline runs in its own process (pipeline.process = true by default).
        end = time.monotonic() + 30
        kids: list[int] = []
        while time.monotonic() < end and not kids:
            kids = [
                k
                for k in children_of(daemon.proc.pid)
                if "pipeline" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")
                or "multiprocessing" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")
            ]
            time.sleep(0.05)
        assert kids, f"no pipeline process under {daemon.proc.pid}"
        for k in kids:
            os.kill(k, signal.SIGKILL)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            m = make_mail(subject="after the pipeline died")
            errors, _ = await smtp.sendmail(m["From"], ["support@example.com"], m.as_bytes())
            assert not errors  # ingest never depended on the pipeline
        wait_until_processed(tmp_path)
        assert stored_message_ids(tmp_path) == [m["Message-ID"]]
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert "pipeline process exited" in daemon.output()
