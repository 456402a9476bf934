"""A real Postfix in front of the gateway: both recipes of docs/postfix.md (docs/decisions.md D14).

Each test runs a PRIVATE Postfix instance (its own config_directory, queue_directory and log
under a temporary folder, smtpd on a free loopback port, `postfix -c DIR start`), never the
system's and never port 25, and stops it in the fixture's finalizer. Customer mail is sent to
Postfix from 127.0.0.2, so the client address Postfix sees differs from the address the
gateway sees (127.0.0.1, Postfix itself); the customer's SPF allows only 127.0.0.2.

* relay mode: Postfix owns the public port and relays the support domain to the daemon on a
  loopback port (relay_domains + transport_maps); `security.trusted_relays` = 127.0.0.1/32.
* pipe mode: Postfix runs `support-gateway ingest` through pipe(8) with --config and the
  multi-recipient form, as an unprivileged user (nobody: pipe(8) refuses root).

Proved for both: a message to two support addresses is accepted, durable once (one spool
entry with both recipients) and filed once (one ticket); the acknowledgement goes out (to a
capture relay); SPF was judged on 127.0.0.2. Skipped locally without Postfix, FAILS in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.worker import DeliveryWorker
from gateway.security.dns import StaticResolver
from gateway.settings import load_settings
from tests.support.gateway import all_tickets, inbound, make_mail, ticket_json
from tests.support.relay import CaptureRelay

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
RULES = REPO / "tests" / "support" / "rules"
CUSTOMER_IP = "127.0.0.2"  # the customer's server, as Postfix sees it

MASTER_CF = """\
{listen} inet  n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def _require_postfix() -> str:
    postfix = shutil.which("postfix") or (
        "/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None
    )
    reason = ""
    if postfix is None:
        reason = "Postfix is not installed (apt-get install postfix; .ci/run does it)"
    elif os.geteuid() != 0:
        reason = "a private Postfix instance needs root to start"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    assert postfix is not None
    return postfix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostfix:
    """One Postfix instance under `base`; see the module docstring."""

    def __init__(self, postfix: str, base: Path, main: dict[str, str], master_extra: str) -> None:
        self.postfix = postfix
        self.base = base
        self.etc = base / "postfix-etc"
        self.port = free_port()
        for d in ("postfix-etc", "postfix-queue", "postfix-data"):
            (base / d).mkdir()
        shutil.chown(base / "postfix-data", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(base / "postfix-queue"),
            "data_directory": str(base / "postfix-data"),
            "maillog_file": str(base / "postfix.log"),
            "maillog_file_prefixes": str(base),
            "myhostname": "mx.example.com",
            "mydomain": "example.com",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # No DNS in tests: the client is "unknown [127.0.0.2]" in the Received header.
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "smtputf8_enable": "no",
            **main,
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        master = MASTER_CF.format(listen=f"127.0.0.1:{self.port}") + master_extra
        (self.etc / "master.cf").write_text(master)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60
        )

    def start(self) -> None:
        r = self._run("start")
        assert r.returncode == 0, f"postfix start: {r.stdout}{r.stderr}{self.log()}"
        deadline = time.monotonic() + 30  # bounded wait for master to listen
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"postfix did not listen on {self.port}: {self.log()}")

    def stop(self) -> None:
        pid_file = self.base / "postfix-queue" / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        self._run("stop")
        deadline = time.monotonic() + 20
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        if pid is not None:  # did not stop in time: do not leave it running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), 9)

    def log(self) -> str:
        p = self.base / "postfix.log"
        return p.read_text(errors="replace") if p.exists() else "(no postfix log)"

    def send(self, raw: bytes, sender: str, recipients: list[str]) -> None:
        """Submit like the customer's server at 127.0.0.2 would."""
        with smtplib.SMTP(
            "127.0.0.1",
            self.port,
            local_hostname="mail.customer.example",
            source_address=(CUSTOMER_IP, 0),
            timeout=30,
        ) as s:
            refused = s.sendmail(sender, recipients, raw)
        assert not refused, refused


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every user can traverse (Postfix and the pipe user are not root)."""
    d = Path(tempfile.mkdtemp(prefix="gw-postfix-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def postfix(base: Path) -> Iterator[Callable[..., PrivatePostfix]]:
    binary = _require_postfix()
    started: list[PrivatePostfix] = []

    def make(main: dict[str, str], master_extra: str = "") -> PrivatePostfix:
        pf = PrivatePostfix(binary, base, main, master_extra)
        started.append(pf)
        pf.start()
        return pf

    try:
        yield make
    finally:
        for pf in started:  # never leave an instance running
            pf.stop()


def write_config(base: Path, relay_port: int) -> Path:
    gw = base / "gw"
    gw.mkdir()
    cfg = gw / "config.toml"
    cfg.write_text(
        f'rules_dir = "{RULES}"\n'
        '[smtp]\nlisten = "127.0.0.1:0"\nhostname = "gw.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{gw}/gw.db"\nspool_dir = "{gw}/spool"\n'
        f'[outbound]\nrelay = "127.0.0.1:{relay_port}"\nfrom_address = "support@example.com"\n'
        '[security]\nsecret_key = "postfix-test-secret-0123456789abcdefgh"\n'
        'trusted_relays = ["127.0.0.1/32"]\n'
    )
    return cfg


def customer_dns() -> StaticResolver:
    # The customer's domain allows only its own server; Postfix's 127.0.0.1 would fail.
    return StaticResolver({("customer.example", "TXT"): ["v=spf1 ip4:127.0.0.2 -all"]})


async def wait_spooled(gw: Gateway, pf: PrivatePostfix, n: int = 1) -> None:
    # Waiting for Postfix to hand the mail over (work, not a deadline): bounded poll.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gw.spool.counts().get("pending", 0) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing reached the gateway; postfix log:\n{pf.log()}")


async def file_and_acknowledge(gw: Gateway, relay: CaptureRelay, clock: FrozenClock) -> dict:  # type: ignore[type-arg]
    """Process what came in, deliver the outbox; return the one ticket's JSON."""
    pending = [e for e in [gw.spool.get(i) for i in range(1, 10)] if e is not None]
    assert [sorted(e.envelope.rcpt_tos) for e in pending] == [
        ["billing@example.com", "support@example.com"]
    ]  # durable once, with both recipients
    await gw.pipeline.run_once()
    await DeliveryWorker(gw.engine, gw.settings, clock, signer=gw.signer).run_once()
    [ticket] = all_tickets(gw)  # filed once
    acks = [c for c in await relay.wait_for(1) if c.rcpt_tos == ["pat@customer.example"]]
    assert len(acks) == 1, acks
    return ticket_json(gw, ticket.ref)


def two_recipient_mail() -> bytes:
    return make_mail(
        to="support@example.com, billing@example.com", subject="Printer on fire"
    ).as_bytes()


async def test_relay_mode(
    base: Path, postfix: Callable[..., PrivatePostfix], clock: FrozenClock
) -> None:
    async with CaptureRelay() as relay:
        settings = load_settings(str(write_config(base, relay.port)))
        gw = Gateway(settings, clock=clock, resolver=customer_dns())
        await gw.start(workers=False)
        try:
            pf = await asyncio.to_thread(
                postfix,
                {
                    "relay_domains": "example.com",
                    "transport_maps": f"inline:{{ example.com=smtp:[127.0.0.1]:{gw.port} }}",
                },
            )
            await asyncio.to_thread(
                pf.send,
                two_recipient_mail(),
                "pat@customer.example",
                ["support@example.com", "billing@example.com"],
            )
            await wait_spooled(gw, pf)
            t = await file_and_acknowledge(gw, relay, clock)
        finally:
            await gw.stop()
    [msg] = inbound(t)
    # Judged on the client Postfix saw (trusted_relays), not on Postfix's own 127.0.0.1.
    assert msg["auth"]["spf"] == "pass"
    assert msg["auth"]["likely_forged"] is False


def _python_for(user: str) -> str:
    """An interpreter the pipe user can run (pyenv under /root is not readable by nobody).

    Pipe-mode ingest needs only the standard library (gateway/pipe.py), so the
    distribution's python3 will do when the test's own interpreter is out of reach."""
    for cand in (sys.executable, "/usr/bin/python3"):
        try:
            r = subprocess.run(
                [cand, "-c", "import tomllib, sqlite3"], user=user, capture_output=True, timeout=60
            )
        except OSError:
            continue
        if r.returncode == 0:
            return cand
    pytest.fail(f"no Python 3.11 that user {user} can run")


async def test_pipe_mode(
    base: Path, postfix: Callable[..., PrivatePostfix], clock: FrozenClock
) -> None:
    # pipe(8) runs as an unprivileged user; the code lives where that user can read it.
    code = base / "code"
    shutil.copytree(
        REPO / "gateway", code / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    python = _python_for("nobody")
    async with CaptureRelay() as relay:
        cfg = write_config(base, relay.port)
        gw = Gateway(load_settings(str(cfg)), clock=clock, resolver=customer_dns())
        await gw.start(workers=False)
        try:
            for p in [gw.settings.spool_path, *gw.settings.spool_path.iterdir()]:
                shutil.chown(p, "nobody", "nogroup")  # the daemon's and the pipe's user
            # docs/postfix.md pipe recipe: --config, --sender=${sender}, --recipient=${recipient}
            # (pipe(8) repeats that argument per recipient), null_sender= for <>.
            pf = await asyncio.to_thread(
                postfix,
                {
                    "relay_domains": "example.com",
                    "transport_maps": "inline:{ example.com=support: }",
                },
                "support   unix  - n n - - pipe\n"
                "  flags=Rq user=nobody null_sender=\n"
                f"  argv=/usr/bin/env PYTHONPATH={code} {python} -m gateway --config {cfg}"
                " ingest --sender=${sender} --recipient=${recipient}\n",
            )
            await asyncio.to_thread(
                pf.send,
                two_recipient_mail(),
                "pat@customer.example",
                ["support@example.com", "billing@example.com"],
            )
            await wait_spooled(gw, pf)
            t = await file_and_acknowledge(gw, relay, clock)
        finally:
            await gw.stop()
    [msg] = inbound(t)
    # Pipe mode: the local MTA's Received header names the client it saw.
    assert msg["auth"]["spf"] == "pass"
    assert msg["auth"]["likely_forged"] is False
