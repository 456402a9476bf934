"""Helpers for the delivery fault tests and bench/delivery_faults.py: outbox rows queued
directly, Message-IDs counted at the capture relay, and `support-gateway serve` as a child
process that can be SIGKILLed (as tests/integration/test_daemon_process.py does)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from email.utils import make_msgid
from pathlib import Path

from sqlalchemy.engine import Engine

from gateway.outbound.worker import enqueue
from gateway.store.db import session_scope
from tests.support.relay import CaptureRelay

SUPPORT = Path(__file__).parent


def queue_rows(engine: Engine, n: int, now: datetime) -> list[str]:
    """`n` ticketless acknowledgements in the outbox; returns their Message-IDs."""
    mids = []
    with session_scope(engine) as s:
        for i in range(n):
            mid = make_msgid(idstring=f"fault{i}", domain="example.com")
            raw = (
                "From: Example Support <support@example.com>\r\n"
                f"To: c{i}@customer.example\r\nSubject: ack {i}\r\n"
                f"Message-ID: {mid}\r\nAuto-Submitted: auto-replied\r\n\r\nThanks.\r\n"
            ).encode()
            enqueue(
                s,
                ticket_id=None,
                kind="ack",
                raw=raw,
                message_id=mid,
                rcpt_tos=[f"c{i}@customer.example"],
                now=now,
            )
            mids.append(mid)
    return mids


def message_ids_at(relay: CaptureRelay) -> Counter[str]:
    return Counter(str(m.message()["Message-ID"]) for m in relay.messages)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_serve_config(tmp_path: Path, port: int, relay_port: int) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'rules_dir = "{SUPPORT / "rules"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/gw.db"\nspool_dir = "{tmp_path}/spool"\n'
        f'[outbound]\nrelay = "127.0.0.1:{relay_port}"\n'
        '[security]\nsecret_key = "crash-test-secret-0123456789abcdefgh"\n'
        "verify_senders = false\n"
    )
    return cfg


class ServeProcess:
    """`support-gateway serve` in a child process, its log in a file."""

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

    async def started(self) -> None:
        deadline = time.monotonic() + 60  # as test_multinode's: workers start children at once
        while time.monotonic() < deadline:  # bounded wait for start-up
            if b"listening on" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        self.kill()
        raise AssertionError(f"daemon did not start: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


def outbox_states(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path) as c:
        return dict(c.execute("SELECT message_id, state FROM outbox").fetchall())
