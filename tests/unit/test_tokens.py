"""Reply tokens and signed Message-IDs: round trips, tamper resistance, hostile input."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.security.tokens import MAX_TOKEN_LENGTH, MessageIdClaim, ReplyClaim, Signer

SECRET = b"k" * 32
signer = Signer(SECRET)
other = Signer(b"another secret key, same length!")

ticket_ids = st.integers(min_value=0, max_value=10**9)
persons = st.none() | st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True)
# Characters a mail system might put anywhere in a local part, plus some hostile ones.
replacement_chars = st.sampled_from(string.ascii_letters + string.digits + "._-+=/é\u0131\x00 ")


@given(ticket_ids, persons)
def test_reply_token_round_trip(ticket_id: int, person: str | None) -> None:
    token = signer.reply_token(ticket_id, person)
    assert signer.verify_reply_token(token) == ReplyClaim(ticket_id, person)
    assert len("support+" + token) <= 64
    assert token == token.lower()
    assert token.startswith("1")  # version prefix


@given(ticket_ids, persons)
def test_reply_token_survives_case_mangling(ticket_id: int, person: str | None) -> None:
    token = signer.reply_token(ticket_id, person)
    assert signer.verify_reply_token(token.upper()) == ReplyClaim(ticket_id, person)


@given(ticket_ids, persons, st.data())
def test_any_single_character_change_fails(
    ticket_id: int, person: str | None, data: st.DataObject
) -> None:
    token = signer.reply_token(ticket_id, person)
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    new = data.draw(replacement_chars.filter(lambda c: c.lower() != token[index]))
    tampered = token[:index] + new + token[index + 1 :]
    assert signer.verify_reply_token(tampered) is None


@given(ticket_ids, persons, st.data())
def test_truncated_or_extended_token_fails(
    ticket_id: int, person: str | None, data: st.DataObject
) -> None:
    token = signer.reply_token(ticket_id, person)
    cut = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    assert signer.verify_reply_token(token[:cut]) is None
    assert signer.verify_reply_token(token + data.draw(st.sampled_from("a0._-"))) is None


@given(ticket_ids, persons)
def test_token_from_another_key_fails(ticket_id: int, person: str | None) -> None:
    assert signer.verify_reply_token(other.reply_token(ticket_id, person)) is None


@given(st.text(max_size=80))
def test_verify_never_raises_on_garbage(text: str) -> None:
    assert signer.verify_reply_token(text) is None
    assert signer.parse_reply_address(text) is None
    assert signer.verify_message_id(text) is None


def test_staff_and_customer_tokens_are_distinct() -> None:
    customer = signer.reply_token(1042)
    staff = signer.reply_token(1042, "alice")
    assert customer != staff
    assert signer.verify_reply_token(staff) == ReplyClaim(1042, "alice")
    # Cutting the person off a staff token must not yield a valid customer token.
    assert signer.verify_reply_token(staff.split(".")[0]) is None
    # Grafting a person onto a customer token must not yield a staff token.
    assert signer.verify_reply_token(customer + ".alice") is None


def test_leading_zero_ticket_is_not_accepted() -> None:
    token = signer.reply_token(1042)
    mac, ticket = token[1:17], token[17:]
    assert signer.verify_reply_token("1" + mac + "0" + ticket) is None


def test_previous_key_still_verifies_after_rotation() -> None:
    rotated = Signer(b"new secret", previous=[SECRET])
    assert rotated.verify_reply_token(signer.reply_token(7)) == ReplyClaim(7, None)
    assert signer.verify_reply_token(rotated.reply_token(7)) is None


def test_invalid_arguments_raise_at_issue_time() -> None:
    with pytest.raises(ValueError, match="non-empty secret"):
        Signer(b"")
    with pytest.raises(ValueError, match="person id must match"):
        signer.reply_token(1, "Alice")  # slugs are lowercase
    with pytest.raises(ValueError, match="person id must match"):
        signer.reply_token(1, "a.b")
    with pytest.raises(ValueError, match="invalid ticket id"):
        signer.reply_token(-1)
    with pytest.raises(ValueError, match="would not fit"):
        signer.reply_token(10**30, "x" * 32)  # would not fit a local part


def test_reply_address_round_trip_and_parsing_forms() -> None:
    address = signer.reply_address("support", "example.com", 1042, "bob")
    assert re.fullmatch(r"support\+1[a-z2-7]{16}[0-9a-z]+\.bob@example\.com", address)
    claim = ReplyClaim(1042, "bob")
    assert signer.parse_reply_address(address) == claim
    assert signer.parse_reply_address(address.upper()) == claim
    assert signer.parse_reply_address(f"Example Support <{address}>") == claim
    assert signer.parse_reply_address(f"<{address}>") == claim
    assert signer.parse_reply_address("support@example.com") is None
    assert signer.parse_reply_address("support+hello@example.com") is None
    assert len(address.split("@")[0]) <= 64


def test_max_token_length_constant() -> None:
    token = signer.reply_token(10**9, "x" * 32)
    assert len(token) <= MAX_TOKEN_LENGTH


# -- Message-IDs --------------------------------------------------------------------------------


@given(st.none() | ticket_ids, st.sampled_from(["msg", "ack", "notice", "escalation"]))
def test_message_id_round_trip(ticket_id: int | None, kind: str) -> None:
    mid = signer.message_id("mx.support.example.com", ticket_id, kind)
    assert mid.startswith("<")
    assert mid.endswith("@mx.support.example.com>")
    assert signer.verify_message_id(mid) == MessageIdClaim(ticket_id, kind)
    assert signer.verify_message_id(mid[1:-1]) == MessageIdClaim(ticket_id, kind)
    assert signer.verify_message_id(f"  {mid}\r\n") == MessageIdClaim(ticket_id, kind)
    assert signer.ticket_from_message_id(mid) == ticket_id
    assert other.verify_message_id(mid) is None


def test_message_ids_are_unique() -> None:
    ids = {signer.message_id("mx.example.com", 5) for _ in range(2000)}
    assert len(ids) == 2000


@given(ticket_ids, st.data())
def test_message_id_single_change_in_left_part_fails(ticket_id: int, data: st.DataObject) -> None:
    mid = signer.message_id("mx.example.com", ticket_id)
    left_end = mid.index("@")
    index = data.draw(st.integers(min_value=1, max_value=left_end - 1))
    new = data.draw(replacement_chars.filter(lambda c: c.lower() != mid[index]))
    assert signer.verify_message_id(mid[:index] + new + mid[index + 1 :]) is None


def test_forged_message_ids_on_our_host_do_not_verify() -> None:
    real = signer.message_id("mx.example.com", 1042)
    fake_mac = real.replace(real.split(".")[4][:16], "a" * 16)
    for forged in [
        "<anything@mx.example.com>",
        "<g1.msg.t0.aaaaaaaaaaaaaaaa.aaaaaaaaaaaaaaaa@mx.example.com>",
        fake_mac,
        "<>",
        "",
        "<@>",
    ]:
        assert signer.verify_message_id(forged) is None
        assert signer.ticket_from_message_id(forged) is None


def test_reply_token_is_not_a_message_id_and_vice_versa() -> None:
    token = signer.reply_token(1)
    assert signer.verify_message_id(f"<{token}@mx.example.com>") is None
    mid = signer.message_id("mx.example.com", 1)
    assert signer.verify_reply_token(mid[1:].split("@")[0]) is None


def test_message_id_rejects_bad_arguments() -> None:
    for bad_host in ["", "a b", "x@y", "<host>"]:
        with pytest.raises(ValueError, match="invalid hostname"):
            signer.message_id(bad_host)
    with pytest.raises(ValueError, match="kind must match"):
        signer.message_id("mx.example.com", kind="Has Space")


@settings(max_examples=50)
@given(ticket_ids)
def test_message_id_without_ticket_is_valid_but_names_none(ticket_id: int) -> None:
    mid = signer.message_id("mx.example.com")
    assert signer.verify_message_id(mid) == MessageIdClaim(None, "msg")
    assert signer.ticket_from_message_id(mid) is None
    assert signer.ticket_from_message_id(signer.message_id("h", ticket_id)) == ticket_id
