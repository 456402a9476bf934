"""Three `serve` processes on one PostgreSQL (docs/decisions.md D13), as an admin runs several MX
hosts.

Distinct ports and spool folders, one secret. Mail is split across the nodes, including the
same Message-ID sent to two nodes at once (an MX retry to the other host) and the first
mails of new customers arriving at two nodes at once; one node is SIGKILLed mid-traffic and
not restarted. What must hold (the acceptance of docs/decisions.md D13):

- every message that got `250` (from any node, the killed one included) becomes exactly one
  ticket or message within 60 s without the killed node;
- acknowledgements at the relay = tickets (a duplicate only for mail in flight at the kill),
  and one sender's seven simultaneous new tickets get exactly the daily cap of five;
- no unique-violation ERROR in any node's log;
- round-robin owners spread within +-1;
- three simultaneous first starts on an empty database all come up;
- a node with another secret refuses to start (exit 78) and says what to do.

The figures are printed (`pytest -n 0 -s tests/integration/test_multinode.py`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import psycopg
import pytest

from tests.conftest import _pg_database
from tests.support.gateway import make_mail
from tests.support.relay import CaptureRelay

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = "multi-node-shared-secret-0123456789"
CAPPER = "busy@customer.example"

RULES = """
[people.alice]
name = "Alice Martin"
email = "alice@staff.example"
calendar = "always"

[people.bob]
name = "Bob Stone"
email = "bob@staff.example"
calendar = "always"

[people.carol]
name = "Carol Diaz"
email = "carol@staff.example"
calendar = "always"

[calendars.always]
timezone = "UTC"
hours = "24x7"

[sla.standard]
calendar = "always"
first_response = "4h"
next_response = "8h"
resolution = "5d"

[defaults]
owner = "alice"
queue = "support"
sla = "standard"

[[route]]
name = "everyone"
match = { to = ["support@example.com"] }
team = ["alice", "bob", "carol"]
assign = "round-robin"
"""


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, url: str, relay_port: int, secret: str = SECRET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder.parent / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "rules.toml").write_text(RULES)
    key = folder / "secret_key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    cfg = folder / "config.toml"
    cfg.write_text(
        f'rules_dir = "{rules}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{free_port()}"\nhostname = "{folder.name}.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "{url}"\nspool_dir = "{folder}/spool"\n'
        # ack_window 0s: every ticket's acknowledgement at once, so the daily cap is counted
        # across nodes one mail at a time (bundling is tested in test_conversation.py).
        f'[outbound]\nrelay = "127.0.0.1:{relay_port}"\nfrom_address = "support@example.com"\n'
        'ack_window = "0s"\n'
        f'[security]\nsecret_key_file = "{key}"\n'
        "verify_senders = false\n"  # no DNS lookups leave this machine in tests
        f'[node]\nid = "{folder.name}"\n'
    )
    return cfg


class Node:
    """`support-gateway serve` in a child process; its log in a file."""

    def __init__(self, cfg: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.name = cfg.parent.name
        self.log_path = cfg.parent / "daemon.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port = int(cfg.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    async def started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded wait for start-up (work, not a deadline)
            if "listening on" in self.output():
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"node {self.name} did not start: {self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def db(url: str) -> psycopg.Connection:  # type: ignore[type-arg]
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def inbound_counts(url: str) -> Counter[str]:
    with db(url) as c:
        rows = c.execute("SELECT message_id FROM message WHERE direction='in'").fetchall()
    return Counter(r[0] for r in rows)


async def test_three_nodes_one_database_one_killed(tmp_path: Path, pg_url: str) -> None:
    async with CaptureRelay() as relay:
        cfgs = [write_config(tmp_path / f"node{i}", pg_url, relay.port) for i in range(3)]
        # Three simultaneous first starts on an empty database (migrations, fingerprint).
        t0 = time.monotonic()
        nodes = [Node(c) for c in cfgs]
        try:
            await asyncio.gather(*(n.started() for n in nodes))
            startup = time.monotonic() - t0
            await _traffic_and_kill(tmp_path, pg_url, relay, nodes, startup)
        finally:
            for n in nodes:
                n.stop()


async def _send(port: int, mail: bytes, sender: str) -> bool:
    """One SMTP transaction; True when the gateway answered 250 to DATA."""
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20) as smtp:
            errors, _ = await smtp.sendmail(sender, ["support@example.com"], mail)
            return not errors
    except (aiosmtplib.SMTPException, OSError):
        return False


async def _traffic_and_kill(  # noqa: C901  (one scenario read top to bottom: traffic, kill, checks)
    tmp_path: Path, url: str, relay: CaptureRelay, nodes: list[Node], startup: float
) -> None:
    victim = nodes[2]
    acked: dict[str, int] = {}  # Message-ID -> how many 250s it got
    acked_by: Counter[str] = Counter()
    killed_at: list[float] = []
    left_behind: list[int] = []

    async def deliver(mail: bytes, mid: str, sender: str, first: int) -> None:
        # Like a sending MTA with several MX hosts: try one, on failure the next.
        for k in range(3):
            node = nodes[(first + k) % 3]
            if node is victim and killed_at:
                continue
            if await _send(node.port, mail, sender):
                acked[mid] = acked.get(mid, 0) + 1
                acked_by[node.name] += 1
                return
        raise AssertionError(f"no node accepted {mid}")

    def mail(sender: str, subject: str, mid: str, via: str = "") -> bytes:
        m = make_mail(sender=sender, subject=subject, message_id=mid)
        raw = m.as_bytes()
        # The copy that went through another MX host carries another Received line: other
        # bytes, same Message-ID (the spool's byte hash does not catch it; the database must).
        return (f"Received: from relay-{via} by mx\n".encode() + raw) if via else raw

    jobs = []
    for i in range(60):  # ordinary new tickets, one customer each, split across the nodes
        mid = f"<plain{i}@customer.example>"
        jobs.append((mail(f"c{i}@customer.example", f"Question {i}", mid), mid, i % 3))
    pairs = []
    # One sender, seven new requests at once across the nodes: the daily acknowledgement cap
    # (outbound.daily_ack_cap = 5) must hold exactly across nodes.
    capper = [
        (
            mail(CAPPER, f"Request {i}", f"<cap{i}@customer.example>"),
            f"<cap{i}@customer.example>",
            i % 3,
        )
        for i in range(7)
    ]
    for i in range(8):  # the same Message-ID to two nodes at once
        mid = f"<dup{i}@customer.example>"
        s = f"d{i}@customer.example"
        pairs.append(
            [
                (mail(s, f"Twice {i}", mid, "a"), mid, i % 3),
                (mail(s, f"Twice {i}", mid, "b"), mid, (i + 1) % 3),
            ]
        )
    for i in range(8):  # a new customer's first two mails, at two nodes at once
        s = f"new{i}@customer.example"
        one_, two = f"<first{i}@customer.example>", f"<second{i}@customer.example>"
        pairs.append(
            [
                (mail(s, f"First {i}", one_), one_, i % 3),
                (mail(s, f"Second {i}", two), two, (i + 2) % 3),
            ]
        )

    sem = asyncio.Semaphore(12)

    async def one(job: tuple[bytes, str, int]) -> None:
        raw, mid, first = job
        async with sem:
            await deliver(raw, mid, _from(raw), first)

    async def pair(p: list[tuple[bytes, str, int]]) -> None:
        async with sem:
            await asyncio.gather(*(deliver(r, m, _from(r), f) for r, m, f in p))

    def victim_holds() -> tuple[int, int, int]:
        with db(url) as c:  # the victim's claims, and the mail it accepted
            row = c.execute(
                "SELECT (SELECT count(*) FROM spool_entry WHERE claimed_by = %s AND"
                " state = 'claimed'), (SELECT count(*) FROM spool_entry WHERE accepted_by = %s),"
                " (SELECT count(*) FROM outbox WHERE claimed_by = %s AND state = 'sending')",
                (victim.name, victim.name, victim.name),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    async def killer() -> None:
        # Mid-traffic, and at the worst moment: while the victim holds claims (spool entries
        # it is processing, or outbox rows it is sending), so they must move to the others.
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if acked_by[victim.name] >= 3:
                held = victim_holds()
                if held[0] or held[2]:
                    break
            await asyncio.sleep(0.01)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        killed_at.append(time.monotonic())
        left_behind.extend(victim_holds())

    async def after_kill() -> None:
        # The traffic goes on after the kill (mail for the victim goes to the next MX).
        while not killed_at:
            await asyncio.sleep(0.01)
        await asyncio.gather(*(one(j) for j in jobs[30:]))

    async def burst(group: list[tuple[bytes, str, int]]) -> None:
        await asyncio.gather(*(deliver(r, m, _from(r), f) for r, m, f in group))

    work = [one(j) for j in jobs[:30]] + [pair(p) for p in pairs] + [burst(capper)]
    await asyncio.gather(killer(), after_kill(), *work)
    assert killed_at, "the victim was never killed"
    traffic_done = time.monotonic()

    # Every message that got 250 becomes exactly one message, within 60 s of the kill.
    expected = set(acked)
    deadline = killed_at[0] + 60
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        counts = inbound_counts(url)
        if expected <= set(counts):
            break
        await asyncio.sleep(0.25)
    processed_after_kill = time.monotonic() - killed_at[0]
    missing = sorted(expected - set(counts))
    assert not missing, f"{len(missing)} accepted messages not processed in 60 s: {missing[:5]}"
    assert all(counts[m] == 1 for m in expected), [m for m in expected if counts[m] != 1]
    with db(url) as c:
        tickets = c.execute("SELECT id, ref, owner, requester FROM ticket").fetchall()
        left = c.execute("SELECT count(*) FROM spool_entry").fetchone()
        customers = c.execute(
            "SELECT count(*) FROM customer_address WHERE address LIKE 'new%'"
        ).fetchone()
    assert left is not None
    assert left[0] == 0
    assert len(tickets) == len(expected)  # every distinct message opened one ticket
    assert customers is not None
    assert customers[0] == 8

    # Acknowledgements at the relay = tickets; a duplicate only for mail in flight at the kill.
    def acks() -> Counter[str]:
        out: Counter[str] = Counter()
        for m in relay.messages:
            if m.rcpt_tos and m.rcpt_tos[0].endswith("@customer.example"):
                subject = str(m.message()["Subject"])
                out[subject.split("]", maxsplit=1)[0].strip("[")] += 1
        return out

    while time.monotonic() < killed_at[0] + 90 and len(acks()) < len(tickets) - 2:
        await asyncio.sleep(0.25)
    acks_after_kill = time.monotonic() - killed_at[0]
    await asyncio.sleep(1.0)  # a duplicate sent late would be here by now
    got = acks()
    capped = {t[1] for t in tickets if t[3] == CAPPER}
    refs = {t[1] for t in tickets} - capped
    assert len(capped) == 7, sorted(set(got) & capped)
    assert len(set(got) & capped) == 5, sorted(set(got) & capped)
    assert set(got) - capped == refs, (len(got), len(refs))
    duplicates = sum(v - 1 for v in got.values())
    assert duplicates <= 1, got  # the victim sends one message at a time: at most one

    # Round-robin across the nodes: owners within +-1.
    owners = Counter(t[2] for t in tickets)
    assert set(owners) == {"alice", "bob", "carol"}, owners
    assert max(owners.values()) - min(owners.values()) <= 1, owners

    # No node logged a unique violation (check-then-insert races are upserts or locks now).
    logs = "".join(n.output() for n in nodes)
    violations = sum(
        1
        for line in logs.splitlines()
        if "UniqueViolation" in line or "duplicate key value" in line or "IntegrityError" in line
    )
    assert violations == 0, [
        line for line in logs.splitlines() if "UniqueViolation" in line or "duplicate key" in line
    ][:5]

    # A node with another secret refuses to start, and says what to do.
    other = write_config(
        tmp_path / "node-other", url, relay.port, secret="another-secret-0123456789abcdefghij"
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(other), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )
    assert r.returncode == 78, r.stderr[-2000:]
    assert "secret key differs" in r.stderr
    assert "secret_key_file" in r.stderr

    print(
        f"\nthree nodes, one PostgreSQL: simultaneous first starts up in {startup:.1f}s;"
        f" {sum(acked.values())} SMTP 250s ({dict(acked_by)}), {len(expected)} distinct"
        f" messages, {len(tickets)} tickets; node2 SIGKILLed after {acked_by[victim.name]}"
        f" accepted, leaving {left_behind[1]} accepted messages not yet processed,"
        f" {left_behind[0]} spool claims, {left_behind[2]} outbox rows in sending;"
        f" all processed {processed_after_kill:.1f}s after the kill (traffic ended"
        f" {traffic_done - killed_at[0]:.1f}s after it); acknowledgements {sum(got.values())}"
        f" for {len(refs) + len(capped)} tickets ({duplicates} duplicate; one sender's 7"
        f" simultaneous tickets got {len(set(got) & capped)} under a cap of 5), the last"
        f" {acks_after_kill:.1f}s after the kill; owners {dict(owners)};"
        f" unique-violation lines in logs {violations};"
        f" other secret: exit {r.returncode}"
    )


def _from(raw: bytes) -> str:
    for line in raw.splitlines():
        if line.lower().startswith(b"from:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""
