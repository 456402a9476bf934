"""docs/decisions.md D12, pure parts: the known-customer match and merge redirects in
`thread.decide`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.pipeline.conversation import Candidate, match_known_customer
from gateway.pipeline.parse import parse
from gateway.pipeline.thread import TicketView, decide
from gateway.routing.engine import evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import load_rules
from gateway.security.tokens import Signer
from tests.unit.test_thread_decide import PAT, Store

SIGNER = Signer(b"unit-test-secret-key-0123456789abcdef")
OPEN = [
    Candidate(1, "ACME-1000", "my refund is still missing"),
    Candidate(2, "ACME-1001", "order 4711 not delivered"),
]


def test_same_subject_ignores_prefixes_case_and_punctuation() -> None:
    hit = match_known_customer("Fwd: My refund is still MISSING!!", "", OPEN, "ACME")
    assert hit is not None
    assert hit[0].ref == "ACME-1000"
    assert "same subject as the open request ACME-1000" in hit[1]


def test_an_explicit_reference_to_an_own_ticket_wins() -> None:
    hit = match_known_customer("Refund???", "About ACME-1001 again\n", OPEN, "ACME")
    assert hit is not None
    assert hit[0].ref == "ACME-1001"
    assert "text names" in hit[1]


def test_other_subjects_and_foreign_refs_do_not_join() -> None:
    assert match_known_customer("Refund???", "see ACME-1042", OPEN, "ACME") is None
    assert match_known_customer("", "", [Candidate(3, "ACME-1002", "")], "ACME") is None


def test_every_key_of_a_merged_ticket_reaches_the_target() -> None:
    store = Store()
    store.tickets[7] = TicketView(7, "ACME-1006", "closed")  # merged, so closed
    store.tickets[9] = TicketView(9, "ACME-1008", "open")
    store.participants[9] = {PAT}

    def merged_into(tid: int) -> TicketView | None:
        return store.tickets[9] if tid == 7 else None

    token = SIGNER.reply_address("support", "example.com", 7)
    ours = SIGNER.message_id("mx.example.com", 7, "ack")
    cases = [
        ("support@example.com", "Re: [ACME-1006] hi", None),
        (token, "hi", None),
        ("support@example.com", "hi", ours),
        ("support@example.com", "hi", "<orig@customer.example>"),
    ]
    for rcpt, subject, irt in cases:
        head = f"From: {PAT}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: <m@x>\r\n"
        if irt:
            head += f"In-Reply-To: {irt}\r\n"
        d = decide(
            parse((head + "\r\nbody\r\n").encode()),
            sender=PAT,
            recipients=[rcpt],
            dedupe_key="k",
            signer=SIGNER,
            lookup=store,
            ref_prefix="ACME",
            merged_into=merged_into,
        )
        assert d.ticket is not None, (rcpt, subject, irt)
        assert d.ticket.ref == "ACME-1008", (rcpt, subject, irt)
        assert not d.reopen
        assert d.redirected_from is not None
        assert "ACME-1006 was merged into ACME-1008: redirected" in d.detail
        if d.claim is not None:
            assert d.claim.ticket_id == 9


def test_a_route_overrides_the_known_customer_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit import test_rules_loader as rl

    monkeypatch.chdir(tmp_path)
    routes = rl.edit(
        rl.ROUTES, 'tags = ["billing"]', 'tags = ["billing"]\nknown_customer = "separate"'
    )
    rules = load_rules(rl.write({"routes.toml": routes}))
    facts = MessageFacts(
        recipients=("billing@example.com",), sender=PAT, subject="Refund", body="",
        headers=(), authenticated=False, has_attachment=False,
    )  # fmt: skip
    at = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert evaluate(rules, facts, at).known_customer == "separate"
    other = MessageFacts(
        recipients=("support@example.com",), sender=PAT, subject="Hi", body="",
        headers=(), authenticated=False, has_attachment=False,
    )  # fmt: skip
    assert evaluate(rules, other, at).known_customer is None
    bad = rl.edit(rl.ROUTES, 'tags = ["billing"]', 'tags = ["billing"]\nknown_customer = "merge"')
    (tmp_path / "rules").rename(tmp_path / "old")
    assert any("known_customer" in p for p in rl.problems({"routes.toml": bad}))
