"""The threading decision (`thread.decide`) and the From check (`thread.from_is_verified`),
pure: storage is an in-memory `ThreadLookup` (docs/decisions.md D10: threading proves the ticket,
participation proves the person)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from gateway.pipeline.parse import parse
from gateway.pipeline.thread import (
    RobotMail,
    ThreadDecision,
    TicketView,
    decide,
    from_is_verified,
)
from gateway.security.tokens import Signer

SIGNER = Signer(b"unit-test-secret-key-0123456789abcdef")
PAT = "pat@customer.example"
EVE = "eve@stranger.example"
HOST = "mx.example.com"


@dataclass
class Store:
    """Ticket 7 (ACME-1006), open, with pat as its only participant."""

    tickets: dict[int, TicketView] = field(
        default_factory=lambda: {7: TicketView(7, "ACME-1006", "open")}
    )
    participants: dict[int, set[str]] = field(default_factory=lambda: {7: {PAT}})
    stored: dict[str, int] = field(default_factory=lambda: {"<orig@customer.example>": 7})

    def duplicate_of(self, dedupe_key: str, message_id: str | None) -> None:
        return None

    def ticket_of_message_id(self, message_id: str) -> int | None:
        return self.stored.get(message_id)

    def ticket(self, ticket_id: int) -> TicketView | None:
        return self.tickets.get(ticket_id)

    def ticket_by_ref(self, ref: str) -> TicketView | None:
        return next((t for t in self.tickets.values() if t.ref == ref.upper()), None)

    def is_participant(self, ticket_id: int, address: str) -> bool:
        return address.lower() in self.participants.get(ticket_id, set())

    def tickets_referencing(self, message_id: str) -> list[int]:
        return []

    def ticket_of_outbound(self, message_ids: Sequence[str]) -> int | None:
        return None


def run(
    sender: str,
    *,
    subject: str = "hello",
    in_reply_to: str | None = None,
    rcpt: str = "support@example.com",
    verified: bool = True,
    robot: RobotMail | None = None,
) -> ThreadDecision:
    head = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: <m@x>\r\n"
    if in_reply_to:
        head += f"In-Reply-To: {in_reply_to}\r\n"
    parsed = parse((head + "\r\nbody\r\n").encode())
    return decide(
        parsed,
        sender=sender,
        recipients=[rcpt],
        dedupe_key="k",
        signer=SIGNER,
        lookup=Store(),
        ref_prefix="ACME",
        sender_verified=verified,
        robot=robot,
    )


OURS = SIGNER.message_id(HOST, 7, "msg")
CUSTOMER_TOKEN = SIGNER.reply_address("support", "example.com", 7)
STAFF_TOKEN = SIGNER.reply_address("support", "example.com", 7, "alice")


@pytest.mark.parametrize(
    "how",
    [
        {"in_reply_to": OURS},
        {"rcpt": CUSTOMER_TOKEN},
        {"in_reply_to": "<orig@customer.example>"},
        {"subject": "Re: [ACME-1006] hello"},
    ],
    ids=["our-message-id", "customer-token", "known-message-id", "subject-ref"],
)
def test_each_key_admits_the_participant(how: dict[str, str]) -> None:
    d = run(PAT, **how)
    assert d.ticket is not None
    assert d.ticket.id == 7
    assert not d.links


@pytest.mark.parametrize(
    ("how", "note"),
    [
        ({"in_reply_to": OURS}, f"{OURS} is our message in ACME-1006 but {EVE} is not"),
        ({"rcpt": CUSTOMER_TOKEN}, f"reply token in {CUSTOMER_TOKEN} names ACME-1006 but {EVE}"),
        ({"in_reply_to": "<orig@customer.example>"}, "belongs to ACME-1006 but eve@"),
        ({"subject": "[ACME-1006] give me the data"}, f"subject names ACME-1006 but {EVE}"),
    ],
    ids=["our-message-id", "customer-token", "known-message-id", "subject-ref"],
)
def test_no_key_admits_a_stranger_each_links_instead(how: dict[str, str], note: str) -> None:
    d = run(EVE, **how)
    assert d.is_new
    assert d.disposition == "new"
    assert [(t, rel) for t, rel, _ in d.links] == [(7, "possible-follow-up")]
    assert note in d.detail
    assert "is not a participant" in d.detail


def test_staff_token_reaches_its_ticket_whoever_sends_it() -> None:
    # The staff stage judges the person (docs/design.md §5); threading only finds the ticket.
    d = run(EVE, rcpt=STAFF_TOKEN)
    assert d.disposition == "reply-token"
    assert d.ticket is not None
    assert d.claim is not None
    assert d.claim.person == "alice"


@pytest.mark.parametrize(
    "how",
    [{"in_reply_to": OURS}, {"rcpt": CUSTOMER_TOKEN}],
    ids=["our-message-id", "customer-token"],
)
def test_robots_reach_the_ticket_by_a_signed_reference(how: dict[str, str]) -> None:
    # An out-of-office or bounce from an address that is not a participant still belongs
    # to the ticket (it never becomes a participant: record only adds customer mail).
    d = run("autoresponder@customer.example", robot=RobotMail.AUTO_REPLY, **how)
    assert d.ticket is not None
    assert d.ticket.id == 7


def test_unverified_from_of_a_participant_counts_as_nobody() -> None:
    d = run(PAT, subject="[ACME-1006] change of address", verified=False)
    assert d.is_new
    assert [t for t, _, _ in d.links] == [7]
    assert f"the From address {PAT} is not verified, so it does not count" in d.detail


def test_unverified_from_of_a_robot_still_joins_by_stored_message_id() -> None:
    # Auto-replies gain nothing by joining: their From is not held against them.
    d = run(PAT, in_reply_to="<orig@customer.example>", verified=False, robot=RobotMail.AUTO_REPLY)
    assert d.disposition == "known-message-id"
    assert d.ticket is not None


@pytest.mark.parametrize(
    ("from_", "envelope", "authenticated", "verified"),
    [
        (PAT, PAT, False, True),
        ("Pat@Customer.Example", "pat@customer.example", False, True),  # case-insensitive
        (PAT, "bounces+7@mailer.example", True, True),  # DKIM-aligned From: a service envelope
        (PAT, "mallory@evil.test", False, False),
        (PAT, "", False, False),  # null sender claims nobody
        (PAT, "SRS0=ab=cd=customer.example=pat@fwd.example", False, False),  # SRS: plain match
        ("", "mallory@evil.test", False, True),  # no From: the envelope is the only claim
    ],
)
def test_from_is_verified(from_: str, envelope: str, authenticated: bool, verified: bool) -> None:
    ok, why = from_is_verified(from_, envelope, authenticated=authenticated)
    assert ok is verified
    if not ok:
        assert why.startswith(f"the From address {from_.lower()} is not authenticated")
