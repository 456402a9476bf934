"""Tests for gateway.security.sender_auth and gateway.security.dns (no network, real DKIM keys).

RSA keys are generated with ``cryptography`` and signatures made with dkimpy; all DNS answers
come from a StaticResolver table (RFC 6376 key records, RFC 7208 SPF records, RFC 7489 DMARC
records).  ed25519 signing needs PyNaCl; that test is skipped when it is not installed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from dataclasses import dataclass

import authres
import authres.dmarc
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.security.dns import DnsTempError, Resolver, StaticResolver, SystemResolver
from gateway.security.sender_auth import (
    AuthResult,
    DkimCheck,
    _aligned,
    authenticate,
    organizational_domain,
)

HAVE_NACL = importlib.util.find_spec("nacl") is not None

CLIENT_IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"


@dataclass(frozen=True)
class RsaKey:
    private_pem: bytes
    dns_txt: str


def _make_rsa_key() -> RsaKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RsaKey(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii"))


@pytest.fixture(scope="module")
def key_a() -> RsaKey:
    return _make_rsa_key()


@pytest.fixture(scope="module")
def key_b() -> RsaKey:
    return _make_rsa_key()


def make_message(
    from_addr: str = "Alice <alice@example.com>",
    body: str = "Hello, my order #42 has not arrived.\r\n",
    extra_headers: str = "",
) -> bytes:
    return (
        f"{extra_headers}"
        f"From: {from_addr}\r\n"
        "To: support@gateway.test\r\n"
        "Subject: Where is my order?\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        "Message-ID: <abc123@example.com>\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def sign(msg: bytes, key: RsaKey, domain: str, selector: str = "s1") -> bytes:
    """Prepend a DKIM-Signature made by dkimpy (RFC 6376 §5)."""
    header = dkim.sign(
        msg,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return header + msg


def run(
    raw: bytes,
    resolver: Resolver,
    *,
    sender: str = "alice@example.com",
    ip: str | None = CLIENT_IP,
    helo: str | None = "mail.example.com",
    trusted: tuple[str, ...] = (),
) -> AuthResult:
    return authenticate(
        raw,
        envelope_sender=sender,
        client_ip=ip,
        helo=helo,
        resolver=resolver,
        trusted_authserv_ids=trusted,
    )


# ---------------------------------------------------------------------------- DKIM


def test_aligned_dkim_pass_is_authenticated(key_a: RsaKey) -> None:
    resolver = StaticResolver(
        {
            ("s1._domainkey.example.com", "TXT"): [key_a.dns_txt],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; rua=mailto:d@example.com"],
        }
    )
    raw = sign(make_message(), key_a, "example.com")
    result = run(raw, resolver, ip=None)  # no SPF possible: DKIM alone must carry it
    assert result.dkim == (DkimCheck("example.com", "s1", "rsa-sha256", "pass"),)
    assert result.spf == "none"
    assert result.dmarc == "pass"
    assert result.dmarc_policy == "reject"
    assert result.source == "verified"
    assert result.authenticated
    assert not result.likely_forged


def test_relaxed_alignment_subdomain_and_strict_adkim(key_a: RsaKey) -> None:
    raw = sign(make_message(), key_a, "mail.example.com")
    records: dict[tuple[str, str], list[str]] = {
        ("s1._domainkey.mail.example.com", "TXT"): [key_a.dns_txt],
        ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=quarantine"],
    }
    relaxed = run(raw, StaticResolver(records), ip=None)
    assert relaxed.dkim[0].result == "pass"
    assert relaxed.dmarc == "pass"
    assert relaxed.authenticated

    records[("_dmarc.example.com", "TXT")] = ["v=DMARC1; p=quarantine; adkim=s"]
    strict = run(raw, StaticResolver(records), ip=None)
    assert strict.dkim[0].result == "pass"
    assert strict.dmarc == "fail"
    assert strict.dmarc_policy == "quarantine"
    assert not strict.authenticated
    assert strict.likely_forged


def test_altered_body_fails(key_a: RsaKey) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    raw = sign(make_message(), key_a, "example.com")
    tampered = raw.replace(b"has not arrived", b"has arrived!!!!")
    assert tampered != raw
    result = run(tampered, resolver, ip=None)
    assert result.dkim[0].result == "fail"
    assert not result.authenticated


def test_altered_signed_header_fails(key_a: RsaKey) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    raw = sign(make_message(), key_a, "example.com").replace(b"Where is", b"Here is")
    assert run(raw, resolver, ip=None).dkim[0].result == "fail"


def test_every_signature_is_verified_first_fails_second_passes(
    key_a: RsaKey, key_b: RsaKey
) -> None:
    msg = make_message()
    good = sign(msg, key_a, "example.com", "good")
    # Topmost signature claims selector "bad", whose DNS key is a different key: it fails.
    both = sign(good, key_b, "example.com", "bad")
    resolver = StaticResolver(
        {
            ("good._domainkey.example.com", "TXT"): [key_a.dns_txt],
            ("bad._domainkey.example.com", "TXT"): [key_a.dns_txt],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
        }
    )
    assert dkim.verify(both, dnsfunc=lambda name, timeout=5: key_a.dns_txt.encode()) is False
    result = run(both, resolver, ip=None)
    assert [(c.selector, c.result) for c in result.dkim] == [("bad", "fail"), ("good", "pass")]
    assert result.dmarc == "pass"
    assert result.authenticated


def test_third_party_dkim_is_not_aligned(key_a: RsaKey) -> None:
    raw = sign(make_message(), key_a, "esp-mailer.net")
    resolver = StaticResolver(
        {
            ("s1._domainkey.esp-mailer.net", "TXT"): [key_a.dns_txt],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=none"],
        }
    )
    result = run(raw, resolver, ip=None)
    assert result.dkim == (DkimCheck("esp-mailer.net", "s1", "rsa-sha256", "pass"),)
    assert result.dmarc == "fail"
    assert result.dmarc_policy == "none"
    assert not result.authenticated
    assert not result.likely_forged  # p=none asks for nothing


def test_third_party_dkim_without_dmarc_record_is_not_authenticated(key_a: RsaKey) -> None:
    raw = sign(make_message(), key_a, "esp-mailer.net")
    resolver = StaticResolver({("s1._domainkey.esp-mailer.net", "TXT"): [key_a.dns_txt]})
    result = run(raw, resolver, ip=None)
    assert result.dmarc == "none"
    assert not result.authenticated


def test_aligned_dkim_without_dmarc_record_still_authenticates(key_a: RsaKey) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    result = run(sign(make_message(), key_a, "example.com"), resolver, ip=None)
    assert result.dmarc == "none"
    assert result.dmarc_policy is None
    assert result.authenticated


def test_missing_key_record_is_permerror(key_a: RsaKey) -> None:
    result = run(sign(make_message(), key_a, "example.com"), StaticResolver(), ip=None)
    assert result.dkim[0].result == "permerror"


def test_revoked_or_garbage_key_is_permerror(key_a: RsaKey) -> None:
    raw = sign(make_message(), key_a, "example.com")
    for txt in ("v=DKIM1; k=rsa; p=", "v=DKIM1; k=rsa; p=!!!notbase64", "v=DKIM1; k=foo; p=AAAA"):
        resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [txt]})
        assert run(raw, resolver, ip=None).dkim[0].result == "permerror", txt


@pytest.mark.parametrize(
    "sig_header",
    [
        b"DKIM-Signature: this is not a tag list\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com\r\n",  # missing required tags
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=AAAA; b=!!!\r\n",
        b"DKIM-Signature: v=1; a=rot13; d=example.com; s=s1; h=from; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: v=9; a=rsa-sha256; d=example.com; s=s1; h=from; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=to; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature:\r\n",
    ],
)
def test_malformed_signature_header_does_not_raise(key_a: RsaKey, sig_header: bytes) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    result = run(sig_header + make_message(), resolver, ip=None)
    assert len(result.dkim) == 1
    assert result.dkim[0].result in ("permerror", "fail")
    assert not result.authenticated


def test_malformed_signature_next_to_good_one(key_a: RsaKey) -> None:
    raw = b"DKIM-Signature: garbage;;;==\r\n" + sign(make_message(), key_a, "example.com")
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    result = run(raw, resolver, ip=None)
    assert [c.result for c in result.dkim] == ["permerror", "pass"]
    assert result.authenticated


def test_ed25519_signature(key_a: RsaKey) -> None:
    """RFC 8463: ed25519-sha256 verifies with PyNaCl; without it the signature is permerror."""
    if HAVE_NACL:
        import nacl.signing

        sk = nacl.signing.SigningKey.generate()
        priv = base64.b64encode(bytes(sk))
        pub = base64.b64encode(bytes(sk.verify_key)).decode()
        msg = make_message()
        raw = (
            dkim.sign(
                msg,
                b"ed",
                b"example.com",
                priv,
                signature_algorithm=b"ed25519-sha256",
                include_headers=[b"from", b"subject"],
            )
            + msg
        )
        resolver = StaticResolver(
            {("ed._domainkey.example.com", "TXT"): [f"v=DKIM1; k=ed25519; p={pub}"]}
        )
        result = run(raw, resolver, ip=None)
        assert result.dkim == (DkimCheck("example.com", "ed", "ed25519-sha256", "pass"),)
        assert result.authenticated
        tampered = run(raw.replace(b"order #42", b"order #43"), resolver, ip=None)
        assert tampered.dkim[0].result == "fail"
    else:
        # A syntactically valid ed25519 signature whose key we cannot use without PyNaCl.
        pub = base64.b64encode(b"\x01" * 32).decode()
        sig = (
            b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/simple; d=example.com; "
            b"s=ed; h=from:subject; bh=" + base64.b64encode(b"\x00" * 32) + b"; "
            b"b=" + base64.b64encode(b"\x00" * 64) + b"\r\n"
        )
        resolver = StaticResolver(
            {("ed._domainkey.example.com", "TXT"): [f"v=DKIM1; k=ed25519; p={pub}"]}
        )
        result = run(sig + make_message(), resolver, ip=None)
        assert result.dkim == (DkimCheck("example.com", "ed", "ed25519-sha256", "permerror"),)


# ---------------------------------------------------------------------------- SPF


SPF_TABLE = {
    ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 ~all"],
    ("strict.example", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
    ("neutral.example", "TXT"): ["v=spf1 ?all"],
    ("broken.example", "TXT"): ["v=spf1 ip4:192.0.2.10 bogus:mechanism -all"],
    ("mx.example", "TXT"): ["v=spf1 mx include:_spf.provider.example -all"],
    ("mx.example", "MX"): ["10 mail.mx.example"],
    ("mail.mx.example", "A"): ["203.0.113.5"],
    ("_spf.provider.example", "TXT"): ["v=spf1 ip4:198.51.100.0/24 ip6:2001:db8::/32 -all"],
    ("mail.helo.example", "TXT"): ["v=spf1 a -all"],
    ("mail.helo.example", "A"): ["192.0.2.10"],
}


@pytest.mark.parametrize(
    ("sender", "ip", "expected"),
    [
        ("a@example.com", "192.0.2.10", "pass"),
        ("a@example.com", "198.51.100.7", "softfail"),
        ("a@strict.example", "192.0.2.10", "pass"),
        ("a@strict.example", "198.51.100.7", "fail"),
        ("a@neutral.example", "192.0.2.10", "neutral"),
        ("a@nospf.example", "192.0.2.10", "none"),
        ("a@broken.example", "192.0.2.10", "permerror"),
        ("a@mx.example", "203.0.113.5", "pass"),  # mx mechanism
        ("a@mx.example", "198.51.100.99", "pass"),  # include:
        ("a@mx.example", "2001:db8::1", "pass"),  # ip6 through include:
        ("a@mx.example", "192.0.2.10", "fail"),
    ],
)
def test_spf_results(sender: str, ip: str, expected: str) -> None:
    result = run(make_message(), StaticResolver(SPF_TABLE), sender=sender, ip=ip, helo="h.test")
    assert result.spf == expected
    assert result.spf_domain == sender.split("@")[1]


def test_spf_lookups_go_through_the_resolver() -> None:
    resolver = StaticResolver(SPF_TABLE)
    run(make_message(), resolver, sender="a@mx.example", ip="192.0.2.99")
    asked = set(resolver.queries)
    assert {("mx.example", "TXT"), ("mx.example", "MX"), ("mail.mx.example", "A")} <= asked
    assert ("_spf.provider.example", "TXT") in asked


def test_null_sender_checks_helo_identity() -> None:
    resolver = StaticResolver(SPF_TABLE)
    ok = run(make_message(), resolver, sender="<>", helo="mail.helo.example", ip="192.0.2.10")
    assert (ok.spf, ok.spf_domain) == ("pass", "mail.helo.example")
    bad = run(make_message(), resolver, sender="", helo="mail.helo.example", ip=OTHER_IP)
    assert (bad.spf, bad.spf_domain) == ("fail", "mail.helo.example")
    literal = run(make_message(), resolver, sender="", helo="[192.0.2.10]", ip="192.0.2.10")
    assert literal.spf == "none"


def test_spf_without_client_ip_or_with_garbage_ip_is_none() -> None:
    resolver = StaticResolver(SPF_TABLE)
    assert run(make_message(), resolver, sender="a@strict.example", ip=None).spf == "none"
    assert run(make_message(), resolver, sender="a@strict.example", ip="not-an-ip").spf == "none"


def test_aligned_spf_pass_authenticates_without_dkim() -> None:
    resolver = StaticResolver(
        {**SPF_TABLE, ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; aspf=r"]}
    )
    result = run(make_message(), resolver, sender="bounces@example.com", ip="192.0.2.10")
    assert (result.spf, result.dmarc) == ("pass", "pass")
    assert result.authenticated


def test_strict_aspf_rejects_subdomain_mail_from() -> None:
    table = {
        ("bounce.example.com", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
        ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; aspf=s"],
    }
    result = run(make_message(), StaticResolver(table), sender="b@bounce.example.com")
    assert result.spf == "pass"
    assert result.dmarc == "fail"
    assert result.likely_forged


# ---------------------------------------------------------------------------- DMARC


def test_dmarc_reject_spf_fail_no_dkim_is_likely_forged() -> None:
    resolver = StaticResolver(
        {
            ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; pct=100"],
        }
    )
    result = run(make_message(), resolver, sender="alice@example.com", ip=OTHER_IP)
    assert result.dkim == ()
    assert result.spf == "fail"
    assert (result.dmarc, result.dmarc_policy) == ("fail", "reject")
    assert not result.authenticated
    assert result.likely_forged


def test_spf_hard_fail_alone_is_likely_forged() -> None:
    resolver = StaticResolver({("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"]})
    result = run(make_message(), resolver, sender="alice@example.com", ip=OTHER_IP)
    assert (result.spf, result.dmarc) == ("fail", "none")
    assert result.likely_forged


def test_spf_fail_with_aligned_dkim_pass_is_not_forged(key_a: RsaKey) -> None:
    """A forwarded message: SPF breaks, the author's signature survives."""
    resolver = StaticResolver(
        {
            ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
            ("s1._domainkey.example.com", "TXT"): [key_a.dns_txt],
        }
    )
    raw = sign(make_message(), key_a, "example.com")
    result = run(raw, resolver, sender="alice@example.com", ip=OTHER_IP)
    assert result.spf == "fail"
    assert result.dmarc == "pass"
    assert result.authenticated
    assert not result.likely_forged


def test_dmarc_quarantine_softfail_is_likely_forged() -> None:
    resolver = StaticResolver(
        {**SPF_TABLE, ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=quarantine"]}
    )
    result = run(make_message(), resolver, sender="alice@example.com", ip=OTHER_IP)
    assert result.spf == "softfail"
    assert (result.dmarc, result.dmarc_policy) == ("fail", "quarantine")
    assert result.likely_forged


def test_dmarc_subdomain_uses_org_record_and_sp() -> None:
    resolver = StaticResolver({("_dmarc.example.co.uk", "TXT"): ["v=DMARC1; p=none; sp=reject"]})
    sub = run(make_message(from_addr="x@shop.example.co.uk"), resolver, sender="", helo=None)
    assert (sub.from_domain, sub.dmarc, sub.dmarc_policy) == (
        "shop.example.co.uk",
        "fail",
        "reject",
    )
    assert sub.likely_forged
    org = run(make_message(from_addr="x@example.co.uk"), resolver, sender="", helo=None)
    assert (org.dmarc, org.dmarc_policy) == ("fail", "none")
    assert not org.likely_forged
    asked = [name for name, _ in resolver.queries]
    assert "_dmarc.shop.example.co.uk" in asked
    assert "_dmarc.co.uk" not in asked


def test_dmarc_own_record_on_subdomain_wins_over_org_record() -> None:
    resolver = StaticResolver(
        {
            ("_dmarc.shop.example.com", "TXT"): ["v=DMARC1; p=none"],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; sp=reject"],
        }
    )
    result = run(make_message(from_addr="x@shop.example.com"), resolver, ip=None)
    assert (result.dmarc, result.dmarc_policy) == ("fail", "none")


def test_dmarc_record_quirks() -> None:
    base = make_message()
    # Several DMARC records: no DMARC processing (RFC 7489 §6.6.3).
    two = StaticResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"] * 2})
    assert run(base, two, ip=None).dmarc == "none"
    # Non-DMARC TXT records next to it are ignored.
    mixed = StaticResolver(
        {("_dmarc.example.com", "TXT"): ["google-site-verification=x", "v=DMARC1; p=reject"]}
    )
    assert run(base, mixed, ip=None).dmarc_policy == "reject"
    # Invalid p= with rua= behaves as p=none; without rua= no DMARC at all.
    with_rua = StaticResolver(
        {("_dmarc.example.com", "TXT"): ["v=DMARC1; p=bogus; rua=mailto:a@example.com"]}
    )
    assert run(base, with_rua, ip=None).dmarc_policy == "none"
    no_rua = StaticResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=bogus"]})
    assert run(base, no_rua, ip=None).dmarc == "none"


def test_multiple_from_domains_are_never_authenticated(key_a: RsaKey) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    raw = sign(make_message(from_addr="a@example.com, b@evil.example"), key_a, "example.com")
    result = run(raw, resolver, ip=None)
    assert result.from_domain == ""
    assert not result.authenticated
    two_fields = b"From: mallory@evil.example\r\n" + sign(make_message(), key_a, "example.com")
    assert run(two_fields, resolver, ip=None).from_domain == ""


# ---------------------------------------------------------------------------- DNS trouble


def test_dns_temperror_paths(key_a: RsaKey) -> None:
    raw = sign(make_message(), key_a, "example.com")
    resolver = StaticResolver(
        {("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]},
        temp_errors=[("s1._domainkey.example.com", "TXT"), ("example.com", "TXT")],
    )
    result = run(raw, resolver, sender="alice@example.com", ip=CLIENT_IP)
    assert result.dkim[0].result == "temperror"
    assert result.spf == "temperror"
    # An aligned identifier might have passed: neither pass nor fail.
    assert result.dmarc == "temperror"
    assert not result.authenticated
    assert not result.likely_forged


def test_dmarc_lookup_temperror() -> None:
    resolver = StaticResolver(temp_errors=[("_dmarc.example.com", "TXT")])
    result = run(make_message(), resolver, ip=None)
    assert (result.dmarc, result.dmarc_policy) == ("temperror", None)
    assert not result.likely_forged


def test_spf_include_temperror() -> None:
    resolver = StaticResolver(
        {("example.com", "TXT"): ["v=spf1 include:_spf.slow.example -all"]},
        temp_errors=[("_spf.slow.example", "TXT")],
    )
    assert run(make_message(), resolver).spf == "temperror"


# ---------------------------------------------------------------------------- ARC


def test_arc_none_without_arc_headers() -> None:
    assert run(make_message(), StaticResolver(), ip=None).arc == "none"


def test_arc_garbage_headers_fail_without_raising() -> None:
    raw = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.example; s=arc; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; d=fwd.example; s=arc; h=from; bh=A; b=A\r\n"
        b"ARC-Authentication-Results: i=1; fwd.example; spf=pass smtp.mailfrom=example.com\r\n"
    ) + make_message()
    assert run(raw, StaticResolver(), ip=None).arc == "fail"


# ---------------------------------------------------------------------------- trusted A-R


def test_trusted_authentication_results_honoured() -> None:
    raw = (
        b"Authentication-Results: mx.gateway.test; dkim=pass header.d=example.com"
        b" header.s=s1 header.a=rsa-sha256;\r\n"
        b"  spf=fail smtp.mailfrom=alice@example.com;"
        b" dmarc=pass (p=reject dis=none) header.from=example.com\r\n"
        b"Received: from sender by mx.gateway.test\r\n"
    ) + make_message()
    resolver = StaticResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]})
    result = run(raw, resolver, trusted=("MX.gateway.test",))
    assert result.source == "trusted-header"
    assert result.dkim == (DkimCheck("example.com", "s1", "rsa-sha256", "pass"),)
    assert (result.spf, result.spf_domain) == ("fail", "example.com")
    assert (result.dmarc, result.dmarc_policy) == ("pass", "reject")
    assert result.authenticated
    assert not result.likely_forged
    # Nothing was re-verified: only the DMARC policy was looked up.
    assert resolver.queries == [("_dmarc.example.com", "TXT")]


def test_untrusted_authentication_results_ignored() -> None:
    forged = (
        b"Authentication-Results: mx.evil.example; dkim=pass header.d=example.com;"
        b" spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com\r\n"
    )
    resolver = StaticResolver(
        {
            ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
        }
    )
    for trusted in ((), ("mx.gateway.test",)):
        result = run(forged + make_message(), resolver, ip=OTHER_IP, trusted=trusted)
        assert result.source == "verified"
        assert (result.spf, result.dmarc) == ("fail", "fail")
        assert result.likely_forged


def test_only_topmost_trusted_run_is_read() -> None:
    """A sender-supplied copy of our authserv-id further down is ignored (RFC 8601 §5)."""
    raw = (
        b"Authentication-Results: mx.gateway.test; spf=fail smtp.mailfrom=example.com;"
        b" dmarc=fail policy.dmarc=reject header.from=example.com\r\n"
        b"Authentication-Results: other.host; spf=pass smtp.mailfrom=example.com\r\n"
        b"Received: from sender by mx.gateway.test\r\n"
        b"Authentication-Results: mx.gateway.test; dkim=pass header.d=example.com;"
        b" spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com\r\n"
    ) + make_message()
    result = run(raw, StaticResolver(), trusted=("mx.gateway.test",))
    assert result.source == "trusted-header"
    assert result.dkim == ()
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("fail", "fail", "reject")
    assert result.likely_forged


def test_trusted_header_without_dmarc_is_evaluated_locally() -> None:
    raw = (
        b"Authentication-Results: mx.gateway.test; dkim=pass header.d=esp.example;"
        b" spf=pass smtp.mailfrom=bounce@esp.example\r\n"
    ) + make_message()
    resolver = StaticResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=quarantine"]})
    result = run(raw, resolver, trusted=("mx.gateway.test",))
    assert result.source == "trusted-header"
    assert (result.dmarc, result.dmarc_policy) == ("fail", "quarantine")
    assert result.likely_forged


def test_unparseable_trusted_header_falls_back_to_verifying() -> None:
    raw = b"Authentication-Results: ;;; ===\r\n" + make_message()
    result = run(raw, StaticResolver(), trusted=("mx.gateway.test",))
    assert result.source == "verified"


# ---------------------------------------------------------------------------- output


def test_header_value_round_trips_through_authres(key_a: RsaKey) -> None:
    resolver = StaticResolver(
        {
            **SPF_TABLE,
            ("s1._domainkey.example.com", "TXT"): [key_a.dns_txt],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
        }
    )
    original = run(sign(make_message(), key_a, "example.com"), resolver)
    value = original.header_value("gw.example.net")
    parsed = authres.FeatureContext(authres.dmarc).parse_value(value)
    assert parsed.authserv_id == "gw.example.net"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("dkim", "pass"),
        ("spf", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    # Feeding our own header back as a trusted one reproduces the verdict.
    again = run(
        f"Authentication-Results: {value}\r\n".encode() + make_message(),
        resolver,
        trusted=("gw.example.net",),
    )
    assert again.source == "trusted-header"
    assert (again.dkim, again.spf, again.spf_domain) == (
        original.dkim,
        original.spf,
        original.spf_domain,
    )
    assert (again.dmarc, again.dmarc_policy, again.arc) == ("pass", "reject", "none")


def test_header_value_without_dkim_says_none() -> None:
    value = AuthResult.skipped("example.com").header_value("gw.test")
    assert value.startswith("gw.test; dkim=none; spf=none")


def test_to_json_round_trip(key_a: RsaKey) -> None:
    resolver = StaticResolver({("s1._domainkey.example.com", "TXT"): [key_a.dns_txt]})
    result = run(sign(make_message(), key_a, "example.com"), resolver, ip=None)
    data = json.loads(json.dumps(result.to_json()))
    assert data["authenticated"] is True
    assert data["likely_forged"] is False
    assert data["dkim"][0] == {
        "domain": "example.com",
        "selector": "s1",
        "algorithm": "rsa-sha256",
        "result": "pass",
    }
    assert AuthResult.from_json(data) == result


# ---------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"no colon here\r\n\r\nbody",
        b"From: \xff\xfe@\xff.example\r\n\r\n\x00\x01",
        b"From: <>\r\nDKIM-Signature: v=1; d=\xff; s=\x00\r\n\r\n",
        b"From: a@example.com\r\n" * 3,
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    result = run(raw, StaticResolver(SPF_TABLE), trusted=("mx.gateway.test",))
    assert isinstance(result, AuthResult)
    assert not result.authenticated


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [b"From", b"DKIM-Signature", b"Authentication-Results", b"ARC-Seal", b"X"]
            ),
            st.binary(max_size=80),
        ),
        max_size=6,
    ),
    body=st.binary(max_size=100),
    sender=st.text(max_size=30),
)
def test_fuzz_never_raises(headers: list[tuple[bytes, bytes]], body: bytes, sender: str) -> None:
    raw = b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body
    result = run(raw, StaticResolver(), sender=sender, trusted=("mx.gateway.test",))
    assert result.source in ("verified", "trusted-header", "skipped")
    json.dumps(result.to_json())


# ---------------------------------------------------------------------------- helpers / dns


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("Mail.Sub.Example.COM.", "example.com"),
        ("shop.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("a.b.example.com.au", "example.com.au"),
        ("com", "com"),
        ("", ""),
        # The Public Suffix List, not a two-label guess: deeper registries and private
        # (shared hosting) suffixes, each tenant its own organization.
        ("mail.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("a.github.io", "a.github.io"),
        ("www.b.github.io", "b.github.io"),
        ("x.app.herokuapp.com", "app.herokuapp.com"),
        # A wildcard rule (*.kawasaki.jp) and its exception (!city.kawasaki.jp).
        ("www.city.kawasaki.jp", "city.kawasaki.jp"),
        ("shop.example.kawasaki.jp", "shop.example.kawasaki.jp"),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("identifier", "from_domain", "aligned"),
    [
        ("a.github.io", "b.github.io", False),  # two tenants of one shared-hosting suffix
        ("mail.a.github.io", "a.github.io", True),
        ("bounce.example.co.uk", "mail.example.co.uk", True),
        ("example.co.uk", "other.co.uk", False),
        ("co.uk", "example.co.uk", False),
    ],
)
def test_relaxed_alignment_uses_the_public_suffix_list(
    identifier: str, from_domain: str, aligned: bool
) -> None:
    assert _aligned(identifier, from_domain, strict=False) is aligned
    # Strict alignment is an exact match, whatever the suffix list says.
    assert _aligned(identifier, from_domain, strict=True) is (identifier == from_domain)


def test_static_resolver() -> None:
    r = StaticResolver({("Example.COM.", "txt"): ["v=spf1 -all"]})
    assert isinstance(r, Resolver)
    assert r.query("example.com", "TXT") == ["v=spf1 -all"]
    assert r.query("EXAMPLE.com.", "txt") == ["v=spf1 -all"]
    assert r.query("missing.example", "A") == []
    r.add("example.com", "A", "192.0.2.1")
    assert r.query("example.com", "A") == ["192.0.2.1"]
    broken = StaticResolver({("x.example", "TXT"): DnsTempError("boom")})
    with pytest.raises(DnsTempError):
        broken.query("x.example", "TXT")


def test_system_resolver_maps_timeouts_to_temp_error() -> None:
    """A loopback DNS server that never answers: the lifetime expires -> DnsTempError."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        r = SystemResolver(timeout=0.2, nameservers=["127.0.0.1"], port=silent.getsockname()[1])
        assert isinstance(r, Resolver)
        with pytest.raises(DnsTempError):
            r.query("example.com", "TXT")
    with pytest.raises(ValueError, match="unsupported record type"):
        r.query("example.com", "CNAME")
