"""What we tell colleagues is what happens (docs/decisions.md D11, items 4, 5, 6 and 9), end to end.

Real SMTP into the running gateway, the pipeline's own stages, the escalator and the delivery
worker driven by hand on a frozen clock, mail read at the capture relay:

- a route's ``notify = ["carol"]`` sends Carol the full new-ticket notification (text,
  attachment, her own reply token she can answer on), at once even on a Sunday when her
  calendar is closed (the documented choice: notifications are never held);
- ``#assign`` and an escalation ladder ``assign`` step hand the new holder the whole
  history (original request, staff answer and internal note marked, each attachment once)
  and tell the previous holder who has the ticket now;
- ``sla upcoming`` marks the clocks of a ticket waiting on the customer as paused;
- ``#snooze 2d`` on a Friday means two working days (Tuesday), and ``--within`` counts
  business time, as the rules do.

Staff mail comes from example.com, which publishes neither DKIM nor SPF here: the signed
per-person token is the proof (docs/design.md §5), see tests/integration/test_staff_email.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.escalation.escalator import Escalator
from gateway.outbound.worker import DeliveryWorker
from gateway.store.models import Outbox, Ticket
from tests.conftest import RULES, make_settings
from tests.support.cli import run as run_cli
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

# The test rules, with Carol working Berlin office hours and an outage route that notifies
# her (the shape of the shipped rules/routes.toml "outage" route).
EXTRA_RULES = """
[[route]]
name = "outage"
match = { subject = "(?i)outage" }
priority = "urgent"
tags = ["outage"]
notify = ["carol"]
continue = true
"""
SUNDAY = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)  # 11:00 in Berlin, a Sunday
FRIDAY = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)  # 11:00 in Berlin, a Friday
PHOTO = b"%PDF-photo" + b"p" * 1500
MANUAL = b"%PDF-manual" + b"m" * 700


@dataclass
class Env:
    gw: Gateway
    escalator: Escalator
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    rules_dir: Path
    tmp: Path

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        self.escalator.run_once()
        await self.worker.run_once()

    def sent_to(self, address: str) -> list[Captured]:
        return [m for m in self.relay.messages if address in m.rcpt_tos]

    def ticket(self, ref: str) -> Ticket:
        with Session(self.gw.engine) as s:
            t = s.exec(select(Ticket).where(Ticket.ref == ref)).one()
            s.expunge(t)
            return t


def _rules(tmp_path: Path) -> Path:
    text = (RULES / "rules.toml").read_text()
    marker = '[people.carol]\nname = "Carol Diaz"\nemail = "carol@example.com"\ncalendar = "always"'
    assert marker in text
    text = text.replace(marker, marker.replace('"always"', '"berlin"'))
    out = tmp_path / "rules"
    out.mkdir()
    (out / "rules.toml").write_text(text + EXTRA_RULES)
    return out


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    rules_dir = _rules(tmp_path)
    settings = make_settings(
        tmp_path,
        rules_dir=str(rules_dir),
        outbound={"relay": f"127.0.0.1:{relay.port}", "from_name": "Example Support"},
        # Staff mail here is unsigned: the documented opt-in for a staff domain without
        # DKIM/SPF lets the reply token stand as the proof (docs/security.md).
        security={"staff_token_only_domains": ["example.com"]},
    )
    async with running_gateway(settings, clock) as gw:
        escalator = Escalator(gw.engine, settings, clock, lambda: gw.rules.current, gw.signer)
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, escalator, worker, relay, clock, rules_dir, tmp_path)


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def _files(captured: Captured) -> list[tuple[str, bytes]]:
    return [
        (p.get_filename() or "", p.get_content()) for p in captured.message().iter_attachments()
    ]


async def _customer(env: Env, *, ref: str | None = None, **kw: object) -> str:
    """A customer writes (a new ticket, or into `ref` through its reply address)."""
    attach = kw.pop("attach", None)
    if ref is not None:
        t = env.ticket(ref)
        assert t.id is not None
        kw["to"] = env.gw.signer.reply_address("support", "example.com", t.id)
    before = {t.ref for t in all_tickets(env.gw)}
    mail = make_mail(**kw)  # type: ignore[arg-type]
    if isinstance(attach, bytes):
        mail.add_attachment(attach, maintype="application", subtype="pdf", filename="photo.pdf")
    await send(env.gw, mail)
    await env.process()
    if ref is not None:
        return ref
    [new] = [t.ref for t in all_tickets(env.gw) if t.ref not in before]
    return new


async def _staff(
    env: Env, ref: str, person: str, body: str, *, attach: bytes | None = None
) -> None:
    """`person` replies on their own signed token address of `ref`."""
    t = env.ticket(ref)
    assert t.id is not None
    sender = f"{person}@example.com"
    to = env.gw.signer.reply_address("support", "example.com", t.id, person)
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = f"Re: [{ref}] {t.subject}"
    m["Message-ID"] = make_msgid(domain="example.com")
    m.set_content(body)
    if attach is not None:
        m.add_attachment(attach, maintype="application", subtype="pdf", filename="manual.pdf")
    await send(env.gw, m.as_bytes(), sender=sender, recipients=[to])
    await env.process()


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = env.tmp / "cli.toml"
    cfg.write_text(
        f'rules_dir = "{env.rules_dir}"\n'
        f'[storage]\ndatabase_url = "{env.gw.settings.storage.database_url}"\n'
        f'spool_dir = "{env.tmp}/spool"\n'
        '[security]\nsecret_key = "test-secret-key-0123456789abcdef"\n'
    )
    return run_cli(["--config", str(cfg), *args])


# ---------------------------------------------------------------------- route notify


async def test_route_notify_sends_the_full_notification_at_once_on_a_sunday(env: Env) -> None:
    env.clock.set(SUNDAY)
    ref = await _customer(
        env, subject="Outage: the shop is down", body="Nothing loads since 10:50.\nPat\n",
        attach=PHOTO,
    )  # fmt: skip
    t = env.ticket(ref)
    assert t.owner == "alice"
    assert t.id is not None
    # Carol's calendar (Berlin office hours) is closed on Sunday: she is told at once anyway,
    # the documented behaviour (docs/rules.md "People": notifications are never held).
    [to_carol] = env.sent_to("carol@example.com")
    with Session(env.gw.engine) as s:
        [row] = [r for r in s.exec(select(Outbox)).all() if "carol@example.com" in r.rcpt_tos]
    assert row.state == "sent"
    assert row.sent_at is not None
    assert row.sent_at.replace(tzinfo=UTC) == SUNDAY
    m = to_carol.message()
    assert to_carol.null_sender
    assert m["Auto-Submitted"] == "auto-generated"
    assert m["Subject"] == f"[{ref}] Outage: the shop is down"
    text = _text(to_carol)
    assert "Nothing loads since 10:50." in text  # the full text, never "log in to read"
    assert "Owner:      Alice Martin <alice@example.com>" in text
    assert "route outage lists you in `notify`" in text
    assert _files(to_carol) == [("photo.pdf", PHOTO)]
    claim = env.gw.signer.parse_reply_address(str(m["Reply-To"]))
    assert claim is not None
    assert (claim.ticket_id, claim.person) == (t.id, "carol")
    # The owner got hers too, one each.
    assert len(env.sent_to("alice@example.com")) == 1

    # Carol answers by replying: it reaches the customer as staff.
    await _staff(env, ref, "carol", "We are on it, Pat.\nCarol\n")
    answers = [x for x in env.sent_to("pat@customer.example") if "We are on it" in _text(x)]
    assert len(answers) == 1

    # A mail the route does not match notifies nobody but the owner.
    await _customer(env, subject="Invoice question", body="Where is my invoice?\n")
    assert len(env.sent_to("carol@example.com")) == 1


# ---------------------------------------------------------------------- handover pack


async def _history(env: Env) -> str:
    """A ticket with an original request (photo attached), a staff answer (manual attached),
    an internal note and a second customer message re-sending the same photo."""
    ref = await _customer(env, body="Hello,\nthe printer is on fire.\nPat\n", attach=PHOTO)
    env.clock.advance(timedelta(minutes=10))
    await _staff(env, ref, "alice", "#note\nPat is a VIP, be gentle.\n")
    env.clock.advance(timedelta(minutes=10))
    await _staff(env, ref, "alice", "Please unplug it, manual attached.\nAlice\n", attach=MANUAL)
    env.clock.advance(timedelta(minutes=10))
    await _customer(env, ref=ref, body="Unplugged, still smoking. Photo again.\n", attach=PHOTO)
    return ref


def _assert_pack(pack: Captured, ref: str) -> None:
    text = _text(pack)
    order = [
        "CUSTOMER MESSAGE from pat@customer.example",
        "the printer is on fire.",
        "INTERNAL NOTE by Alice Martin (not sent to the customer)",
        "Pat is a VIP, be gentle.",
        "STAFF ANSWER by Alice Martin (sent to the customer)",
        "Please unplug it, manual attached.",
        "CUSTOMER MESSAGE from pat@customer.example",
        "Unplugged, still smoking. Photo again.",
    ]
    at = 0
    for fragment in order:
        found = text.find(fragment, at)
        assert found >= 0, (fragment, text)
        at = found + len(fragment)
    assert "AUTOMATIC ACKNOWLEDGEMENT" in text
    assert "same file as in message 1, attached once" in text
    assert "2 distinct file(s), 2 attached below, each once" in text
    # Every attachment once.
    assert sorted(_files(pack)) == sorted([("photo.pdf", PHOTO), ("manual.pdf", MANUAL)])
    assert pack.null_sender
    assert pack.message()["Auto-Submitted"] == "auto-generated"
    assert f"[{ref}]" in str(pack.message()["Subject"])


async def test_assign_hands_over_the_whole_history(env: Env) -> None:
    ref = await _history(env)
    t = env.ticket(ref)
    assert t.id is not None
    before = len(env.relay.messages)
    # Carol (the manager) moves Alice's ticket to Bob.
    await _staff(env, ref, "carol", "#assign bob\n")
    assert env.ticket(ref).owner == "bob"
    new = env.relay.messages[before:]
    [pack] = [m for m in new if m.rcpt_tos == ["bob@example.com"]]
    _assert_pack(pack, ref)
    assert "Carol Diaz assigned" in _text(pack)
    claim = env.gw.signer.parse_reply_address(str(pack.message()["Reply-To"]))
    assert claim is not None
    assert (claim.ticket_id, claim.person) == (t.id, "bob")
    # The previous holder is told who has it now.
    [told] = [m for m in new if m.rcpt_tos == ["alice@example.com"]]
    assert "Now held by Bob Stone" in str(told.message()["Subject"])
    assert "is now held by Bob Stone <bob@example.com>" in _text(told)
    # Carol gets her confirmation; the customer nothing.
    assert [m.rcpt_tos for m in new if m not in (pack, told)] == [["carol@example.com"]]
    events = [e["type"] for e in ticket_json(env.gw, ref)["events"]]
    assert events.count("handover") == 1


async def test_escalation_assign_step_hands_over_the_whole_history(env: Env) -> None:
    ref = await _history(env)
    due = ticket_json(env.gw, ref)["deadlines"]["next_response"]
    assert due is not None
    # The standard ladder: at the breach the owner is told, an hour later the backup (Bob)
    # takes the ticket.
    moment = datetime.fromisoformat(due.replace("Z", "+00:00"))
    env.clock.set(moment)
    await env.process()
    before = len(env.relay.messages)
    env.clock.set(moment + timedelta(hours=1))
    await env.process()
    assert env.ticket(ref).owner == "bob"
    new = env.relay.messages[before:]
    [pack] = [m for m in new if m.rcpt_tos == ["bob@example.com"]]
    assert "escalated to you" in str(pack.message()["Subject"])
    assert "is now yours (escalation step 2 of 3)" in _text(pack)
    _assert_pack(pack, ref)
    [told] = [m for m in new if m.rcpt_tos == ["alice@example.com"]]
    assert "is now held by Bob Stone" in _text(told)
    assert "step 2 of 3 gave it to Bob Stone" in _text(told)
    assert "is now yours" not in _text(told)


# ---------------------------------------------------------------------- sla upcoming


async def test_sla_upcoming_marks_a_waiting_ticket_paused(env: Env) -> None:
    waiting = await _customer(env, subject="Waiting one")
    running = await _customer(env, subject="Running one")
    await _staff(env, waiting, "alice", "#waiting\n")
    assert env.ticket(waiting).status == "waiting"
    at = (env.clock.now() + timedelta(minutes=5)).isoformat()
    r = _cli(env, "sla", "upcoming", "--within", "6d", "--at", at, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mine = [x for x in rows if x["ref"] == waiting]
    assert {x["clock"] for x in mine} == {"first_response", "resolution"}
    for x in mine:
        assert x["paused"] is True, x
        assert x["state"] == "paused", x
        assert x["paused_reason"] == "waiting on customer"
        assert x["overdue"] is False
        assert x["remaining"]  # the budget left when the customer writes
    first = next(x for x in mine if x["clock"] == "first_response")
    assert first["remaining"] == "4h"  # paused at once: the whole 4 business hours are left
    others = [x for x in rows if x["ref"] == running]
    assert others
    assert all(x["paused"] is False and x["state"] == "due" for x in others)

    text = _cli(env, "sla", "upcoming", "--within", "6d", "--at", at)
    assert text.returncode == 0, text.stderr
    [line] = [ln for ln in text.stdout.splitlines() if waiting in ln and "first_response" in ln]
    assert "paused (waiting on customer)" in line
    assert "4h left" in line
    assert "due" not in line.split("first_response", 1)[1].split("4h left")[0]


# ---------------------------------------------------------------------- durations


async def test_snooze_2d_on_a_friday_wakes_on_tuesday(env: Env) -> None:
    env.clock.set(FRIDAY)
    ref = await _customer(env)
    await _staff(env, ref, "alice", "#snooze 2d\n")
    t = env.ticket(ref)
    # Two working days of the ticket's calendar (Berlin, Mon-Fri 09-17), as "2d" in the
    # rules: Friday 11:00 -> Tuesday 11:00 Berlin, not Sunday.
    assert t.snoozed_until is not None
    assert t.snoozed_until.replace(tzinfo=UTC) == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    [done] = [m for m in env.sent_to("alice@example.com") if "Done:" in str(m.message()["Subject"])]
    assert "2026-12-01T10:00:00Z" in _text(done)


async def test_within_counts_business_time(env: Env) -> None:
    # Created Friday 13:30 Berlin: 4 business hours -> due Monday 09:30 Berlin (08:30Z).
    env.clock.set(datetime(2026, 11, 27, 12, 30, tzinfo=UTC))
    ref = await _customer(env)
    due = ticket_json(env.gw, ref)["deadlines"]["first_response"]
    assert due == "2026-11-30T08:30:00Z"
    # Friday 16:30 Berlin: one business hour reaches Monday 09:30 (30 min + 30 min).
    at = datetime(2026, 11, 27, 15, 30, tzinfo=UTC).isoformat()
    r = _cli(env, "sla", "upcoming", "--within", "1h", "--at", at, "--json")
    assert r.returncode == 0, r.stderr
    assert [(x["ref"], x["clock"]) for x in json.loads(r.stdout)] == [(ref, "first_response")]
    r = _cli(env, "sla", "upcoming", "--within", "59m", "--at", at, "--json")
    assert json.loads(r.stdout) == []
