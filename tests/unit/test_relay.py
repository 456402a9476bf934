"""Trust in a front MTA (gateway/security/relay.py): Received parsing and the effective client."""

from __future__ import annotations

import pytest

from gateway.security.relay import (
    effective_client,
    is_trusted_relay,
    parse_received_from,
)
from gateway.settings import ConfigError
from tests.conftest import make_settings

POSTFIX = (
    "Received: from mail.customer.example (mail.customer.example [192.0.2.10])\r\n"
    "\tby mx.example.com (Postfix) with ESMTP id 4ABCD1234\r\n"
    "\tfor <support@example.com>; Mon, 23 Nov 2026 10:00:00 +0100 (CET)\r\n"
)
FORGED_BELOW = "Received: from trusted.example (trusted.example [203.0.113.9]) by x; date\r\n"
BODY = "From: pat@customer.example\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "from mail.customer.example (mail.customer.example [192.0.2.10]) by mx",
            ("mail.customer.example", "mail.customer.example", "192.0.2.10"),
        ),
        ("from helo.example (unknown [192.0.2.11]) by mx", ("helo.example", "", "192.0.2.11")),
        (
            "from h.example (r.example [IPv6:2001:db8::1]:4455) by mx",
            ("h.example", "r.example", "2001:db8::1"),
        ),
        ("from h.example ([192.0.2.12])\r\n\tby mx", ("h.example", "", "192.0.2.12")),
        (
            "from r.example ([198.51.100.2] helo=h.example) by x",
            ("h.example", "r.example", "198.51.100.2"),
        ),
        ("by mx.example.com (Postfix, from userid 0) id X", None),
        ("from h.example (r.example [not-an-ip]) by mx", None),
    ],
)
def test_received_from_clause_is_parsed(header: str, expected: tuple[str, str, str] | None) -> None:
    assert parse_received_from(header) == expected


def _eff(peer: str, raw: str, relays: list[str], source: str = "smtp"):  # type: ignore[no-untyped-def]
    return effective_client(
        peer=peer,
        helo="mx.example.com",
        source=source,
        raw=raw.encode(),
        trusted_relays=relays,
        trusted_authserv_ids=["mx.example.com"],
    )


def test_a_trusted_relay_hands_over_the_client_it_saw() -> None:
    eff = _eff("127.0.0.1", POSTFIX + FORGED_BELOW + BODY, ["127.0.0.1/32"])
    assert (eff.client_ip, eff.helo) == ("192.0.2.10", "mail.customer.example")
    assert eff.trusted_authserv_ids == ("mx.example.com",)
    assert eff.via == "127.0.0.1"


def test_an_untrusted_client_is_judged_by_its_own_address_and_headers_are_ignored() -> None:
    # The same headers from a stranger: neither its Received nor Authentication-Results count.
    eff = _eff("198.51.100.50", POSTFIX + BODY, ["127.0.0.1/32"])
    assert (eff.client_ip, eff.helo) == ("198.51.100.50", "mx.example.com")
    assert eff.trusted_authserv_ids == ()


def test_without_trusted_relays_nothing_changes() -> None:
    eff = _eff("127.0.0.1", POSTFIX + BODY, [])
    assert eff.client_ip == "127.0.0.1"
    assert eff.trusted_authserv_ids == ("mx.example.com",)  # legacy: honoured as before


def test_a_chain_of_trusted_hops_is_followed_to_the_first_stranger() -> None:
    filt = "Received: from localhost (localhost [127.0.0.1]) by mx.example.com; date\r\n"
    eff = _eff("::ffff:127.0.0.1", filt + POSTFIX + FORGED_BELOW + BODY, ["127.0.0.0/8"])
    assert eff.client_ip == "192.0.2.10"


def test_an_unparseable_relay_header_means_unknown_never_the_relay_itself() -> None:
    local = "Received: by mx.example.com (Postfix, from userid 0) id X; date\r\n"
    eff = _eff("127.0.0.1", local + BODY, ["127.0.0.1"])
    assert (eff.client_ip, eff.helo) == (None, None)


def test_pipe_mode_reads_the_local_mta_header() -> None:
    eff = _eff("", POSTFIX + BODY, [], source="pipe")
    assert eff.client_ip == "192.0.2.10"


def test_is_trusted_relay_and_config_validation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, security={"trusted_relays": ["127.0.0.1/32", "::1"]})
    assert is_trusted_relay(s, "127.0.0.1")
    assert is_trusted_relay(s, "::1")
    assert not is_trusted_relay(s, "127.0.0.2")
    assert not is_trusted_relay(s, None)
    with pytest.raises(ConfigError, match=r"security\.trusted_relays.*not an IP address"):
        make_settings(tmp_path / "bad", security={"trusted_relays": ["localhost"]})
