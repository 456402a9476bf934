"""Staff work entirely by email, end to end at the capture relay (docs/decisions.md D7).

Customer -> acknowledgement and owner notification (full text) -> the owner replies to the
notification's Reply-To, quoting it -> the customer gets the answer without the quote, from
the support address, threaded and DKIM-signed, and the first-response clock stops. Commands,
notes, forged staff mail and tokens used from the wrong address are covered too.

The pipeline's own stages run (``staff_stage`` right after ``record``,
``notify_owner_stage`` after ``respond``) with a ``DeliveryWorker`` driven by hand. Staff mail
is DKIM-signed for example.com with the test key, whose record is in the gateway's static
resolver, so the "aligned DKIM/SPF when available" rule (docs/design.md §5) is exercised for
real; example.com also publishes SPF `-all`, so an unsigned reply fails SPF and is refused
by that same rule; a domain that publishes nothing is refused too, unless it is listed in the
opt-in `security.staff_token_only_domains` (docs/decisions.md D10).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import DkimKey, load_key, public_txt_record, sign
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline.commands import help_lines, help_text
from gateway.pipeline.notify import notify_owner_stage
from gateway.pipeline.staff import staff_stage
from gateway.pipeline.thread import Disposition
from gateway.security.dns import StaticResolver
from gateway.sla.clocks import active_deadlines
from gateway.store.models import Outbox, Ticket
from tests.conftest import make_settings
from tests.support.dkim import KeyTable
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

SELECTOR = "gw1"
DOMAIN = "example.com"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    key: DkimKey
    dns: dict[str, str]

    async def process(self) -> int:
        await self.gw.pipeline.run_once()
        return await self.worker.run_once()

    def verify(self, captured: Captured) -> bool:
        return KeyTable(self.dns).verify(captured)

    def sent_to(self, address: str) -> list[Captured]:
        return [m for m in self.relay.messages if address in m.rcpt_tos]

    def outbox(self, kind: str | None = None) -> list[Outbox]:
        with Session(self.gw.engine) as s:
            rows = s.exec(select(Outbox).order_by(Outbox.id)).all()  # type: ignore[arg-type]
            return [r for r in rows if kind is None or r.kind == kind]

    def ticket(self, ref: str) -> Ticket:
        with Session(self.gw.engine) as s:
            t = s.exec(select(Ticket).where(Ticket.ref == ref)).one()
            s.expunge(t)
            return t


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    key_file = tmp_path / "dkim.key"
    dkim_keygen(key_file, domain=DOMAIN, selector=SELECTOR, bits=1024)
    key = load_key(key_file, DOMAIN, SELECTOR)
    settings = make_settings(
        tmp_path,
        outbound={
            "relay": f"127.0.0.1:{relay.port}",
            "from_name": "Example Support",
            "dkim": {"domain": DOMAIN, "selector": SELECTOR, "key_file": str(key_file)},
        },
    )
    async with running_gateway(settings, clock) as gw:
        assert {staff_stage, notify_owner_stage} <= set(gw.pipeline.chains[Disposition.REPLY_TOKEN])
        record_name = f"{SELECTOR}._domainkey.{DOMAIN}"
        assert isinstance(gw.resolver, StaticResolver)
        gw.resolver.add(record_name, "TXT", public_txt_record(key))
        gw.resolver.add("example.com", "TXT", "v=spf1 -all")
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, worker, relay, clock, key, {record_name: public_txt_record(key)})


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def _events(env: Env, ref: str, type_: str) -> list[str]:
    return [e["detail"] for e in ticket_json(env.gw, ref)["events"] if e["type"] == type_]


async def _customer(env: Env, **kw: object) -> tuple[EmailMessage, str]:
    """A customer writes; returns their mail and the new ticket's ref."""
    before = {t.ref for t in all_tickets(env.gw)}
    mail = make_mail(**kw)  # type: ignore[arg-type]
    await send(env.gw, mail)
    await env.process()
    [ref] = [t.ref for t in all_tickets(env.gw) if t.ref not in before]
    return mail, ref


async def _staff(
    env: Env,
    ref: str,
    body: str,
    *,
    sender: str = "alice@example.com",
    person: str = "alice",
    to: str | None = None,
    signed: bool = True,
    attach: bytes | None = None,
) -> None:
    """A staff member replies to the per-person token address of `ref`."""
    t = env.ticket(ref)
    assert t.id is not None
    to = to or env.gw.signer.reply_address("support", DOMAIN, t.id, person)
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = f"Re: [{ref}] {t.subject}"
    m["Date"] = "Mon, 23 Nov 2026 11:00:00 +0100"
    m["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    m.set_content(body)
    if attach is not None:
        m.add_attachment(attach, maintype="application", subtype="pdf", filename="manual.pdf")
    raw = m.as_bytes()
    if signed:
        raw = sign(raw, [env.key])
    await send(env.gw, raw, sender=sender, recipients=[to])
    await env.process()


def _quote(captured: Captured) -> str:
    lines = _text(captured).splitlines()
    return "On Mon, 23 Nov 2026 at 10:00, Example Support <support@example.com> wrote:\n" + (
        "\n".join("> " + line for line in lines)
    )


# ------------------------------------------------------------------------------ the story


async def test_customer_notification_reply_relayed_and_clock_stops(env: Env) -> None:
    mail, ref = await _customer(
        env, subject="Printer on fire", body="Hello,\nthe printer is on fire.\nPat\n"
    )
    [ack] = env.sent_to("pat@customer.example")
    assert ack.message()["Auto-Submitted"] == "auto-replied"
    [note] = env.sent_to("alice@example.com")
    t = env.ticket(ref)
    assert t.id is not None

    # The owner's notification: full text, summary, deadline with zone, signed person token.
    m = note.message()
    assert note.null_sender
    assert env.verify(note)
    assert m["Auto-Submitted"] == "auto-generated"
    assert m["Subject"] == f"[{ref}] Printer on fire"
    claim = env.gw.signer.parse_reply_address(m["Reply-To"])
    assert claim is not None
    assert (claim.ticket_id, claim.person) == (t.id, "alice")
    mid = env.gw.signer.verify_message_id(m["Message-ID"])
    assert mid is not None
    assert (mid.ticket_id, mid.kind) == (t.id, "notify")
    text = _text(note)
    assert "the printer is on fire." in text
    assert "Pat" in text
    assert "log in" not in text.lower()
    for line in (
        f"Ticket:     {ref} (open)",
        "Requester:  pat@customer.example",
        "Owner:      Alice Martin <alice@example.com>",
        "Queue:      support",
        "Priority:   normal",
        "First response due: Monday 23 November 2026, 14:00 CET (Europe/Berlin) "
        "(2026-11-23T13:00:00Z)",
    ):
        assert line in text, text
    # The footer's command list is generated from the command registry: every command.
    flat = " ".join(text.split())
    assert f"Commands on the first lines: {help_text()}." in flat, text
    assert "#junk [sender]" in flat
    assert len(_events(env, ref, "owner-notified")) == 1

    # The owner replies to the notification's Reply-To, quoting it.
    env.clock.advance(timedelta(minutes=30))
    await _staff(
        env,
        ref,
        "Hello Pat,\n\nplease unplug it and step away.\n\nAlice\n\n" + _quote(note),
        to=m["Reply-To"],
    )
    [answer] = [x for x in env.sent_to("pat@customer.example") if x is not ack]
    a = answer.message()
    assert answer.mail_from == "support@example.com"  # a human reply, not a null sender
    assert env.verify(answer), "DKIM signature does not verify"
    [sender] = a["From"].addresses
    assert (sender.display_name, sender.addr_spec) == (
        "Alice Martin via Example Support",
        "support@example.com",
    )
    assert a["To"] == "pat@customer.example"
    assert a["Subject"] == f"[{ref}] Printer on fire"
    assert a["In-Reply-To"] == mail["Message-ID"]
    assert mail["Message-ID"] in a["References"]
    assert "Auto-Submitted" not in a or a["Auto-Submitted"] == "no"
    back = env.gw.signer.parse_reply_address(a["Reply-To"])
    assert back is not None
    assert (back.ticket_id, back.person) == (t.id, None)
    assert env.gw.signer.ticket_from_message_id(a["Message-ID"]) == t.id
    body = _text(answer)
    assert "please unplug it and step away." in body
    assert "wrote:" not in body
    assert "> " not in body
    assert "New ticket" not in body
    assert "the printer is on fire" not in body

    # The first-response clock stopped; nothing will escalate it.
    d = ticket_json(env.gw, ref)
    assert d["deadlines"]["first_response"] is None
    after = env.ticket(ref)
    assert after.first_responded_at is not None
    assert after.last_staff_at is not None
    assert [c for c, _ in active_deadlines(after)] == ["resolution"]
    kinds = [(x["direction"], x["kind"]) for x in d["messages"]]
    assert kinds == [
        ("in", "customer"),
        ("out", "ack"),
        ("out", "notification"),
        ("in", "staff_reply"),
        ("out", "staff_reply"),
    ]
    assert len(_events(env, ref, "staff-reply-relayed")) == 1
    [row] = env.outbox("staff_reply")
    assert row.mail_from == "support@example.com"
    assert row.state == "sent"
    # No confirmation mail for a plain reply; nothing else went out.
    assert len(env.sent_to("alice@example.com")) == 1

    # The customer answers the relayed reply: it lands in the ticket, the owner is notified.
    env.clock.advance(timedelta(minutes=10))
    follow = make_mail(
        subject=f"Re: {a['Subject']}",
        to=a["Reply-To"],
        body="It is out now, thanks.\n",
        in_reply_to=a["Message-ID"],
    )
    await send(env.gw, follow)
    await env.process()
    [_, second] = env.sent_to("alice@example.com")
    assert "It is out now, thanks." in _text(second)
    assert "wrote again" in _text(second)


async def test_attachments_forwarded_both_ways(env: Env) -> None:
    mail = make_mail()
    mail.add_attachment(b"%PDF" + b"x" * 2000, maintype="application", subtype="pdf",
                        filename="photo.pdf")  # fmt: skip
    await send(env.gw, mail)
    await env.process()
    [note] = env.sent_to("alice@example.com")
    files = [p.get_filename() for p in note.message().iter_attachments()]
    assert files == ["photo.pdf"]
    [t] = all_tickets(env.gw)
    await _staff(env, t.ref, "Here is the manual.\n", attach=b"%PDF-manual")
    [answer] = [x for x in env.sent_to("pat@customer.example") if "manual" in _text(x)]
    parts = list(answer.message().iter_attachments())
    assert [p.get_filename() for p in parts] == ["manual.pdf"]
    assert parts[0].get_content() == b"%PDF-manual"
    assert env.verify(answer)


async def test_big_attachments_are_listed_not_attached(env: Env) -> None:
    mail = make_mail()
    mail.add_attachment(b"x" * 3000, maintype="application", subtype="zip", filename="big.zip")
    env.gw.settings.outbound.notify_attachment_limit = 1000  # outbound.notify_attachment_limit
    await send(env.gw, mail)
    await env.process()
    [note] = env.sent_to("alice@example.com")
    assert list(note.message().iter_attachments()) == []
    assert "big.zip (3 KB)" in _text(note)
    assert "NOT attached" in _text(note)


# ------------------------------------------------------------------------------- commands


async def test_note_is_not_sent(env: Env) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, "#note\nCustomer is a VIP, be gentle.\n")
    assert env.sent_to("pat@customer.example")[1:] == []
    [confirm] = env.relay.messages[sent:]
    assert confirm.rcpt_tos == ["alice@example.com"]
    assert "#note" in _text(confirm)
    d = ticket_json(env.gw, ref)
    assert [x["kind"] for x in d["messages"] if x["direction"] == "in"] == ["customer", "note"]
    assert d["deadlines"]["first_response"] is not None  # a note is not a response
    assert env.outbox("staff_reply") == []


@pytest.mark.parametrize(
    ("command", "check"),
    [
        ("#close", lambda t: t.status == "closed" and t.closed_at is not None),
        ("#assign bob", lambda t: t.owner == "bob"),
        ("#waiting", lambda t: t.status == "waiting" and t.waiting_since is not None),
        ("#snooze 2d", lambda t: t.snoozed_until is not None),
        ("#priority urgent", lambda t: t.priority == "urgent"),
    ],
)
async def test_each_command_works(env: Env, command: str, check: object) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, command + "\n")
    t = env.ticket(ref)
    assert callable(check), (command, t)
    assert check(t), (command, t)
    new = env.relay.messages[sent:]
    assert all("pat@customer.example" not in m.rcpt_tos for m in new)  # command-only
    confirm = [m for m in new if m.rcpt_tos == ["alice@example.com"]]
    assert len(confirm) == 1
    assert confirm[0].message()["Subject"].startswith(f"[{ref}] Done:")
    assert "nothing was sent to the customer" in _text(confirm[0])
    if command == "#snooze 2d":
        assert t.snoozed_until is not None
        assert t.snoozed_until.replace(tzinfo=None) == (
            env.clock.now() + timedelta(days=2)
        ).replace(tzinfo=None)
    if command == "#assign bob":
        [bob] = env.sent_to("bob@example.com")
        assert "Printer on fire" in bob.message()["Subject"]
        assert "the printer is on fire." in _text(bob)
        # The handover's footer lists the commands from the registry too.
        assert f"Commands on the first lines: {help_text()}." in " ".join(_text(bob).split())
    assert ticket_json(env.gw, ref)["events"]


async def test_reply_with_commands_is_relayed_then_applied(env: Env) -> None:
    _, ref = await _customer(env)
    await _staff(env, ref, "#waiting\n#priority high\nCould you send a photo?\n")
    [answer] = env.sent_to("pat@customer.example")[1:]
    assert _text(answer).startswith("Could you send a photo?")
    assert "#waiting" not in _text(answer)
    t = env.ticket(ref)
    assert t.status == "waiting"
    assert t.priority == "high"
    assert t.first_responded_at is not None


async def test_merge(env: Env) -> None:
    _, first = await _customer(env, subject="Printer on fire")
    _, second = await _customer(env, sender="sam@other.example", subject="Printer smoking")
    await _staff(env, second, f"#merge {first}\n")
    t2 = env.ticket(second)
    assert t2.status == "closed"
    d2 = ticket_json(env.gw, second)
    assert {"ref": first, "relation": "merged-into"} in d2["links"]
    d1 = ticket_json(env.gw, first)
    assert "sam@other.example" in d1["participants"]
    assert any("merged into this ticket" in e for e in _events(env, first, "merged"))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("#assign zoe\nHello", "nobody called 'zoe'"),
        ("#merge ACME-9999\n", "there is no ticket ACME-9999"),
        ("#clsoe\nHello Pat", "unknown command #clsoe"),
    ],
)
async def test_command_errors_change_nothing(env: Env, body: str, error: str) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, body)
    [reply] = env.relay.messages[sent:]
    assert reply.rcpt_tos == ["alice@example.com"]
    assert "NOT done" in reply.message()["Subject"]
    assert error in _text(reply)
    # The error letter lists every command, from the registry, so the fix is at hand.
    assert all(line in _text(reply) for line in help_lines())
    t = env.ticket(ref)
    assert t.status == "open"
    assert t.owner == "alice"
    assert t.first_responded_at is None
    assert env.outbox("staff_reply") == []


# ------------------------------------------------------------------------------- forgeries


async def test_forged_staff_from_without_token_is_not_relayed(env: Env) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    forged = make_mail(
        sender="alice@example.com", subject=f"Re: [{ref}] Printer on fire", body="#close\nHi\n"
    )
    await send(env.gw, forged, sender="alice@example.com")
    await env.process()
    assert env.outbox("staff_reply") == []
    assert all("pat@customer.example" not in m.rcpt_tos for m in env.relay.messages[sent:])
    assert env.ticket(ref).status == "open"
    # It was treated as customer mail, and the impersonated person sees it with a warning.
    warned = [m for m in env.relay.messages[sent:] if "WARNING" in _text(m)]
    assert warned
    assert all(m.rcpt_tos == ["alice@example.com"] for m in warned)


async def test_token_used_from_another_address_is_not_relayed(env: Env) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, "#close\nYou have won a prize!\n", sender="mallory@evil.example",
                 signed=False)  # fmt: skip
    new = env.relay.messages[sent:]
    assert all("pat@customer.example" not in m.rcpt_tos for m in new)
    assert all("mallory@evil.example" not in m.rcpt_tos for m in new)  # no backscatter
    [alert] = new
    assert alert.rcpt_tos == ["alice@example.com"]
    assert "Unverified staff reply NOT relayed" in alert.message()["Subject"]
    assert "mallory@evil.example" in _text(alert)
    [why] = _events(env, ref, "unverified-staff-reply")
    assert "issued to Alice Martin <alice@example.com>" in why
    t = env.ticket(ref)
    assert t.status == "open"
    assert t.first_responded_at is None
    d = ticket_json(env.gw, ref)
    assert [x["kind"] for x in d["messages"] if x["direction"] == "in"][-1] == "note"
    assert len(env.outbox("notification")) == 2  # the first notification and the alert


async def test_unsigned_reply_from_the_right_address_is_not_relayed(env: Env) -> None:
    _, ref = await _customer(env)
    await _staff(env, ref, "Hello Pat, unplug it.\n", signed=False)
    assert env.outbox("staff_reply") == []
    [why] = _events(env, ref, "unverified-staff-reply")
    assert "not authenticated" in why
    assert env.ticket(ref).first_responded_at is None


async def test_colleague_reply_is_an_internal_note(env: Env) -> None:
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, "#close\nI know this printer, call me.\n", sender="bob@example.com")
    assert env.outbox("staff_reply") == []
    t = env.ticket(ref)
    assert t.status == "open"  # a colleague's commands are not applied
    d = ticket_json(env.gw, ref)
    assert "bob@example.com" in d["participants"]
    assert len(_events(env, ref, "staff-joined")) == 1
    new = env.relay.messages[sent:]
    assert sorted(m.rcpt_tos[0] for m in new) == ["alice@example.com", "bob@example.com"]
    [owner] = [m for m in new if m.rcpt_tos == ["alice@example.com"]]
    assert "I know this printer" in _text(owner)


async def test_out_of_office_on_a_staff_token_does_nothing(env: Env) -> None:
    _, ref = await _customer(env)
    t = env.ticket(ref)
    assert t.id is not None
    to = env.gw.signer.reply_address("support", DOMAIN, t.id, "alice")
    m = make_mail(sender="alice@example.com", to=to, body="I am away until Monday.\n",
                  headers={"Auto-Submitted": "auto-replied"})  # fmt: skip
    await send(env.gw, sign(m.as_bytes(), [env.key]), sender="alice@example.com",
               recipients=[to])  # fmt: skip
    sent = len(env.relay.messages)
    await env.process()
    assert env.relay.messages[sent:] == []
    assert env.outbox("staff_reply") == []
    assert json.dumps(ticket_json(env.gw, ref)["deadlines"]["first_response"]) != "null"


async def test_unsigned_reply_is_refused_when_the_domain_publishes_nothing(env: Env) -> None:
    # No DKIM signature and no SPF record: the checks complete without proof. The reply
    # token alone proves nothing (it travels in every forward and reply-all; docs/decisions.md D10).
    assert isinstance(env.gw.resolver, StaticResolver)
    env.gw.resolver.remove("example.com", "TXT")
    _, ref = await _customer(env)
    sent = len(env.relay.messages)
    await _staff(env, ref, "Hello Pat, unplug it.\n", signed=False)
    assert env.outbox("staff_reply") == []
    [why] = _events(env, ref, "unverified-staff-reply")
    assert "not authenticated" in why
    assert "reply token" in why
    [alert] = env.relay.messages[sent:]
    assert alert.rcpt_tos == ["alice@example.com"]


async def test_unsigned_reply_is_relayed_for_an_opted_in_token_only_domain(env: Env) -> None:
    # security.staff_token_only_domains: the explicit, documented opt-in for staff domains
    # that publish neither DKIM nor SPF.
    assert isinstance(env.gw.resolver, StaticResolver)
    env.gw.resolver.remove("example.com", "TXT")
    env.gw.settings.security.staff_token_only_domains = ["example.com"]
    _, ref = await _customer(env)
    await _staff(env, ref, "Hello Pat, unplug it.\n", signed=False)
    assert len(env.outbox("staff_reply")) == 1
    assert _events(env, ref, "unverified-staff-reply") == []
    [ok] = _events(env, ref, "staff-verified")
    assert "staff_token_only_domains" in ok
