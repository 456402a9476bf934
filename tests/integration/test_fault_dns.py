"""DNS faults: unknown is not verified, and DNS trouble does not stall the pipeline
(docs/decisions.md D10.1 and 2).

The real daemon listens on loopback and is spoken to over real SMTP; its sender checks use
the real dnspython resolver pointed at 127.0.0.2, where nothing listens (every question times
out), or at a tiny real DNS server that answers NXDOMAIN to everything
(tests/support/dns_server.py).  Outbound mail lands at the capture relay.  Time is a
FrozenClock: the re-check worker is driven with ``gw.rechecker.run_once()`` after moving it.
"DNS comes back" is the resolver in the gateway's services being replaced by one that
answers (what an admin's fix of resolv.conf amounts to for the next lookup).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import DkimKey, load_key, public_txt_record, sign
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.worker import DeliveryWorker
from gateway.security.dns import Resolver, StaticResolver, SystemResolver
from gateway.store.models import AuthRecheck, Outbox, Ticket
from tests.conftest import make_settings
from tests.support.dns_server import NxDnsServer
from tests.support.gateway import all_tickets, make_mail, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

DOMAIN = "example.com"
SELECTOR = "gw1"
NOBODY = "127.0.0.2"  # nothing listens there: every DNS question times out
FORGED_BODY = "#priority urgent\nHi Pat, please confirm your password at https://evil.example\n"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    key: DkimKey

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        await self.worker.run_once()

    async def recheck(self) -> int:
        n = await self.gw.rechecker.run_once()
        await self.worker.run_once()
        return n

    def sent_to(self, address: str) -> list[Captured]:
        return [m for m in self.relay.messages if address in m.rcpt_tos]

    def outbox(self, kind: str) -> list[Outbox]:
        with Session(self.gw.engine) as s:
            return list(s.exec(select(Outbox).where(Outbox.kind == kind)).all())

    def ticket(self, ref: str) -> Ticket:
        with Session(self.gw.engine) as s:
            t = s.exec(select(Ticket).where(Ticket.ref == ref)).one()
            s.expunge(t)
            return t

    def events(self, ref: str, type_: str) -> list[str]:
        return [e["detail"] for e in ticket_json(self.gw, ref)["events"] if e["type"] == type_]

    def waiting(self) -> list[AuthRecheck]:
        with Session(self.gw.engine) as s:
            return list(s.exec(select(AuthRecheck).where(AuthRecheck.state == "waiting")).all())

    def dns_back(self, extra: dict[tuple[str, str], list[str]] | None = None) -> None:
        """DNS answers again: example.com's DKIM key, and whatever the test adds."""
        records: dict[tuple[str, str], list[str]] = {
            (f"{SELECTOR}._domainkey.{DOMAIN}", "TXT"): [public_txt_record(self.key)],
            **(extra or {}),
        }
        self.gw.services.resolver = StaticResolver(records)


async def _env(
    tmp_path: Path,
    clock: FrozenClock,
    relay: CaptureRelay,
    *,
    resolver: Resolver | None = None,
    security: dict[str, Any] | None = None,
    database_url: str | None = None,
) -> AsyncIterator[Env]:
    key_file = tmp_path / "dkim.key"
    dkim_keygen(key_file, domain=DOMAIN, selector=SELECTOR, bits=1024)
    key = load_key(key_file, DOMAIN, SELECTOR)
    settings = make_settings(
        tmp_path,
        outbound={"relay": f"127.0.0.1:{relay.port}", "from_name": "Example Support"},
        security={
            "secret_key": "test-secret-key-0123456789abcdef",
            "verify_senders": True,
            "nameservers": [NOBODY],
            "dns_timeout": 1.0,
            "dns_budget": 0.5,
            **(security or {}),
        },
        **({"storage": {"database_url": database_url}} if database_url else {}),
    )
    gw = Gateway(settings, clock=clock, resolver=resolver)  # None: built from settings
    if resolver is None:
        assert isinstance(gw.resolver, SystemResolver)  # the real one, at 127.0.0.2
    await gw.start(workers=False)
    try:
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, worker, relay, clock, key)
    finally:
        await gw.stop()


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    """The daemon with its DNS at 127.0.0.2 (SQLite)."""
    async for e in _env(tmp_path, clock, relay):
        yield e


@pytest.fixture
async def env_db(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay, database_url: str
) -> AsyncIterator[Env]:
    """The same on SQLite and on PostgreSQL (the re-check rows' times and locking)."""
    async for e in _env(tmp_path, clock, relay, database_url=database_url):
        yield e


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


async def _customer(env: Env, sender: str = "pat@customer.example", **kw: Any) -> str:
    before = {t.ref for t in all_tickets(env.gw)}
    await send(env.gw, make_mail(sender=sender, **kw), sender=sender)
    await env.process()
    [ref] = [t.ref for t in all_tickets(env.gw) if t.ref not in before]
    return ref


def _staff_address(env: Env, ref: str) -> str:
    """The owner's real staff reply address: the Reply-To of their notification."""
    [note] = [m for m in env.sent_to("alice@example.com") if ref in str(m.message()["Subject"])]
    return str(note.message()["Reply-To"])


async def _staff_reply(env: Env, ref: str, body: str, *, signed: bool) -> None:
    to = _staff_address(env, ref)
    m = EmailMessage()
    m["From"] = "Alice Martin <alice@example.com>"
    m["To"] = to
    m["Subject"] = f"Re: [{ref}] Printer on fire"
    m["Date"] = "Mon, 23 Nov 2026 11:00:00 +0100"
    m["Message-ID"] = make_msgid(domain=DOMAIN)
    m.set_content(body)
    raw = sign(m.as_bytes(), [env.key]) if signed else m.as_bytes()
    await send(env.gw, raw, sender="alice@example.com", recipients=[to])
    await env.process()


# ------------------------------------------------------------------- finding 1, staff reply


async def test_forged_staff_reply_with_dns_down_is_held_then_refused(env_db: Env) -> None:
    env = env_db
    ref = await _customer(env)
    # The ticket and the owner's notification did not wait for DNS; only the ack waits.
    assert len(env.sent_to("alice@example.com")) == 1
    assert env.sent_to("pat@customer.example") == []
    [deferred] = env.events(ref, "ack-deferred")
    assert "temperror" in deferred

    await _staff_reply(env, ref, FORGED_BODY, signed=False)
    assert env.outbox("staff_reply") == []
    assert env.sent_to("pat@customer.example") == []
    assert env.ticket(ref).priority == "normal"  # #priority urgent NOT applied
    assert env.events(ref, "staff-verified") == []
    [held] = env.events(ref, "staff-reply-held")
    assert "could not be completed" in held
    assert "spf temperror" in held
    d = ticket_json(env.gw, ref)
    assert [m["kind"] for m in d["messages"] if m["direction"] == "in"][-1] == "note"

    # A re-check while DNS is still down changes nothing.
    env.clock.advance(timedelta(minutes=2))
    assert await env.recheck() == 2  # the deferred ack and the held reply
    assert env.sent_to("pat@customer.example") == []
    assert env.outbox("staff_reply") == []
    assert len(env.waiting()) == 2

    # After the window (security.recheck_window, 30 min) the reply is refused, the owner told.
    env.clock.advance(timedelta(minutes=31))
    await env.recheck()
    assert env.waiting() == []
    assert env.outbox("staff_reply") == []
    assert env.sent_to("pat@customer.example") == []
    assert env.ticket(ref).priority == "normal"
    [why] = env.events(ref, "unverified-staff-reply")
    assert "unknown is not verified" in why
    [alert] = [m for m in env.sent_to("alice@example.com") if "NOT relayed" in
               str(m.message()["Subject"])]  # fmt: skip
    assert "confirm your password" in _text(alert)
    # And the customer's deferred ack, still unverified, is suppressed by the default policy.
    [suppressed] = env.events(ref, "ack-suppressed")
    assert "ack_if_unverified = suppress" in suppressed


async def test_forged_staff_reply_refused_when_dns_returns(env: Env) -> None:
    ref = await _customer(env)
    await _staff_reply(env, ref, FORGED_BODY, signed=False)
    assert env.events(ref, "staff-reply-held")
    env.dns_back({(DOMAIN, "TXT"): ["v=spf1 -all"]})
    env.clock.advance(timedelta(minutes=2))
    await env.recheck()
    [why] = env.events(ref, "unverified-staff-reply")
    assert "not authenticated" in why
    assert "spf fail" in why
    assert env.outbox("staff_reply") == []
    assert env.ticket(ref).priority == "normal"
    assert [m for m in env.sent_to("alice@example.com") if "NOT relayed" in
            str(m.message()["Subject"])]  # fmt: skip


async def test_genuine_staff_reply_waits_for_dns_then_is_relayed(env_db: Env) -> None:
    env = env_db
    ref = await _customer(env)
    due = env.ticket(ref).first_response_due
    env.clock.advance(timedelta(minutes=10))
    await _staff_reply(env, ref, "#priority urgent\nHello Pat, unplug it.\n", signed=True)
    [held] = env.events(ref, "staff-reply-held")
    assert "dkim example.com=temperror" in held
    assert env.outbox("staff_reply") == []
    assert env.ticket(ref).priority == "normal"

    env.dns_back()
    env.clock.advance(timedelta(minutes=2))
    await env.recheck()
    [ack, reply] = env.sent_to("pat@customer.example")
    # The deferred ack came first and promises the STORED deadline, not a recomputed one.
    assert ack.message()["Auto-Submitted"] == "auto-replied"
    assert due is not None
    [sent] = env.events(ref, "ack-sent")
    assert f"promised by {due.isoformat()}" in sent
    assert "Hello Pat, unplug it." in _text(reply)
    [ok] = env.events(ref, "staff-verified")
    assert "dkim pass d=example.com" in ok
    assert env.ticket(ref).priority == "urgent"
    assert env.waiting() == []


# --------------------------------------------------------------- finding 1, backscatter


async def test_forged_sender_gets_no_ack_while_unknown_nor_after_failing(env: Env) -> None:
    victim = "victim@innocent.example"
    ref = await _customer(env, sender=victim, subject="CHEAP PILLS visit spam.example now")
    assert env.sent_to(victim) == []
    assert env.events(ref, "ack-deferred")
    assert env.events(ref, "owner-notified")
    assert len(env.sent_to("alice@example.com")) == 1  # the owner was not kept waiting

    env.clock.advance(timedelta(minutes=2))
    await env.recheck()
    assert env.sent_to(victim) == []
    assert env.events(ref, "ack-sent") == []

    env.dns_back({("innocent.example", "TXT"): ["v=spf1 -all"]})
    env.clock.advance(timedelta(minutes=3))
    await env.recheck()
    assert env.sent_to(victim) == []
    [why] = env.events(ref, "ack-suppressed")
    assert "likely forged" in why
    assert "backscatter" in why
    assert env.waiting() == []


async def test_unknown_sender_after_the_window_gets_the_documented_policy(env: Env) -> None:
    victim = "victim@innocent.example"
    ref = await _customer(env, sender=victim, subject="CHEAP PILLS")
    env.clock.advance(timedelta(minutes=31))
    await env.recheck()
    assert env.sent_to(victim) == []
    [why] = env.events(ref, "ack-suppressed")
    assert "still unverified after the re-check window" in why


async def test_ack_if_unverified_send_acks_after_the_window_with_the_stored_deadline(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    async for env in _env(tmp_path, clock, relay, security={"ack_if_unverified": "send"}):
        ref = await _customer(env)
        due = env.ticket(ref).first_response_due
        assert due is not None
        assert env.sent_to("pat@customer.example") == []
        env.clock.advance(timedelta(minutes=31))
        await env.recheck()
        [ack] = env.sent_to("pat@customer.example")
        [sent] = env.events(ref, "ack-sent")
        assert f"promised by {due.isoformat()}" in sent
        assert "ack_if_unverified = send" in sent
        assert due.strftime("%Y-%m-%dT%H:%M") in _text(ack)


# ------------------------------------------------------------ a resolver that lies NXDOMAIN


async def test_nxdomain_everything_resolver_proves_nothing(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    with NxDnsServer() as server:
        resolver = SystemResolver(nameservers=["127.0.0.1"], port=server.port, timeout=1.0)
        async for env in _env(tmp_path, clock, relay, resolver=resolver):
            ref = await _customer(env)
            await _staff_reply(env, ref, FORGED_BODY, signed=True)  # even DKIM: no key found
            assert env.outbox("staff_reply") == []
            assert env.sent_to("pat@customer.example")[-1].message()["Auto-Submitted"] == (
                "auto-replied"
            )  # only the ack: checks completed (spf none, dmarc none), nothing failed
            assert env.ticket(ref).priority == "normal"
            [why] = env.events(ref, "unverified-staff-reply")
            assert "spf none; dmarc none" in why
            assert "reply token" in why
            assert env.events(ref, "staff-reply-held") == []  # completed: refused, not held
            assert [m for m in env.sent_to("alice@example.com") if "NOT relayed" in
                    str(m.message()["Subject"])]  # fmt: skip
            assert server.questions  # the checks really asked the server


# ---------------------------------------------------------------------------- finding 2


async def test_dns_unreachable_does_not_stall_twenty_messages(env: Env) -> None:
    for i in range(20):
        mail = make_mail(sender=f"c{i}@customer.example", subject=f"Request {i}")
        await send(env.gw, mail, sender=f"c{i}@customer.example")
    await env.gw.pipeline.run_once()
    tickets = all_tickets(env.gw)
    assert len(tickets) == 20
    assert len(env.outbox("notification")) == 20  # every owner notified, nothing waited
    cut = unavailable = 0
    for t in tickets:
        types = [e["type"] for e in ticket_json(env.gw, t.ref)["events"]]
        assert "ack-deferred" in types
        assert "owner-notified" in types
        assert "dns-budget-cut" in types or "dns-unavailable" in types
        cut += "dns-budget-cut" in types
        unavailable += "dns-unavailable" in types
    # Only the first message(s) spent the 0.5 s budget; then the breaker answered at once.
    assert 1 <= cut <= 2
    assert unavailable >= 18
    assert isinstance(env.gw.resolver, SystemResolver)
    assert env.gw.resolver.unreachable
