"""DKIM signing: real keys, real signatures, verified by dkimpy against a local "DNS" dict."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from gateway.outbound.dkim import (
    ED25519_SHA256,
    RSA_SHA256,
    DkimKey,
    keygen,
    load_key,
    public_txt_record,
    sign,
)

MESSAGE = (
    b"From: Example Support <support@example.com>\r\n"
    b"To: Customer <customer@example.org>\r\n"
    b"Subject: [#42] Your printer question\r\n"
    b"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <t42.1@example.com>\r\n"
    b"In-Reply-To: <abc@example.org>\r\n"
    b"References: <abc@example.org>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"We received your message and a person will answer.\r\n"
    b"Caf\xc3\xa9 au lait.\r\n"
)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dkim")


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> DkimKey:
    keygen(keydir / "rsa.key", domain="example.com", selector="gw1")
    return load_key(keydir / "rsa.key", "example.com", "gw1")


@pytest.fixture(scope="module")
def ed_key(keydir: Path) -> DkimKey:
    keygen(keydir / "ed.key", domain="example.com", selector="gw2", algorithm=ED25519_SHA256)
    return load_key(keydir / "ed.key", "example.com", "gw2")


def dns_for(*keys: DkimKey) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc answering TXT queries from a dict: no network."""
    records = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): public_txt_record(k).encode() for k in keys
    }

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    """Verify every DKIM-Signature, top first (dkim.verify() only checks the first)."""
    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


def sig_tags(message: bytes, idx: int = 0) -> dict[bytes, bytes]:
    d = dkim.DKIM(message)
    sigs = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(sigs[idx])


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_signature_verifies(which: str, rsa_key: DkimKey, ed_key: DkimKey) -> None:
    key = rsa_key if which == "rsa" else ed_key
    signed = sign(MESSAGE, [key])
    assert signed.endswith(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dns_for(key))
    tags = sig_tags(signed)
    assert tags[b"a"] == key.algorithm.encode()
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.com"
    assert tags[b"s"] == key.selector.encode()


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_altered_body_fails(which: str, rsa_key: DkimKey, ed_key: DkimKey) -> None:
    key = rsa_key if which == "rsa" else ed_key
    signed = sign(MESSAGE, [key])
    tampered = signed.replace(b"a person will answer", b"a robot will answer")
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dns_for(key))


def test_altered_subject_fails(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key])
    tampered = signed.replace(b"Your printer question", b"Your invoice question")
    assert not dkim.verify(tampered, dnsfunc=dns_for(rsa_key))


def test_dual_signature_rsa_and_ed25519(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key, ed_key])
    assert signed.count(b"DKIM-Signature:") == 2
    assert verify_all(signed, dns_for(rsa_key, ed_key)) == [True, True]
    assert sig_tags(signed, 0)[b"a"] == RSA_SHA256.encode()  # keys[0] on top
    assert sig_tags(signed, 1)[b"a"] == ED25519_SHA256.encode()
    tampered = signed.replace(b"au lait", b"noir")
    assert verify_all(tampered, dns_for(rsa_key, ed_key)) == [False, False]


def test_signed_headers_and_from_oversigned(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key])
    h = [x.strip().lower() for x in sig_tags(signed)[b"h"].split(b":")]
    assert h.count(b"from") == 2  # oversigned
    for name in (b"to", b"subject", b"date", b"message-id", b"in-reply-to", b"references"):
        assert name in h
    assert b"auto-submitted" in h
    assert b"mime-version" in h
    assert b"content-type" in h
    assert b"cc" not in h
    assert b"reply-to" not in h
    assert b"content-transfer-encoding" not in h  # not in our list


def test_prepended_second_from_breaks_signature(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key])
    forged = b"From: attacker@evil.test\r\n" + signed
    assert not dkim.verify(forged, dnsfunc=dns_for(rsa_key))
    # Appending at the end of the header is caught too: From is signed one extra time.
    head, body = signed.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nFrom: attacker@evil.test\r\n\r\n" + body
    assert not dkim.verify(forged, dnsfunc=dns_for(rsa_key))


def test_relaxed_canonicalization_survives_refolding(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key])
    refolded = signed.replace(b"Subject: [#42] Your", b"Subject:   [#42]\r\n\tYour").replace(
        b"will answer.\r\n", b"will answer.   \r\n"
    )
    assert refolded != signed
    assert dkim.verify(refolded, dnsfunc=dns_for(rsa_key))


def test_explicit_header_list(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key], headers=[b"From", b"Subject"])
    h = [x.strip().lower() for x in sig_tags(signed)[b"h"].split(b":")]
    assert h == [b"from", b"from", b"subject"]
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))
    with pytest.raises(ValueError, match="From"):
        sign(MESSAGE, [rsa_key], headers=[b"Subject"])


def test_no_keys_returns_message_unchanged() -> None:
    assert sign(MESSAGE, []) == MESSAGE


def test_message_without_from_is_refused(rsa_key: DkimKey) -> None:
    with pytest.raises(ValueError, match="From"):
        sign(b"Subject: x\r\n\r\nbody\r\n", [rsa_key])


def test_line_endings_are_kept(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    crlf = sign(MESSAGE, [rsa_key, ed_key])
    assert b"\n" not in crlf.replace(b"\r\n", b"")
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    lf = sign(lf_message, [rsa_key, ed_key])
    assert b"\r" not in lf
    assert verify_all(lf, dns_for(rsa_key, ed_key)) == [True, True]


def test_keygen_writes_0600_and_returns_zone_line(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    record = keygen(path, domain="example.com", selector="gw1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert record.startswith('gw1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    strings = record.split(" IN TXT ", 1)[1]
    parts = [p.strip('"') for p in strings.split('" "')]
    assert len(parts) > 1  # a 2048-bit key does not fit one 255-octet string
    assert all(len(p) <= 255 for p in parts)
    key = load_key(path, "example.com", "gw1")
    assert "".join(parts) == public_txt_record(key)
    assert key.algorithm == RSA_SHA256


def test_keygen_ed25519_record_and_format(tmp_path: Path) -> None:
    path = tmp_path / "ed.key"
    record = keygen(path, domain="example.com", selector="ed1", algorithm=ED25519_SHA256)
    assert record.startswith('ed1._domainkey.example.com. IN TXT "v=DKIM1; k=ed25519; p=')
    # dknewkey's format: base64 of the 32-byte seed.
    assert len(base64.b64decode(path.read_bytes().strip())) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        keygen(path, domain="example.com", selector="gw1", algorithm=ED25519_SHA256)
    assert path.read_bytes() == b"precious"


def test_keygen_rejects_weak_rsa_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RFC 8301"):
        keygen(tmp_path / "weak.key", domain="example.com", selector="s", bits=512)
    with pytest.raises(ValueError, match="selector"):
        keygen(tmp_path / "x.key", domain="example.com", selector="bad selector")
    assert not (tmp_path / "weak.key").exists()
    assert not (tmp_path / "x.key").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, I am not a key\n",
        b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        base64.b64encode(b"x" * 31),
    ],
    ids=["empty", "text", "bad-rsa", "certificate", "short-seed"],
)
def test_load_key_garbage_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"garbage\.key"):
        load_key(path, "example.com", "gw1")


def test_load_key_raw_seed_and_pkcs8(tmp_path: Path) -> None:
    seed = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(seed)
    raw = load_key(tmp_path / "raw.key", "example.com", "raw")
    assert raw.algorithm == ED25519_SHA256
    assert dkim.verify(sign(MESSAGE, [raw]), dnsfunc=dns_for(raw))

    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    (tmp_path / "rsa8.key").write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(pem, pkcs8, none)
        .replace(b"\n", b"\r\n")  # a key copied from Windows
    )
    (tmp_path / "ed8.key").write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(pem, pkcs8, none)
    )
    rsa8 = load_key(tmp_path / "rsa8.key", "example.com", "rsa8")
    ed8 = load_key(tmp_path / "ed8.key", "example.com", "ed8")
    assert (rsa8.algorithm, ed8.algorithm) == (RSA_SHA256, ED25519_SHA256)
    signed = sign(MESSAGE, [rsa8, ed8])
    assert verify_all(signed, dns_for(rsa8, ed8)) == [True, True]


def test_key_repr_hides_material(rsa_key: DkimKey) -> None:
    assert b"PRIVATE" in rsa_key.private_key
    assert "PRIVATE" not in repr(rsa_key)
    assert "redacted" in repr(rsa_key)


def test_key_validates_algorithm() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        DkimKey("example.com", "gw1", b"x", "rsa-sha1")


def test_extra_key_with_its_own_selector_dual_signs(keydir: Path, tmp_path: Path) -> None:
    """RFC 8463 §6 dual signing: `extra_key_files = ["gw2=<ed25519 key>"]` signs with the
    ed25519 key under its own selector (two keys cannot share one DNS name)."""
    from gateway.outbound.worker import load_keys
    from tests.conftest import make_settings

    keygen(keydir / "dual-rsa.key", domain="example.com", selector="gw1")
    keygen(keydir / "dual-ed.key", domain="example.com", selector="gw2", algorithm=ED25519_SHA256)
    settings = make_settings(tmp_path)
    settings.outbound.dkim.selector = "gw1"
    settings.outbound.dkim.key_file = str(keydir / "dual-rsa.key")
    settings.outbound.dkim.extra_key_files = [f"gw2={keydir / 'dual-ed.key'}"]
    keys = load_keys(settings)
    assert [(k.selector, k.algorithm) for k in keys] == [
        ("gw1", RSA_SHA256),
        ("gw2", ED25519_SHA256),
    ]
    assert verify_all(sign(MESSAGE, keys), dns_for(*keys)) == [True, True]


def test_rsa_signature_is_dkimpys_own(rsa_key: DkimKey) -> None:
    """The OpenSSL RSA path computes exactly dkimpy's pure-Python signature (PKCS#1 v1.5
    is deterministic), so nothing but the speed changes (docs/decisions.md D16)."""
    import gateway.outbound.dkim as gd

    message = MESSAGE
    try:
        gd.FAST_RSA = False
        slow = dkim.DKIM(message).sign(
            b"gw1", b"example.com", rsa_key.private_key, canonicalize=(b"relaxed", b"relaxed")
        )
        gd.FAST_RSA = True
        fast = dkim.DKIM(message).sign(
            b"gw1", b"example.com", rsa_key.private_key, canonicalize=(b"relaxed", b"relaxed")
        )
    finally:
        gd.FAST_RSA = True
    # t= (signing time, seconds) may differ by one between the two calls; b= must match
    # whenever t= does.
    if slow.split(b"t=")[1][:10] == fast.split(b"t=")[1][:10]:
        assert slow == fast
    assert verify_all(fast + message, dns_for(rsa_key)) == [True]


def test_canonicalization_fast_paths_match_dkimpy() -> None:
    """gateway.outbound.dkim's substring-tested substitutions give exactly what dkimpy's
    `re.sub` calls give (copied here from dkimpy 1.1.8), on whitespace of every kind."""
    import random
    import re

    import dkim.canonicalization as canon

    reference = {
        "strip_trailing_whitespace": lambda c: re.sub(b"[\t ]+\r\n", b"\r\n", c),
        "compress_whitespace": lambda c: re.sub(b"[\t ]+", b" ", c),
        "unfold_header_value": lambda c: re.sub(b"\r?\n", b"", c),
    }
    rng = random.Random(6376)
    alphabet = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b".", b"\xc3\xa9"]
    samples = [b"", b" ", b"\t", b"\r\n", b"a \r\n", b"a\t\r\nb", b"x  y", b"x\r\n y", MESSAGE]
    samples += [
        b"".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(3000)
    ]
    for name, ref in reference.items():
        fast = getattr(canon, name)
        assert fast.__module__ == "gateway.outbound.dkim"  # the fast path is installed
        for sample in samples:
            assert fast(sample) == ref(sample), (name, sample)


def test_untidy_message_signature_verifies(rsa_key: DkimKey) -> None:
    """Tabs, runs of spaces, a folded header and trailing whitespace: the substitutions run."""
    untidy = MESSAGE.replace(b"Subject: [#42]", b"Subject:\t [#42]  Your\r\n\tprinter").replace(
        b"answer.\r\n", b"answer. \t\r\n  indented\r\n\r\n\r\n"
    )
    assert verify_all(sign(untidy, [rsa_key]), dns_for(rsa_key)) == [True]
