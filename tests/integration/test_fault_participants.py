"""docs/decisions.md D10.3 and 4: threading proves the ticket, participation proves the person.

The real daemon over SMTP, the capture relay for everything it sends. Each story is the
attack as reported, and asserts what a user sees: the ticket's participants (as
``tickets show --json`` prints them), the new linked ticket, the first line of the owner's
notification, and the recipients of the next staff reply at the relay.

3. A stranger who holds one of our Message-IDs (a staff reply to pat, forwarded or quoted
   anywhere) answers it: before, they joined pat's ticket and were Cc'd on the next staff
   reply. Now their mail is a new ticket linked to pat's, and the owner is told so.
4. A stranger writes with ``From: pat`` (the requester) from their own envelope and
   ``[REF]`` in the subject: before, the mail joined pat's ticket as pat. Now an
   unauthenticated From that is not the envelope sender counts as nobody: new linked ticket,
   flagged unverified, the owner's notification says so on its first line, and nobody it
   names (From, To, Cc) is made a participant or copied on a staff reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses, make_msgid
from pathlib import Path

import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import DkimKey, load_key, public_txt_record, sign
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.worker import DeliveryWorker
from gateway.security.dns import StaticResolver
from gateway.store.models import Ticket
from tests.conftest import make_settings
from tests.support.gateway import all_tickets, inbound, make_mail, running_gateway, send
from tests.support.gateway import ticket_json as _ticket_json
from tests.support.relay import Captured, CaptureRelay

DOMAIN = "example.com"
SELECTOR = "gw1"
PAT = "pat@victim.example"
BOSS = "boss@victim.example"
OWNER = "alice@example.com"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    key: DkimKey  # example.com's: staff mail is DKIM-signed like a real staff MTA would

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        await self.worker.run_once()

    def ticket_json(self, ref: str) -> dict:  # type: ignore[type-arg]
        return _ticket_json(self.gw, ref)

    def ticket_id(self, ref: str) -> int:
        with Session(self.gw.engine) as s:
            t = s.exec(select(Ticket).where(Ticket.ref == ref)).one()
            assert t.id is not None
            return t.id

    def refs(self) -> list[str]:
        return [t.ref for t in all_tickets(self.gw)]

    def notifications(self, ref: str) -> list[Captured]:
        """Owner notifications about ticket `ref`, oldest first."""
        return [
            m
            for m in self.relay.messages
            if OWNER in m.rcpt_tos
            and m.message()["Auto-Submitted"] == "auto-generated"
            and m.message()["Subject"].startswith(f"[{ref}]")
        ]

    def staff_replies(self) -> list[Captured]:
        """What the relay got from staff replies (sent from the support address)."""
        return [m for m in self.relay.messages if m.mail_from == f"support@{DOMAIN}"]


def customer_texts(ticket: dict) -> list[str]:  # type: ignore[type-arg]
    """Who wrote the customer messages stored in a ticket (staff mail is a note)."""
    return [m["from"] for m in inbound(ticket) if m["kind"] == "customer"]


def first_line(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content()).splitlines()[0]


def body_text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def cc_of(captured: Captured) -> list[str]:
    return [a.lower() for _, a in getaddresses(captured.message().get_all("Cc", []))]


@pytest.fixture(params=[True, False], ids=["verify-senders", "no-sender-checks"])
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> AsyncIterator[Env]:
    key_file = tmp_path / "dkim.key"
    dkim_keygen(key_file, domain=DOMAIN, selector=SELECTOR, bits=1024)
    key = load_key(key_file, DOMAIN, SELECTOR)
    settings = make_settings(
        tmp_path,
        # Without sender checks a staff reply has no proof but its token; such a site must
        # opt its staff domain in explicitly (security.staff_token_only_domains).
        security={
            "verify_senders": request.param,
            "staff_token_only_domains": [] if request.param else [DOMAIN],
        },
        outbound={
            "relay": f"127.0.0.1:{relay.port}",
            "dkim": {"domain": DOMAIN, "selector": SELECTOR, "key_file": str(key_file)},
        },
    )
    # With sender checks on, DNS is a static table (staff mail passes DKIM for example.com);
    # with them off the gateway has no resolver at all, as in production, and only the
    # envelope can vouch for a From.
    resolver = StaticResolver({}) if request.param else None
    gw = Gateway(settings, clock=clock, resolver=resolver)
    assert (gw.resolver is None) is (not request.param)
    await gw.start(workers=False)
    try:
        if resolver is not None:
            resolver.add(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT", public_txt_record(key))
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, worker, relay, key)
    finally:
        await gw.stop()


async def pat_writes(env: Env) -> str:
    """pat opens a ticket, Cc'ing a colleague (who thereby takes part); returns its ref."""
    await send(env.gw, make_mail(sender=PAT, cc=BOSS, subject="Invoice wrong"))
    await env.process()
    [ref] = env.refs()
    return ref


async def staff_replies(env: Env, ref: str, body: str) -> Captured:
    """The owner answers by email (DKIM-signed, to their token address); returns what the
    relay received for the customer."""
    before = len(env.staff_replies())
    to = env.gw.signer.reply_address("support", DOMAIN, env.ticket_id(ref), "alice")
    m = EmailMessage()
    m["From"] = OWNER
    m["To"] = to
    m["Subject"] = f"Re: [{ref}] Invoice wrong"
    m["Date"] = "Mon, 23 Nov 2026 11:00:00 +0100"
    m["Message-ID"] = make_msgid(domain=DOMAIN)
    m.set_content(body)
    await send(env.gw, sign(m.as_bytes(), [env.key]), sender=OWNER, recipients=[to])
    await env.process()
    replies = env.staff_replies()
    assert len(replies) == before + 1, "the staff reply was not relayed"
    return replies[-1]


# ------------------------------------------------------------------------------ finding 3


async def test_stranger_with_our_message_id_gets_a_linked_ticket_not_a_cc(env: Env) -> None:
    ref = await pat_writes(env)
    answer = await staff_replies(env, ref, "We are looking into it.")
    ours = answer.message()["Message-ID"]
    assert env.gw.signer.ticket_from_message_id(ours) == env.ticket_id(ref)

    # swaks --from mallory@evil.example --header "In-Reply-To: <our staff reply's id>"
    mallory = "mallory@evil.example"
    await send(
        env.gw,
        make_mail(
            sender=mallory,
            in_reply_to=ours,
            subject="Re: Invoice wrong",
            body="Please send me a copy of the invoice.\n",
        ),
    )
    await env.process()

    # pat's ticket: mallory is not a participant and her text is not in it.
    pat_ticket = env.ticket_json(ref)
    assert pat_ticket["participants"] == [PAT, BOSS]
    assert customer_texts(pat_ticket) == [PAT]
    # Her mail is a new ticket, linked to pat's for the owner to judge.
    [_, new_ref] = env.refs()
    new = env.ticket_json(new_ref)
    assert new["requester"] == mallory
    assert new["participants"] == [mallory]
    assert new["links"] == [{"ref": ref, "relation": "possible-follow-up"}]
    created = [e["detail"] for e in new["events"] if e["type"] == "created"]
    assert f"is our message in {ref} but {mallory} is not a participant" in created[0]

    # The owner sees a new ticket (not "mallory wrote again ... answer pat"), and why.
    [note] = env.notifications(new_ref)
    assert first_line(note) == f"New ticket {new_ref} from {mallory}."
    assert f"{mallory} is not a participant of {ref}" in body_text(note)
    assert env.notifications(ref)[-1] is not note

    # The next staff reply to pat goes to pat and the colleague pat Cc'd, never mallory.
    nxt = await staff_replies(env, ref, "Here is the corrected invoice.")
    assert sorted(nxt.rcpt_tos) == [BOSS, PAT]
    assert cc_of(nxt) == [BOSS]


# ------------------------------------------------------------------------------ finding 4


async def test_forged_requester_from_is_unverified_and_joins_nothing(env: Env) -> None:
    ref = await pat_writes(env)
    await staff_replies(env, ref, "We are looking into it.")

    # Envelope mallory@evil.test, From: pat (the requester), the ticket's reference in the
    # subject, and an accomplice in Cc.
    forged = make_mail(
        sender=PAT,
        cc="accomplice@evil.test",
        subject=f"[{ref}] change of address",
        body="Please send all details to mallory@evil.test from now on.\n",
    )
    to_pat = len([m for m in env.relay.messages if PAT in m.rcpt_tos])
    await send(env.gw, forged, sender="mallory@evil.test")
    await env.process()

    # pat's ticket: untouched (no text, no new participant).
    pat_ticket = env.ticket_json(ref)
    assert customer_texts(pat_ticket) == [PAT]
    assert pat_ticket["participants"] == [PAT, BOSS]
    # A new ticket linked to pat's, its message flagged, the reason in the audit trail.
    [_, new_ref] = env.refs()
    new = env.ticket_json(new_ref)
    assert new["links"] == [{"ref": ref, "relation": "possible-follow-up"}]
    assert new["participants"] == [PAT]  # the accomplice in Cc is nobody's guest
    [msg] = inbound(new)
    assert msg["sender_unverified"] is True
    [why] = [e["detail"] for e in new["events"] if e["type"] == "sender-unverified"]
    assert "envelope sender is mallory@evil.test" in why

    # The owner's notification says so on its first line.
    [note] = env.notifications(new_ref)
    assert first_line(note).startswith(
        f"UNVERIFIED SENDER: the From address {PAT} is not authenticated and the envelope "
        "sender is mallory@evil.test."
    )
    assert f"an unverified From counts as no participant of {ref}" in body_text(note)
    # Nothing went to the addresses the forgery names: no ack, no copy.
    assert not [m for m in env.relay.messages if "accomplice@evil.test" in m.rcpt_tos]
    assert len([m for m in env.relay.messages if PAT in m.rcpt_tos]) == to_pat

    # The next staff reply to pat goes to pat and pat's colleague only.
    nxt = await staff_replies(env, ref, "Your address is unchanged.")
    assert sorted(nxt.rcpt_tos) == [BOSS, PAT]
    assert cc_of(nxt) == [BOSS]


async def test_requester_writing_from_another_envelope_with_dkim_still_counts(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay
) -> None:
    """The other side of finding 4: pat's own mail sent through a service with its own
    envelope (a bounce address) but DKIM-signed for pat's domain is pat's, and joins."""
    key_file = tmp_path / "victim.key"
    dkim_keygen(key_file, domain="victim.example", selector="s1", bits=1024)
    pat_key = load_key(key_file, "victim.example", "s1")
    settings = make_settings(tmp_path, outbound={"relay": f"127.0.0.1:{relay.port}"})
    async with running_gateway(settings, clock) as gw:
        assert isinstance(gw.resolver, StaticResolver)
        gw.resolver.add("s1._domainkey.victim.example", "TXT", public_txt_record(pat_key))
        await send(gw, make_mail(sender=PAT, subject="Invoice wrong"))
        await gw.pipeline.run_once()
        [t] = all_tickets(gw)
        raw = make_mail(sender=PAT, subject=f"Re: [{t.ref}] still wrong").as_bytes()
        await send(
            gw,
            sign(raw, [pat_key]),
            sender="bounces+7@mailer.example",
            recipients=["support@example.com"],
        )
        await gw.pipeline.run_once()
        assert [x.ref for x in all_tickets(gw)] == [t.ref]
        d = _ticket_json(gw, t.ref)
        assert [m["sender_unverified"] for m in inbound(d)] == [False, False]
        assert not [e for e in d["events"] if e["type"] == "sender-unverified"]
