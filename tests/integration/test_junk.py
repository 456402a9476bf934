"""Junk never costs a human (docs/decisions.md D18), end to end: real daemon over SMTP, capture
relay, CLI.

- a trusted front host's spam verdict -> the junk folder: no ticket, no mail out, listed by
  ``junk list``; the same headers from a client that is not a trusted relay -> a normal
  ticket, the verdict recorded as untrusted;
- ``junk release`` -> processed as if it had just arrived: a ticket and its acknowledgement;
- ``#junk sender`` -> the ticket's clocks stop, its message goes to junk, and the sender's
  next mail goes to junk too without a word to the owner or the sender; a blocked customer's
  released mail goes through as normal, and ``customers unblock`` undoes the block.

The gateway runs in-process with a frozen clock (``workers=False``: the test drives the
pipeline and the delivery worker); the CLI runs as a subprocess on the same files. Linux
loopback accepts any 127/8 source address, so one gateway with ``trusted_relays =
["127.0.0.1/32"]`` sees 127.0.0.1 as the front host and 127.0.0.2 as a stranger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.worker import DeliveryWorker
from gateway.store.models import Outbox, Ticket
from tests.conftest import RULES, make_settings
from tests.support.cli import run as run_cli
from tests.support.gateway import all_tickets, make_mail, running_gateway, ticket_json
from tests.support.relay import CaptureRelay

SPAM_HEADERS = {
    "X-Spam-Flag": "YES",
    "X-Spam-Status": "Yes, score=9.1 required=5.0 tests=BAYES_99,URIBL_BLACK",
}
SPAM_ROUTE = """
# docs/decisions.md D18: a trusted front filter's spam verdict goes to the junk folder.
[[route]]
name = "spam"
match = { spam = true }
disposition = "junk"
"""


@dataclass
class Env:
    gw: Gateway
    relay: CaptureRelay
    clock: FrozenClock
    worker: DeliveryWorker
    cfg: Path

    async def send(self, mail: EmailMessage, *, source: str = "127.0.0.1", to: str = "") -> None:
        """SMTP from ``source`` (127.0.0.1: the trusted front host; 127.0.0.2: a stranger)."""
        assert self.gw.port is not None
        sender = str(mail["From"]).split("<")[-1].strip(">")
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=self.gw.port, timeout=30, source_address=(source, 0)
        ) as smtp:
            errors, _ = await smtp.sendmail(sender, [to or str(mail["To"])], mail.as_bytes())
            assert not errors

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        await self.worker.run_once()

    def cli(self, *args: str, process: bool = False) -> subprocess.CompletedProcess[str]:
        """The real command line on the same files: in this process (fast), or as its own
        process with ``process=True``."""
        argv = ["--config", str(self.cfg), *args]
        if process:
            env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            return subprocess.run(
                [sys.executable, "-m", "gateway", *argv],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
        return run_cli(argv)

    def junk_list(self, *more: str) -> list[dict]:  # type: ignore[type-arg]
        r = self.cli("junk", "list", "--json", *more)
        assert r.returncode == 0, r.stderr
        items: list[dict] = json.loads(r.stdout)  # type: ignore[type-arg]
        return items

    def outbox(self) -> list[Outbox]:
        with Session(self.gw.engine) as s:
            return list(s.exec(select(Outbox).order_by(Outbox.id)).all())  # type: ignore[arg-type]

    def catch_up_with_the_cli(self) -> None:
        """The CLI runs on the wall clock; what it queued is due by the wall clock."""
        self.clock.set(max(self.clock.now(), datetime.now(UTC)) + timedelta(minutes=1))


def _write_config(tmp_path: Path, settings_rules: Path, relay_port: int) -> Path:
    q = json.dumps
    cfg = tmp_path / "cli.toml"
    cfg.write_text(
        f"rules_dir = {q(str(settings_rules))}\n"
        '[smtp]\nlisten = "127.0.0.1:0"\nhostname = "mx.example.com"\n'
        'domains = ["example.com", "localhost"]\nmin_free_disk = 0\n'
        f"[storage]\ndatabase_url = {q(f'sqlite:///{tmp_path}/gateway.db')}\n"
        f"spool_dir = {q(str(tmp_path / 'spool'))}\n"
        f'[outbound]\nrelay = "127.0.0.1:{relay_port}"\nfrom_address = "support@example.com"\n'
        '[security]\nsecret_key = "test-secret-key-0123456789abcdef"\n'
        'trusted_relays = ["127.0.0.1/32"]\nverify_senders = false\n'
        'staff_token_only_domains = ["example.com"]\n'
    )
    return cfg


@contextlib.asynccontextmanager
async def _environment(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay, **extra: object
) -> AsyncIterator[Env]:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    (rules / "00-spam.toml").write_text(SPAM_ROUTE)  # files are read in name order
    settings = make_settings(
        tmp_path,
        rules_dir=str(rules),
        outbound={"relay": f"127.0.0.1:{relay.port}"},
        security={
            "trusted_relays": ["127.0.0.1/32"],
            # Unsigned staff mail from example.com counts on its token (docs/decisions.md D10
            # opt-in).
            "staff_token_only_domains": ["example.com"],
        },
        **extra,
    )
    cfg = _write_config(tmp_path, rules, relay.port)
    async with running_gateway(settings, clock) as gw:
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, relay, clock, worker, cfg)


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    async with _environment(tmp_path, clock, relay) as e:
        yield e


def _events(env: Env, ref: str, type_: str) -> list[str]:
    return [e["detail"] for e in ticket_json(env.gw, ref)["events"] if e["type"] == type_]


async def test_trusted_spam_verdict_goes_to_junk_untrusted_opens_a_ticket(env: Env) -> None:
    spam = make_mail(sender="winner@lottery.example", subject="You have WON", headers=SPAM_HEADERS)
    await env.send(spam, source="127.0.0.1")
    await env.process()

    # The front host said spam: no ticket, no acknowledgement, no notification, no mail out.
    assert all_tickets(env.gw) == []
    assert env.outbox() == []
    assert env.relay.messages == []
    [item] = env.junk_list()
    assert item["from"] == "winner@lottery.example"
    assert item["subject"] == "You have WON"
    assert item["received_at"].startswith("2026-11-23T09:00")
    assert "route spam" in item["reason"]
    assert "spam (trusted front filter): yes" in item["reason"]
    assert item["spam"]["trusted"] is True
    assert item["spam"]["score"] == 9.1
    shown = env.cli("junk", "show", str(item["id"]))
    assert shown.returncode == 0
    assert "junked" in shown.stdout
    assert "X-Spam-Flag" in shown.stdout
    # ... and the metrics count it (what a dashboard watches).
    from prometheus_client import generate_latest

    scraped = (await asyncio.to_thread(generate_latest, env.gw.registry)).decode()
    assert 'support_gateway_junk_messages{state="junk"} 1.0' in scraped

    # The same headers from a client that is not our front host: anyone can write them.
    forged = make_mail(
        sender="pat@customer.example", subject="Printer on fire", headers=SPAM_HEADERS
    )
    await env.send(forged, source="127.0.0.2")
    await env.process()
    [ticket] = all_tickets(env.gw)
    [verdict] = _events(env, ticket.ref, "spam-verdict")
    assert "UNTRUSTED" in verdict, verdict
    assert "127.0.0.2" in verdict, verdict
    [message] = [m for m in ticket_json(env.gw, ticket.ref)["messages"] if m["direction"] == "in"]
    assert message["spam"]["spam"] is True
    assert message["spam"]["trusted"] is False
    assert _events(env, ticket.ref, "ack-sent")
    assert env.relay.to("pat@customer.example"), "the customer got no acknowledgement"
    assert len(env.junk_list()) == 1  # still only the trusted spam


async def test_spam_from_a_known_customer_goes_to_junk_not_into_their_ticket(env: Env) -> None:
    """The route said junk: the message's chain ends there (stages.JUNK); the known-customer
    policy never sees it, so it neither joins the customer's open request nor loses its
    route trace (docs/architecture.md "Adding a disposition")."""
    first = make_mail(sender="pat@customer.example", subject="Printer on fire")
    await env.send(first, source="127.0.0.2")
    await env.process()
    [ticket] = all_tickets(env.gw)
    again = make_mail(
        sender="pat@customer.example", subject="Printer on fire", headers=SPAM_HEADERS
    )
    await env.send(again, source="127.0.0.1")  # the trusted front host says spam
    await env.process()

    assert [t.ref for t in all_tickets(env.gw)] == [ticket.ref]
    inbound = [m for m in ticket_json(env.gw, ticket.ref)["messages"] if m["direction"] == "in"]
    assert len(inbound) == 1, "the spam joined the customer's open request"
    [item] = env.junk_list()
    shown = env.cli("junk", "show", str(item["id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    types = [e["type"] for e in json.loads(shown.stdout)["events"]]
    assert "routed" in types
    assert "junked" in types
    assert "known-customer" not in types


async def test_junk_release_opens_a_ticket_with_its_acknowledgement(env: Env) -> None:
    mail = make_mail(
        sender="pat@customer.example", subject="Invoice question", headers=SPAM_HEADERS
    )
    await env.send(mail)
    await env.process()
    assert all_tickets(env.gw) == []
    assert env.relay.messages == []
    [item] = env.junk_list()

    r = env.cli(
        "junk", "release", str(item["id"]), "--reason", "a customer, not spam", process=True
    )
    assert r.returncode == 0, r.stderr + r.stdout
    env.catch_up_with_the_cli()
    await env.worker.run_once()

    [ticket] = all_tickets(env.gw)
    assert ticket.requester == "pat@customer.example"
    [released] = _events(env, ticket.ref, "released-from-junk")
    assert "a customer, not spam" in released
    assert _events(env, ticket.ref, "junk-overridden")  # the spam route no longer decides
    [ack] = env.relay.to("pat@customer.example")
    assert ticket.ref in str(ack.message()["Subject"])
    assert env.relay.to("alice@example.com"), "the owner was not notified of the ticket"
    assert env.junk_list() == []  # released: out of the folder
    again = env.cli("junk", "release", str(item["id"]))
    assert again.returncode == 1
    assert "released" in again.stderr


async def test_junk_sender_blocks_future_mail_without_notifying_the_owner(env: Env) -> None:
    first = make_mail(sender="pest@nuisance.example", subject="Buy my SEO services")
    await env.send(first)
    await env.process()
    [ticket] = all_tickets(env.gw)
    assert env.relay.to("pest@nuisance.example")  # acknowledged: no filter said spam

    # The owner says "junk, and block the sender" from her mail client.
    assert ticket.id is not None
    token = env.gw.signer.reply_address("support", "example.com", ticket.id, "alice")
    staff = EmailMessage()
    staff["From"] = "alice@example.com"
    staff["To"] = token
    staff["Subject"] = f"Re: [{ticket.ref}] Buy my SEO services"
    staff["Message-ID"] = make_msgid(domain="example.com")
    staff.set_content("#junk sender\n\nThis is the third time.\n")
    env.relay.clear()
    await env.send(staff, to=token)
    await env.process()

    assert env.relay.to("pest@nuisance.example") == []  # nothing junk-related to the sender
    [confirm] = env.relay.to("alice@example.com")
    assert "Done" in str(confirm.message()["Subject"])
    d = ticket_json(env.gw, ticket.ref)
    assert d["status"] == "closed"
    assert "junk" in d["tags"]
    assert d["deadlines"] == {"first_response": None, "next_response": None, "resolution": None}
    assert _events(env, ticket.ref, "sender-blocked")
    [moved] = env.junk_list()
    assert moved["from"] == "pest@nuisance.example"
    assert "#junk by Alice Martin" in moved["reason"]
    blocked = env.cli("customers", "blocked", "--json")
    assert [b["address"] for b in json.loads(blocked.stdout)] == ["pest@nuisance.example"]

    # The next mail from that sender: junk, and nobody hears of it.
    env.relay.clear()
    env.clock.advance(timedelta(hours=1))
    await env.send(make_mail(sender="pest@nuisance.example", subject="Last chance!"))
    await env.process()
    assert [t.ref for t in all_tickets(env.gw)] == [ticket.ref]
    assert env.relay.messages == [], [str(m) for m in env.relay.messages]
    items = env.junk_list()
    assert [i["subject"] for i in items] == ["Last chance!", "Buy my SEO services"]
    assert "blocked" in items[0]["reason"]

    # Blocked by mistake? Released mail goes through as normal, block or no block.
    r = env.cli("junk", "release", str(items[0]["id"]), "--reason", "a real customer after all")
    assert r.returncode == 0, r.stderr + r.stdout
    env.catch_up_with_the_cli()
    await env.worker.run_once()
    with Session(env.gw.engine) as s:
        new = s.exec(select(Ticket).where(Ticket.subject == "Last chance!")).one()
    assert env.relay.to("pest@nuisance.example"), "the released mail was not acknowledged"
    assert new.requester == "pest@nuisance.example"

    # And the block can be undone.
    assert env.cli("customers", "unblock", "pest@nuisance.example").returncode == 0
    assert json.loads(env.cli("customers", "blocked", "--json").stdout) == []


async def test_a_fast_growing_junk_folder_raises_one_alert_and_old_junk_expires(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    async with _environment(
        tmp_path,
        clock,
        relay,
        junk={"alert_threshold": 3, "alert_window": "1h", "expire_days": 30},
        alerts={"admins": ["ops@example.com"]},
    ) as env:
        for i in range(5):
            spam = make_mail(
                sender=f"spammer{i}@bulk.example", subject=f"Pills {i}", headers=SPAM_HEADERS
            )
            await env.send(spam)
        await env.process()
        assert len(env.junk_list()) == 5
        # One alert for the run, to the admins only; nothing to any spammer.
        [alert] = env.relay.messages
        assert alert.rcpt_tos == ["ops@example.com"]
        assert alert.null_sender
        assert "junk folder grew by 3" in str(alert.message()["Subject"])

        # A month later the old junk has expired (raw dropped, record kept); a new run of
        # spam in a new window raises a new alert.
        env.relay.clear()
        env.clock.advance(timedelta(days=31))
        for i in range(3):
            await env.send(
                make_mail(sender=f"late{i}@bulk.example", subject="More", headers=SPAM_HEADERS)
            )
        await env.process()
        assert [i["subject"] for i in env.junk_list()] == ["More"] * 3
        everything = env.junk_list("--all")
        assert sorted(i["state"] for i in everything) == ["expired"] * 5 + ["junk"] * 3
        expired = next(i for i in everything if i["state"] == "expired")
        assert env.cli("junk", "release", str(expired["id"])).returncode == 1
        [again] = env.relay.messages
        assert again.rcpt_tos == ["ops@example.com"]
