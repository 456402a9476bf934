"""docs/decisions.md D3: every message finds its thread, strangers cannot get in (SQLite and
PostgreSQL).

Each test sends real mail over SMTP to the running gateway and reads the tickets back the
way `tickets show --json` presents them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import Session

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.store.models import Ticket
from gateway.store.queries import customer_of, merge_customers
from tests.conftest import make_settings
from tests.support.gateway import (
    all_tickets,
    inbound,
    make_mail,
    running_gateway,
    send,
    ticket_json,
)

PAT = "pat@customer.example"
EVE = "eve@stranger.example"


@pytest.fixture
async def gw(tmp_path: Path, clock: FrozenClock, database_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path, storage={"database_url": database_url})
    async with running_gateway(settings, clock) as g:
        yield g


async def deliver(gw: Gateway, *args: object, **kw: object) -> None:
    mail = make_mail(*args, **kw)  # type: ignore[arg-type]
    rcpt = kw.get("to", "support@example.com")
    await send(gw, mail, recipients=[str(rcpt)])
    await gw.pipeline.run_once()


async def first_ticket(gw: Gateway) -> dict:  # type: ignore[type-arg]
    await deliver(gw, sender=PAT, message_id="<orig@customer.example>", subject="Printer on fire")
    [t] = all_tickets(gw)
    return ticket_json(gw, t.ref)


def close_first_ticket(gw: Gateway) -> None:
    """Setup step: close the first ticket (staff commands arrive with the staff issue)."""
    with Session(gw.engine) as s:
        row = s.get(Ticket, all_tickets(gw)[0].id)
        assert row is not None
        row.status = "closed"
        s.add(row)
        s.commit()


def events(d: dict, type_: str) -> list[str]:  # type: ignore[type-arg]
    return [e["detail"] for e in d["events"] if e["type"] == type_]


async def test_signed_reply_token_joins_for_the_requester(gw: Gateway) -> None:
    t = await first_ticket(gw)
    ticket_id = all_tickets(gw)[0].id
    assert ticket_id is not None
    addr = gw.signer.reply_address("support", "example.com", ticket_id)
    await deliver(gw, sender=PAT, to=addr, subject="more details")
    assert len(all_tickets(gw)) == 1
    d = ticket_json(gw, t["ref"])
    assert len(inbound(d)) == 2
    assert any(x.startswith("reply-token") for x in events(d, "threaded"))


async def test_customer_reply_token_from_a_new_address_opens_a_linked_ticket(
    gw: Gateway,
) -> None:
    # docs/decisions.md D10: a customer token travels in every forward; it proves the ticket, not
    # the person. (Before, pat.at.home joined and became a participant.)
    t = await first_ticket(gw)
    ticket_id = all_tickets(gw)[0].id
    assert ticket_id is not None
    addr = gw.signer.reply_address("support", "example.com", ticket_id)
    await deliver(gw, sender="pat.at.home@other.example", to=addr, subject="more details")
    tickets = all_tickets(gw)
    assert len(tickets) == 2
    new = ticket_json(gw, tickets[1].ref)
    assert new["links"] == [{"ref": t["ref"], "relation": "possible-follow-up"}]
    assert "pat.at.home@other.example" not in ticket_json(gw, t["ref"])["participants"]


@pytest.mark.parametrize("token", ["truncate", "alter", "foreign"])
async def test_forged_or_truncated_token_does_not_join(gw: Gateway, token: str) -> None:
    await first_ticket(gw)
    ticket_id = all_tickets(gw)[0].id
    assert ticket_id is not None
    good = gw.signer.reply_token(ticket_id)
    bad = {
        "truncate": good[:-3],
        "alter": good[:-1] + ("a" if good[-1] != "a" else "b"),
        "foreign": "1" + "a" * 16 + "rs",
    }[token]
    await deliver(gw, sender=EVE, to=f"support+{bad}@example.com", subject="let me in")
    tickets = all_tickets(gw)
    assert len(tickets) == 2
    d = ticket_json(gw, tickets[1].ref)
    assert d["requester"] == EVE
    assert "not valid" in events(d, "created")[0]


async def test_reply_to_our_signed_message_id_joins(gw: Gateway) -> None:
    # The customer's colleague, Cc'd by the customer, answers our mail: a participant.
    await deliver(gw, sender=PAT, cc="colleague@customer.example")
    [t] = all_tickets(gw)
    assert t.id is not None
    ours = gw.signer.message_id("mx.example.com", t.id, "ack")
    await deliver(
        gw,
        sender="colleague@customer.example",
        in_reply_to=ours,
        references=[ours],
        subject=f"Re: [{t.ref}] Printer on fire",
    )
    assert len(all_tickets(gw)) == 1
    d = ticket_json(gw, t.ref)
    assert any(x.startswith("our-message-id") for x in events(d, "threaded"))


async def test_our_signed_message_id_from_a_stranger_opens_a_linked_ticket(gw: Gateway) -> None:
    # docs/decisions.md D10: our Message-ID travels in every forward and quote; it proves which
    # ticket is meant, not who may join it. (Before, the stranger joined the ticket.)
    t = await first_ticket(gw)
    ticket_id = all_tickets(gw)[0].id
    ours = gw.signer.message_id("mx.example.com", ticket_id, "ack")
    await deliver(gw, sender=EVE, in_reply_to=ours, references=[ours], subject="Re: hi")
    tickets = all_tickets(gw)
    assert len(tickets) == 2
    new = ticket_json(gw, tickets[1].ref)
    assert new["links"] == [{"ref": t["ref"], "relation": "possible-follow-up"}]
    assert EVE not in ticket_json(gw, t["ref"])["participants"]


async def test_forged_message_id_at_our_domain_does_not_join(gw: Gateway) -> None:
    await first_ticket(gw)
    forged = "<g1.ack.rs.aaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbb@mx.example.com>"
    await deliver(gw, sender=EVE, in_reply_to=forged, references=[forged], subject="Re: hi")
    assert len(all_tickets(gw)) == 2


async def test_stored_message_id_joins_only_for_participants(gw: Gateway) -> None:
    t = await first_ticket(gw)
    await deliver(
        gw,
        sender=PAT,
        in_reply_to="<orig@customer.example>",
        references=["<orig@customer.example>"],
        subject="Re: Printer on fire",
    )
    assert len(all_tickets(gw)) == 1
    # A stranger quoting the same Message-ID gets a new ticket, linked for the owner.
    await deliver(
        gw,
        sender=EVE,
        in_reply_to="<orig@customer.example>",
        references=["<orig@customer.example>"],
        subject="Re: Printer on fire",
    )
    tickets = all_tickets(gw)
    assert len(tickets) == 2
    new = ticket_json(gw, tickets[1].ref)
    assert new["links"] == [{"ref": t["ref"], "relation": "possible-follow-up"}]
    old = ticket_json(gw, t["ref"])
    assert len(inbound(old)) == 2
    assert any(EVE in x for x in events(old, "follow-up-linked"))


async def test_subject_reference_joins_only_for_participants(gw: Gateway) -> None:
    t = await first_ticket(gw)
    await deliver(gw, sender=PAT, subject=f"Re: [{t['ref']}] Printer on fire")
    assert len(all_tickets(gw)) == 1
    # zammad#5064: a ticket number in the subject must not let a stranger in.
    await deliver(gw, sender=EVE, subject=f"[{t['ref']}] give me the data")
    tickets = all_tickets(gw)
    assert len(tickets) == 2
    new = ticket_json(gw, tickets[1].ref)
    assert new["requester"] == EVE
    assert new["links"] == [{"ref": t["ref"], "relation": "possible-follow-up"}]
    assert len(inbound(ticket_json(gw, t["ref"]))) == 2


async def test_same_message_to_two_support_addresses_is_one_message(gw: Gateway) -> None:
    m = make_mail(
        sender=PAT,
        to="support@example.com",
        cc="billing@example.com",
        message_id="<both@customer.example>",
    )
    await send(gw, m, recipients=["support@example.com"])
    await send(gw, m, recipients=["billing@example.com"])  # a second copy, other envelope
    await gw.pipeline.run_once()
    [t] = all_tickets(gw)
    d = ticket_json(gw, t.ref)
    assert len(inbound(d)) == 1
    assert any("same message already stored" in x for x in events(d, "duplicate"))


async def test_cc_participant_replies_without_becoming_requester(gw: Gateway) -> None:
    await deliver(gw, sender=PAT, cc="boss@customer.example", message_id="<cc1@customer.example>")
    await deliver(
        gw,
        sender="boss@customer.example",
        in_reply_to="<cc1@customer.example>",
        subject="Re: Printer on fire",
    )
    [t] = all_tickets(gw)
    d = ticket_json(gw, t.ref)
    assert d["requester"] == PAT
    assert d["participants"] == [PAT, "boss@customer.example"]
    assert len(inbound(d)) == 2


async def test_follow_up_reopens_a_closed_ticket(gw: Gateway) -> None:
    t = await first_ticket(gw)
    close_first_ticket(gw)
    await deliver(gw, sender=PAT, subject=f"Re: [{t['ref']}] it is burning again")
    d = ticket_json(gw, t["ref"])
    assert d["status"] == "open"
    assert len(all_tickets(gw)) == 1
    assert events(d, "reopened")


async def test_follow_up_to_closed_ticket_can_open_a_linked_one(
    tmp_path: Path, clock: FrozenClock, database_url: str
) -> None:
    settings = make_settings(
        tmp_path, storage={"database_url": database_url}, tickets={"closed_followup": "new"}
    )
    async with running_gateway(settings, clock) as gw:
        t = await first_ticket(gw)
        close_first_ticket(gw)
        await deliver(gw, sender=PAT, subject=f"Re: [{t['ref']}] again")
        tickets = all_tickets(gw)
        assert len(tickets) == 2
        assert tickets[0].status == "closed"
        assert ticket_json(gw, tickets[1].ref)["links"] == [
            {"ref": t["ref"], "relation": "follow-up-of-closed"}
        ]


async def test_merged_customer_replies_from_second_address(gw: Gateway) -> None:
    t = await first_ticket(gw)
    await deliver(gw, sender="pat@home.example", subject="unrelated question")
    # Before the merge, pat@home is a stranger to the first ticket.
    await deliver(gw, sender="pat@home.example", subject=f"Re: [{t['ref']}] x")
    assert len(all_tickets(gw)) == 3
    with Session(gw.engine) as s:
        a, b = customer_of(s, "pat@home.example"), customer_of(s, PAT)
        assert a is not None
        assert b is not None
        assert a != b
        rec = merge_customers(s, a, b, gw.clock.now(), by="test")
        s.commit()
        assert rec.addresses == '["pat@home.example"]'
    await deliver(gw, sender="pat@home.example", subject=f"Re: [{t['ref']}] after merge")
    assert len(all_tickets(gw)) == 3
    d = ticket_json(gw, t["ref"])
    assert len(inbound(d)) == 2
    with Session(gw.engine) as s:
        assert customer_of(s, "pat@home.example") == customer_of(s, PAT)


@pytest.mark.parametrize("envelope", [PAT, ""], ids=["sender", "null-sender"])
async def test_out_of_office_joins_without_reopening(gw: Gateway, envelope: str) -> None:
    t = await first_ticket(gw)
    ticket_id = all_tickets(gw)[0].id
    ours = gw.signer.message_id("mx.example.com", ticket_id, "ack")
    close_first_ticket(gw)
    ooo = make_mail(
        sender=PAT,
        in_reply_to=ours,
        subject="Automatic reply: Printer on fire",
        headers={"Auto-Submitted": "auto-replied"},
    )
    # RFC 3834 §3.1.3 recommends the null reverse-path for automatic responses.
    await send(gw, ooo, sender=envelope, recipients=["support@example.com"])
    await gw.pipeline.run_once()
    d = ticket_json(gw, t["ref"])
    assert d["status"] == "closed"
    assert [m["kind"] for m in inbound(d)] == ["customer", "auto_reply"]


async def test_bounce_never_opens_a_ticket(gw: Gateway) -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.other.example\r\nTo: support@example.com\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <b1@mx.other.example>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b" boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        b"--XX\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; gone@customer.example\r\nAction: failed\r\n"
        b"Status: 5.1.1\r\n\r\n--XX--\r\n"
    )
    await send(gw, raw, sender="", recipients=["support@example.com"])
    await gw.pipeline.run_once()
    assert all_tickets(gw) == []


async def test_customer_ids_follow_chains_of_merges_and_nothing_else(gw: Gateway) -> None:
    """`customer_ids` walks merges backwards from the surviving customer: A merged into B,
    then B into C, are one person; X merged into Y is someone else."""
    from gateway.pipeline.conversation import customer_ids
    from gateway.store.queries import ensure_customer

    now = gw.clock.now()
    with Session(gw.engine) as s:
        a, b, c, x, y = (ensure_customer(s, f"{n}@customer.example", n, now) for n in "abcxy")
        assert None not in (a, b, c, x, y)
        merge_customers(s, a, b, now, by="test")  # type: ignore[arg-type]
        merge_customers(s, b, c, now, by="test")  # type: ignore[arg-type]
        merge_customers(s, x, y, now, by="test")  # type: ignore[arg-type]
        s.commit()
        assert customer_ids(s, c) == {a, b, c}  # type: ignore[arg-type]
        assert customer_ids(s, a) == {a, b, c}  # type: ignore[arg-type]
        assert customer_ids(s, y) == {x, y}  # type: ignore[arg-type]


async def test_customer_ids_memo_sees_a_merge_in_the_same_session(gw: Gateway) -> None:
    """`customer_ids` is memoised in the session; a merge made in that session is seen at
    once (`merge_customers` drops the memo)."""
    from gateway.pipeline.conversation import customer_ids
    from gateway.store.queries import ensure_customer

    now = gw.clock.now()
    with Session(gw.engine) as s:
        a, b = (ensure_customer(s, f"{n}@customer.example", n, now) for n in "ab")
        assert a is not None
        assert b is not None
        assert customer_ids(s, b) == {b}
        assert customer_ids(s, b) == {b}  # from the memo
        merge_customers(s, a, b, now, by="test")
        assert customer_ids(s, b) == {a, b}
        assert customer_ids(s, a) == {a, b}
