"""The message's outcome: every `Disposition` reached from the pure `thread.decide`, and the
table of stages each one selects (`stages.CHAINS`).

Storage is `MemoryLookup`, a complete in-memory implementation of the `ThreadLookup`
protocol (gateway/store/lookup.py) holding tickets, stored messages, participants and what
we sent, so each case is built from data, not from canned answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from gateway.pipeline.junk import blocked_stage, file_junk_stage
from gateway.pipeline.notify import notify_owner_stage
from gateway.pipeline.parse import parse
from gateway.pipeline.record import record, record_duplicate
from gateway.pipeline.respond import note_unanswered, respond
from gateway.pipeline.route import route
from gateway.pipeline.staff import staff_stage
from gateway.pipeline.stages import CHAINS, JUNK, PREFIX, thread_stage
from gateway.pipeline.thread import (
    Disposition,
    RobotMail,
    ThreadDecision,
    TicketView,
    decide,
    robot_mail,
)
from gateway.security.tokens import Signer
from gateway.store.lookup import ThreadLookup

SIGNER = Signer(b"unit-test-secret-key-0123456789abcdef")
HOST = "mx.example.com"
PAT = "pat@customer.example"
EVE = "eve@stranger.example"


@dataclass
class StoredMessage:
    ticket_id: int | None
    message_id: str
    dedupe_key: str = ""
    direction: str = "in"
    refs: tuple[str, ...] = ()


@dataclass
class MemoryLookup:
    """`ThreadLookup` over lists and dicts, answering as `SqlLookup` does over tables."""

    tickets: dict[int, TicketView] = field(default_factory=dict)
    participants: dict[int, set[str]] = field(default_factory=dict)
    messages: list[StoredMessage] = field(default_factory=list)
    outbox: dict[str, int] = field(default_factory=dict)  # Message-ID we sent -> ticket

    def add_ticket(self, tid: int, status: str = "open", *people: str) -> TicketView:
        view = TicketView(tid, f"ACME-{1000 + tid}", status)
        self.tickets[tid] = view
        self.participants[tid] = {p.lower() for p in people}
        return view

    def duplicate_of(
        self, dedupe_key: str, message_id: str | None
    ) -> tuple[int, int | None] | None:
        for row, m in enumerate(self.messages, 1):
            if m.dedupe_key == dedupe_key:
                return row, m.ticket_id
        for row, m in enumerate(self.messages, 1):
            if message_id and m.message_id == message_id and m.direction == "in":
                return row, m.ticket_id
        return None

    def ticket_of_message_id(self, message_id: str) -> int | None:
        return next(
            (m.ticket_id for m in self.messages if m.message_id == message_id and m.ticket_id),
            None,
        )

    def ticket(self, ticket_id: int) -> TicketView | None:
        return self.tickets.get(ticket_id)

    def ticket_by_ref(self, ref: str) -> TicketView | None:
        return next((t for t in self.tickets.values() if t.ref == ref.upper()), None)

    def is_participant(self, ticket_id: int, address: str) -> bool:
        return bool(address) and address.lower() in self.participants.get(ticket_id, set())

    def tickets_referencing(self, message_id: str) -> list[int]:
        return sorted({m.ticket_id for m in self.messages if message_id in m.refs and m.ticket_id})

    def ticket_of_outbound(self, message_ids: Sequence[str]) -> int | None:
        for mid in message_ids:
            if mid in self.outbox:
                return self.outbox[mid]
            for m in self.messages:
                if m.message_id == mid and m.direction == "out" and m.ticket_id is not None:
                    return m.ticket_id
        return None


def store() -> MemoryLookup:
    """ACME-1007 (open, pat takes part), ACME-1009 (closed, pat), one stored customer mail
    and one acknowledgement we sent on ACME-1007."""
    s = MemoryLookup()
    s.add_ticket(7, "open", PAT)
    s.add_ticket(9, "closed", PAT)
    s.messages.append(StoredMessage(7, "<orig@customer.example>", dedupe_key="stored"))
    s.outbox["<ack-7@mx.example.com>"] = 7
    return s


def run(
    lookup: MemoryLookup,
    *,
    sender: str = PAT,
    subject: str = "hello",
    in_reply_to: str | None = None,
    rcpt: str = "support@example.com",
    dedupe_key: str = "fresh",
    robot: RobotMail | None = None,
    bounced: Sequence[str] = (),
    closed_followup: str = "reopen",
) -> ThreadDecision:
    head = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: <m@x>\r\n"
    if in_reply_to:
        head += f"In-Reply-To: {in_reply_to}\r\n"
    return decide(
        parse((head + "\r\nbody\r\n").encode()),
        sender=sender,
        recipients=[rcpt],
        dedupe_key=dedupe_key,
        signer=SIGNER,
        lookup=lookup,
        ref_prefix="ACME",
        closed_followup=closed_followup,
        robot=robot,
        bounced=bounced,
    )


OURS_7 = SIGNER.message_id(HOST, 7, "ack")
OURS_GONE = SIGNER.message_id(HOST, 404, "ack")  # signed by us, for no stored ticket


def test_the_memory_lookup_implements_the_whole_protocol() -> None:
    wanted = {n for n in vars(ThreadLookup) if not n.startswith("_")}
    assert "ticket_of_outbound" in wanted
    assert wanted <= set(vars(MemoryLookup))


# ------------------------------------------------------------------ human mail


def test_duplicate() -> None:
    d = run(store(), dedupe_key="stored")
    assert d.disposition is Disposition.DUPLICATE
    assert d.duplicate_of == 1
    assert d.ticket is not None
    assert d.ticket.id == 7
    assert not d.is_new


def test_duplicate_of_robot_mail_stays_a_duplicate() -> None:
    d = run(store(), dedupe_key="stored", robot=RobotMail.BOUNCE, bounced=[OURS_7])
    assert d.disposition is Disposition.DUPLICATE


@pytest.mark.parametrize(
    ("how", "disposition"),
    [
        ({"rcpt": SIGNER.reply_address("support", "example.com", 7)}, Disposition.REPLY_TOKEN),
        ({"in_reply_to": OURS_7}, Disposition.OUR_MESSAGE_ID),
        ({"in_reply_to": "<orig@customer.example>"}, Disposition.KNOWN_MESSAGE_ID),
        ({"subject": "Re: [ACME-1007] hello"}, Disposition.SUBJECT_REF),
    ],
)
def test_each_threading_key(how: dict[str, str], disposition: Disposition) -> None:
    d = run(store(), **how)
    assert d.disposition is disposition
    assert d.ticket is not None
    assert d.ticket.id == 7
    assert not d.is_new


def test_new() -> None:
    d = run(store(), sender=EVE, subject="Re: [ACME-1007] hello")
    assert d.disposition is Disposition.NEW
    assert d.is_new
    assert d.ticket is None
    assert [(t, rel) for t, rel, _ in d.links] == [(7, "possible-follow-up")]


def test_a_human_reply_reopens_a_closed_ticket() -> None:
    d = run(store(), subject="Re: [ACME-1009] again")
    assert d.disposition is Disposition.SUBJECT_REF
    assert d.reopen


# ------------------------------------------------------------------ robot mail


def test_auto_reply_to_our_message_joins_without_reopening() -> None:
    s = store()
    s.tickets[7] = TicketView(7, "ACME-1007", "closed")
    d = run(s, sender="away@customer.example", in_reply_to=OURS_7, robot=RobotMail.AUTO_REPLY)
    # The key stays how it was matched (the audit trail says "our-message-id").
    assert d.disposition is Disposition.OUR_MESSAGE_ID
    assert d.ticket is not None
    assert d.ticket.id == 7
    assert not d.reopen


def test_unmatched_auto_reply_opens_nothing_and_links_nothing() -> None:
    # It quotes a ticket number it may not join: a human's mail would be a linked new one.
    d = run(store(), sender=EVE, subject="Automatic reply: [ACME-1007]", robot=RobotMail.AUTO_REPLY)
    assert d.disposition is Disposition.UNMATCHED_AUTO_REPLY
    assert d.ticket is None
    assert d.links == []
    assert not d.is_new


def test_unmatched_auto_reply_to_a_closed_ticket_with_closed_followup_new() -> None:
    d = run(
        store(),
        in_reply_to=SIGNER.message_id(HOST, 9, "ack"),
        robot=RobotMail.AUTO_REPLY,
        closed_followup="new",
    )
    assert d.disposition is Disposition.UNMATCHED_AUTO_REPLY
    assert d.links == []


def test_loop() -> None:
    d = run(store(), sender="support@example.com", robot=RobotMail.LOOP)
    assert d.disposition is Disposition.LOOP
    assert d.ticket is None
    assert not d.is_new


def test_our_own_mail_coming_back_to_its_ticket_joins_it() -> None:
    d = run(store(), sender="support@example.com", in_reply_to=OURS_7, robot=RobotMail.LOOP)
    assert d.disposition is Disposition.OUR_MESSAGE_ID
    assert not d.reopen


def test_bounce_joins_the_ticket_of_the_message_we_sent() -> None:
    # It quotes nothing threadable; what it reports on is in the outbox.
    d = run(
        store(),
        sender="mailer-daemon@mx.customer.example",
        robot=RobotMail.BOUNCE,
        bounced=["<ack-7@mx.example.com>"],
    )
    assert d.disposition is Disposition.BOUNCE
    assert d.ticket is not None
    assert d.ticket.id == 7
    assert not d.reopen
    assert not d.is_new


def test_bounce_by_a_signed_message_id_of_ours() -> None:
    s = store()
    s.add_ticket(11, "open")
    d = run(s, robot=RobotMail.BOUNCE, bounced=[SIGNER.message_id(HOST, 11, "n")])
    assert d.disposition is Disposition.BOUNCE
    assert d.ticket is not None
    assert d.ticket.id == 11


def test_the_reported_message_wins_over_the_references() -> None:
    s = store()
    s.add_ticket(11, "open")
    s.outbox["<notice-11@mx.example.com>"] = 11
    d = run(s, in_reply_to=OURS_7, robot=RobotMail.BOUNCE, bounced=["<notice-11@mx.example.com>"])
    assert d.disposition is Disposition.BOUNCE
    assert d.ticket is not None
    assert d.ticket.id == 11


def test_a_bounce_without_a_report_falls_back_to_its_references() -> None:
    d = run(store(), in_reply_to=OURS_7, robot=RobotMail.BOUNCE)
    assert d.disposition is Disposition.BOUNCE
    assert d.ticket is not None
    assert d.ticket.id == 7


def test_unmatched_bounce() -> None:
    d = run(store(), sender=EVE, robot=RobotMail.BOUNCE, bounced=[OURS_GONE, "<x@y>"])
    assert d.disposition is Disposition.UNMATCHED_BOUNCE
    assert d.ticket is None
    assert d.links == []
    assert not d.is_new


@pytest.mark.parametrize(
    ("kind", "envelope", "robot"),
    [
        ("auto_reply", "", RobotMail.AUTO_REPLY),  # OOF with a null reverse-path
        ("loop", "support@example.com", RobotMail.LOOP),
        ("bounce", "", RobotMail.BOUNCE),
        ("report", "abuse@isp.example", RobotMail.BOUNCE),
        ("human", "", RobotMail.BOUNCE),  # the null reverse-path is for notifications
        ("human", PAT, None),
        ("list", "list-bounces@lists.example", None),  # list mail takes part like a human
        ("robot", "noreply@shop.example", None),
    ],
)
def test_robot_mail(kind: str, envelope: str, robot: RobotMail | None) -> None:
    assert robot_mail(kind, envelope) is robot


def test_robot_mail_kind_of_the_stored_message() -> None:
    assert RobotMail.AUTO_REPLY.message_kind == "auto_reply"
    assert RobotMail.LOOP.message_kind == "auto_reply"
    assert RobotMail.BOUNCE.message_kind == "bounce"


# ------------------------------------------------------------------ the table


def test_values_are_the_words_of_the_audit_trail() -> None:
    assert [d.value for d in Disposition] == [
        "duplicate",
        "reply-token",
        "our-message-id",
        "known-message-id",
        "subject-ref",
        "new",
        "known-customer",
        "bounce",
        "unmatched-bounce",
        "unmatched-auto-reply",
        "loop",
    ]
    assert f"{Disposition.NEW}: x" == "new: x"
    assert json.dumps({"thread": Disposition.UNMATCHED_BOUNCE}) == '{"thread": "unmatched-bounce"}'


def test_every_outcome_of_decide_has_a_chain() -> None:
    # known-customer is set inside the NEW chain (the policy comes from the route).
    assert set(CHAINS) == set(Disposition) - {Disposition.KNOWN_CUSTOMER}
    assert PREFIX[-2] is thread_stage


def test_only_new_mail_is_routed_and_acknowledged() -> None:
    for disposition, chain in CHAINS.items():
        new = disposition is Disposition.NEW
        assert (route in chain) is new, disposition
        assert (respond in chain) is new, disposition


def test_robot_chains_page_nobody_and_answer_nobody() -> None:
    robots = [
        Disposition.BOUNCE,
        Disposition.UNMATCHED_BOUNCE,
        Disposition.UNMATCHED_AUTO_REPLY,
        Disposition.LOOP,
    ]
    for disposition in robots:
        chain = CHAINS[disposition]
        assert chain[0] is record, disposition
        assert not {notify_owner_stage, respond, staff_stage, blocked_stage} & set(chain)
    assert CHAINS[Disposition.BOUNCE] == (record,)
    for disposition in robots[1:]:
        assert CHAINS[disposition] == (record, note_unanswered)


def test_staff_replies_only_by_reply_token_and_duplicates_only_recorded() -> None:
    assert [d for d, chain in CHAINS.items() if staff_stage in chain] == [Disposition.REPLY_TOKEN]
    assert CHAINS[Disposition.DUPLICATE] == (record_duplicate,)
    assert list(JUNK) == [file_junk_stage]
    assert all(record_duplicate not in c for d, c in CHAINS.items() if d != "duplicate")
