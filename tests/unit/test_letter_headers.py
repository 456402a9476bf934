"""The public header helpers every letter uses (gateway/letters/headers.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.letters import headers
from gateway.letters.brands import Identity


def test_references_keep_the_last_ten_then_the_parent_once() -> None:
    earlier = [f"<{n}@x>" for n in range(15)]
    refs = headers.trim_references("<p@x>", [*earlier, "<p@x>"]).split()
    assert refs == [*earlier[-10:], "<p@x>"]
    assert headers.trim_references("<p@x>") == "<p@x>"
    assert headers.trim_references(None, earlier) == ""


def test_thread_headers_only_with_a_parent() -> None:
    msg = headers.new_message()
    headers.set_thread(msg, None, ["<a@x>"])
    assert msg["In-Reply-To"] is None
    assert msg["References"] is None
    headers.set_thread(msg, "<p@x>", ["<a@x>"])
    assert (msg["In-Reply-To"], msg["References"]) == ("<p@x>", "<a@x> <p@x>")


def test_base_headers_mark_automatic_mail_and_our_loop() -> None:
    me = Identity("b2", "help@b2.example", "B2 Support", "", "", "help", "b2.example", "b2")
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.brand_from(me),
        to="pat@customer.example",
        subject=headers.tagged_subject("ACME-1", "  Hello\n  there "),
        message_id="<id@b2.example>",
        now=datetime(2026, 11, 23, 12, tzinfo=UTC),
        auto_submitted=headers.AUTO_GENERATED,
        loop="install-1",
    )
    assert msg["From"] == "B2 Support <help@b2.example>"
    assert msg["Subject"] == "[ACME-1] Hello there"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg[headers.LOOP_HEADER] == "install-1"
    assert headers.brand_from(me, "Alice via B2") == "Alice via B2 <help@b2.example>"


def test_tagged_subject_does_not_double_the_reference() -> None:
    assert headers.tagged_subject("ACME-1", "Re: [acme-1] Hi") == "Re: [acme-1] Hi"
    assert headers.tagged_subject("ACME-1", "") == "[ACME-1] (no subject)"
    assert headers.split_address("help+tag@b2.example") == ("help", "b2.example")
