"""One customer, one conversation (docs/decisions.md D12), end to end over SMTP at the capture
relay.

Each finding of the issue is a story here, failing on the code before docs/decisions.md D12:

1. a customer's new mails no longer multiply tickets, acknowledgements and owner pages: the
   same subject joins the open ticket, the first mail is acknowledged at once, the others
   of a burst get ONE acknowledgement (and the owner ONE notification with every full text)
   when ``outbound.ack_window`` closes; the ack reaching the daily cap says so honestly;
2. ``#merge`` redirects for good: a reply to the merged ticket's acknowledgement lands in
   the target, the merged ticket stays closed, both owners are told;
3. ``customers merge`` lists their open tickets to their owners as possible duplicates,
   and ``#merge`` on one closes the loop;
4. ``tickets list --customer`` and ``customers show`` (CLI, JSON).

The real daemon (in-process, FrozenClock) runs its own stages; the test drives the pipeline,
the bundle worker and the delivery worker by hand and moves the clock to close windows.
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
from gateway.outbound.worker import DeliveryWorker
from gateway.store.models import Ticket
from tests.conftest import RULES, make_settings
from tests.support.cli import run as run_cli
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json
from tests.support.relay import Captured, CaptureRelay

PAT = "pat@customer.example"
JO = "jo@other.example"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    cfg: Path

    async def process(self) -> None:
        """Pipeline, then the bundle worker (windows that closed), then delivery."""
        await self.gw.pipeline.run_once()
        await self.gw.bundler.run_once()
        await self.worker.run_once()

    async def mail(self, **kw: object) -> EmailMessage:
        m = make_mail(**kw)  # type: ignore[arg-type]
        await send(self.gw, m)
        await self.process()
        return m

    def to(self, address: str) -> list[Captured]:
        return [m for m in self.relay.messages if address in m.rcpt_tos]

    def ticket(self, ref: str) -> Ticket:
        with Session(self.gw.engine) as s:
            t = s.exec(select(Ticket).where(Ticket.ref == ref)).one()
            s.expunge(t)
            return t

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["--config", str(self.cfg), *args])


@pytest.fixture
async def env(
    tmp_path: Path, clock: FrozenClock, relay: CaptureRelay, database_url: str
) -> AsyncIterator[Env]:
    """The gateway on SQLite and on PostgreSQL (bundle queries lock rows there)."""
    settings = make_settings(
        tmp_path,
        storage={"database_url": database_url, "spool_dir": str(tmp_path / "spool")},
        outbound={"relay": f"127.0.0.1:{relay.port}", "from_name": "Example Support"},
        # Unsigned test mail from staff is accepted on the token (docs/staff-email.md).
        security={
            "secret_key": "test-secret-key-0123456789abcdef",
            "staff_token_only_domains": ["example.com"],
        },
    )
    cfg = tmp_path / "cli.toml"
    cfg.write_text(
        f'rules_dir = "{RULES}"\n'
        '[smtp]\nlisten = "127.0.0.1:0"\nhostname = "mx.example.com"\n'
        'domains = ["example.com", "localhost"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "{database_url}"\n'
        f'spool_dir = "{tmp_path}/cli-spool"\n'
        '[outbound]\nfrom_address = "support@example.com"\n'
        '[security]\nsecret_key = "test-secret-key-0123456789abcdef"\nverify_senders = false\n'
    )
    async with running_gateway(settings, clock) as gw:
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        yield Env(gw, worker, relay, clock, cfg)


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def _events(env: Env, ref: str, type_: str) -> list[str]:
    return [e["detail"] for e in ticket_json(env.gw, ref)["events"] if e["type"] == type_]


async def _staff(env: Env, ref: str, person: str, body: str, *, notice: Captured) -> None:
    """A staff member replies to the Reply-To of a notification they got."""
    to = str(notice.message()["Reply-To"])
    m = EmailMessage()
    m["From"] = f"{person}@example.com"
    m["To"] = to
    m["Subject"] = f"Re: [{ref}] whatever"
    m["Message-ID"] = make_msgid(domain="example.com")
    m.set_content(body)
    await send(env.gw, m, sender=f"{person}@example.com", recipients=[to])
    await env.process()


# ---------------------------------------------------------------- finding 1: the night


async def test_a_night_of_new_mails_is_one_conversation(env: Env) -> None:
    # 23:00 Pat writes; acknowledged and notified at once.
    await env.mail(sender=PAT, subject="My refund is still missing", body="Order 4711.\n")
    [first] = all_tickets(env.gw)
    assert len(env.to(PAT)) == 1
    assert len(env.to("alice@example.com")) == 1

    # Within the next minute: the same subject twice (not replies) and a new one.
    env.clock.advance(timedelta(seconds=20))
    await env.mail(sender=PAT, subject="My refund is still missing!", body="Hello??\n")
    env.clock.advance(timedelta(seconds=20))
    await env.mail(sender=PAT, subject="Refund???", body="Where is my money?\n")
    env.clock.advance(timedelta(seconds=20))
    await env.mail(sender=PAT, subject="Fwd: My refund is still missing", body="Third try.\n")

    tickets = all_tickets(env.gw)
    assert [t.ref for t in tickets] == [first.ref, "ACME-1001"], "same subject joins"
    second = tickets[1]
    # Nothing more went out yet: the window after the first ack is still open.
    assert len(env.to(PAT)) == 1
    assert len(env.to("alice@example.com")) == 1
    joined = _events(env, first.ref, "threaded")
    assert len(joined) == 2, joined
    assert all(d.startswith("known-customer: ") for d in joined), joined
    assert "same subject as the open request ACME-1000" in joined[0]
    assert len(_events(env, first.ref, "ack-bundled")) == 2
    assert {"ref": first.ref, "relation": "same-customer"} in ticket_json(env.gw, second.ref)[
        "links"
    ]

    # The window closes: ONE acknowledgement for the three, ONE notification with each text.
    env.clock.advance(timedelta(minutes=2))
    await env.process()
    acks = env.to(PAT)
    notes = env.to("alice@example.com")
    assert len(acks) == 2, [str(m) for m in env.relay.messages]
    assert len(notes) == 2, [str(m) for m in env.relay.messages]
    text = _text(acks[1])
    assert "3 more messages" in text
    assert '"Refund???"' in text
    assert f"opened your new request {second.ref}" in text
    assert text.count(f"added to your open request {first.ref}") == 2
    # Deadlines are the stored ones.
    stored = ticket_json(env.gw, second.ref)["deadlines"]["first_response"]
    assert "Alice Martin is looking after it, first answer by" in text
    assert stored in text
    assert env.gw.signer.ticket_from_message_id(acks[1].message()["Message-ID"]) is not None
    note = _text(notes[1])
    for body in ("Hello??", "Where is my money?", "Third try."):
        assert body in note, note
    assert env.ticket(second.ref).acknowledged

    # Jo writes twice about one order, far apart: one ticket, and she is told where it went.
    env.clock.advance(timedelta(minutes=10))
    await env.mail(sender=JO, subject="Order 4711 not delivered", body="Jo here.\n")
    env.clock.advance(timedelta(minutes=30))
    await env.mail(sender=JO, subject="order 4711 not delivered", body="Any news?\n")
    assert len(all_tickets(env.gw)) == 3
    jo = env.to(JO)
    assert len(jo) == 2
    assert "added to your open request ACME-1002" in _text(jo[1])


async def test_the_ack_that_reaches_the_cap_says_so(env: Env) -> None:
    env.gw.settings.outbound.daily_ack_cap = 3
    for n in range(5):  # five different requests, each outside the window
        await env.mail(sender=PAT, subject=f"Question {n}", body=f"Question number {n}\n")
        env.clock.advance(timedelta(minutes=5))
    acks = env.to(PAT)
    assert len(acks) == 3, [str(m) for m in acks]
    last = _text(acks[2])
    assert "This is our last automatic confirmation to you today" in last
    assert "still received and filed" in last
    assert "ACME-1000" in last
    # The second one lists the first request: the customer always sees what is open.
    assert "Your other open requests with us:" in _text(acks[1])
    assert "ACME-1000" in _text(acks[1])
    assert len(all_tickets(env.gw)) == 5  # every mail is still filed


# ------------------------------------------------------------ finding 2: #merge redirects


async def test_merge_redirects_replies_to_the_target_for_good(env: Env) -> None:
    await env.mail(sender=PAT, subject="Printer on fire", body="It burns.\n")
    env.clock.advance(timedelta(minutes=10))
    await env.mail(
        sender=PAT, to="billing@example.com", subject="Invoice for the printer", body="Bill?\n"
    )
    [a, b] = all_tickets(env.gw)
    assert (a.owner, b.owner) == ("alice", "bob")
    ack_b = env.to(PAT)[-1]
    assert env.gw.signer.ticket_from_message_id(ack_b.message()["Message-ID"]) == b.id
    [note_b] = env.to("bob@example.com")

    await _staff(env, b.ref, "bob", f"#merge {a.ref}\n", notice=note_b)
    assert env.ticket(b.ref).status == "closed"
    told = [m for m in env.to("alice@example.com") if "merged into your ticket" in str(m)]
    assert len(told) == 1
    assert "Bill?" in _text(told[0])

    # Pat replies to B's acknowledgement: token, In-Reply-To and [ACME-1001] all name B.
    env.clock.advance(timedelta(hours=1))
    ack = ack_b.message()
    reply = make_mail(
        sender=PAT,
        to=str(ack["Reply-To"]),
        subject=f"Re: {ack['Subject']}",
        in_reply_to=str(ack["Message-ID"]),
        references=[str(ack["Message-ID"])],
        body="Any news on the bill?\n",
    )
    alice_before = len(env.to("alice@example.com"))
    await send(env.gw, reply, recipients=[str(ack["Reply-To"])])
    await env.process()
    assert env.ticket(b.ref).status == "closed", "the merged ticket never reopens"
    da = ticket_json(env.gw, a.ref)
    assert any(m["subject"].startswith("Re:") for m in da["messages"] if m["merged_from"] is None)
    merged = [m for m in da["messages"] if m["merged_from"] == b.ref]
    assert any(m["subject"] == "Invoice for the printer" for m in merged), da["messages"]
    assert "was merged into" in _events(env, a.ref, "threaded")[-1]
    assert _events(env, b.ref, "merge-redirected")
    assert len(env.to("alice@example.com")) == alice_before + 1  # the target's owner
    assert not _events(env, b.ref, "reopened")


# ----------------------------------------------- finding 3 and 4: customers merge, CLI


async def test_customer_merge_surfaces_duplicates_and_merge_closes_the_loop(env: Env) -> None:
    await env.mail(sender=PAT, subject="Printer on fire", body="At work.\n")
    await env.mail(
        sender="pat@home.example", to="billing@example.com", subject="Printer", body="Home.\n"
    )
    [a, b] = all_tickets(env.gw)

    r = env.cli("customers", "merge", "pat@home.example", PAT)
    assert r.returncode == 0, r.stderr
    assert "possible duplicate" in r.stdout
    # The CLI runs on the wall clock: move the frozen one past it so the notices are due.
    env.clock.set(datetime.now(UTC) + timedelta(minutes=1))
    await env.process()
    dup_a = [m for m in env.to("alice@example.com") if "Possible duplicate" in str(m)]
    dup_b = [m for m in env.to("bob@example.com") if "Possible duplicate" in str(m)]
    assert len(dup_a) == 1
    assert len(dup_b) == 1
    assert f"#merge {a.ref}" in _text(dup_b[0])
    assert "Alice Martin" in _text(dup_b[0])
    assert {"ref": a.ref, "relation": "possible-duplicate"} in ticket_json(env.gw, b.ref)["links"]

    # Finding 4: one customer, every address, every ticket.
    r = env.cli("tickets", "list", "--customer", "pat@home.example", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(t["ref"] for t in json.loads(r.stdout)) == [a.ref, b.ref]
    r = env.cli("customers", "show", PAT, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert {x["address"] for x in shown["addresses"]} == {PAT, "pat@home.example"}
    assert shown["open_tickets"] == 2
    assert len(shown["merges"]) == 1
    assert env.cli("customers", "show", "nobody@nowhere.example").returncode == 1

    # Bob closes the loop from his notification.
    await _staff(env, b.ref, "bob", f"#merge {a.ref}\n", notice=dup_b[0])
    assert env.ticket(b.ref).status == "closed"
    assert _events(env, a.ref, "duplicate-resolved")
    r = env.cli("customers", "show", PAT, "--json")
    assert json.loads(r.stdout)["open_tickets"] == 1


async def test_another_customers_first_mail_is_not_held_in_a_bundle(env: Env) -> None:
    await env.mail(sender=PAT, subject="Printer on fire", body="One.\n")
    env.clock.advance(timedelta(seconds=30))
    await env.mail(sender=PAT, subject="Scanner too", body="Two.\n")  # bundled for Alice
    assert len(env.to("alice@example.com")) == 1
    await env.mail(sender=JO, subject="Login broken", body="Jo.\n")  # Jo's first: at once
    notes = env.to("alice@example.com")
    assert len(notes) == 2
    assert "Jo." in _text(notes[1])
    assert len(env.to(JO)) == 1
    env.clock.advance(timedelta(minutes=2))
    await env.process()
    notes = env.to("alice@example.com")
    assert len(notes) == 3
    assert "Two." in _text(notes[2])
    assert "Jo." not in _text(notes[2])


# ----------------------------------------------- a new customer's reads from memory (fresh)

#: Reads the pipeline answers from memory for a customer its own transaction inserted
#: (gateway/store/fresh.py): what each statement would have looked up.
FRESH_READS = {
    "customers merged into it": "merged_into_id IN",
    "its tickets": "WHERE ticket.customer_id IN",
    "its earlier tickets": "WHERE ticket.customer_id = ",
    "mail about its tickets": "WHERE outbox.ticket_id IN",
    "its open bundles": "FROM bundle_item WHERE bundle_item.purpose",
    "the new ticket to be planned": "UPDATE ticket SET escalate_at",
}


def _statements(env: Env) -> list[str]:
    from sqlalchemy import event

    seen: list[str] = []
    event.listen(
        env.gw.engine, "before_cursor_execute", lambda *a: seen.append(" ".join(a[2].split()))
    )
    return seen


async def test_a_new_customers_first_mail_reads_nothing_only_it_could_have_written(
    env: Env,
) -> None:
    seen = _statements(env)
    await env.mail(sender=PAT, subject="Printer on fire", body="One.\n")
    assert len(env.to(PAT)) == 1
    assert len(env.to("alice@example.com")) == 1
    assert any("INSERT INTO customer " in s for s in seen), seen
    for what, fragment in FRESH_READS.items():
        assert not [s for s in seen if fragment in s], what
    # A known customer's next mail asks the database, as before.
    seen.clear()
    env.clock.advance(timedelta(seconds=30))
    await env.mail(sender=PAT, subject="Scanner too", body="Two.\n")
    for what in ("its tickets", "its earlier tickets", "its open bundles"):
        assert [s for s in seen if FRESH_READS[what] in s], what


def _story(env: Env, address: str) -> list[tuple[str, list[str]]]:
    """Each of the customer's tickets: its subject and its event types, in order."""
    out = []
    for t in all_tickets(env.gw):
        if t.requester == address:
            events = ticket_json(env.gw, t.ref)["events"]
            out.append((t.subject.replace(address, ""), [e["type"] for e in events]))
    return out


async def test_a_new_customers_burst_in_one_transaction_is_answered_as_one_by_one(
    env: Env,
) -> None:
    """The memory must not answer when the transaction wrote what a read would find: a new
    customer's burst in ONE transaction (the pipeline under load) comes out exactly as the
    same burst processed one mail at a time: the same tickets, events, acknowledgements and
    notifications, the same bundles."""
    env.gw.pipeline.tx_budget = 60.0  # every spooled entry of a run in one transaction

    def burst(sender: str) -> list[EmailMessage]:
        first = make_mail(sender=sender, subject="My refund is still missing", body="4711.\n")
        return [
            first,
            make_mail(sender=sender, subject="Refund???", body="Where is my money?\n"),
            # A reply to their own first mail joins the owner's bundle just opened.
            make_mail(
                sender=sender,
                subject="Re: My refund is still missing",
                body="Forgot: paid by card.\n",
                in_reply_to=str(first["Message-ID"]),
            ),
            make_mail(sender=sender, subject="My refund is still missing!", body="Hello??\n"),
        ]

    for m in burst(PAT):  # Pat: one transaction each
        await send(env.gw, m)
        await env.process()
    commits: list[int] = []
    from sqlalchemy import event

    event.listen(env.gw.engine, "commit", lambda conn: commits.append(1))
    for m in burst(JO):  # Jo: the same mails, spooled first
        await send(env.gw, m)
    await env.gw.pipeline.run_once()
    assert len(commits) == 1, "the burst was not one transaction"
    await env.gw.bundler.run_once()
    await env.worker.run_once()

    assert _story(env, JO) == _story(env, PAT)
    assert len(_story(env, JO)) == 2  # the second subject opened a ticket of its own
    assert len(env.to(JO)) == len(env.to(PAT)) == 1  # the rest bundled
    notes = env.to("alice@example.com")
    assert len(notes) == 2
    assert "4711." in _text(notes[1])
    env.clock.advance(timedelta(minutes=2))
    await env.process()
    assert _story(env, JO) == _story(env, PAT)
    pat, jo = env.to(PAT), env.to(JO)
    assert len(pat) == len(jo) == 2
    assert _plain(env, JO, _text(jo[1])) == _plain(env, PAT, _text(pat[1]))


def _plain(env: Env, address: str, text: str) -> str:
    """`text` with the customer's ticket refs numbered from 1 and their address left out."""
    mine = [t.ref for t in all_tickets(env.gw) if t.requester == address]
    for n, ref in enumerate(mine, 1):
        text = text.replace(ref, f"<ticket {n}>")
    return text.replace(address, "<customer>")
