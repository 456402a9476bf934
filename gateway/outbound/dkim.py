"""DKIM keys and signatures for outbound mail (RFC 6376, ed25519 per RFC 8463).

Signing is the last step before delivery (docs/design.md §6): every header change made after
`sign()` breaks the signature. One `DKIM-Signature` is prepended per key, so a domain can
publish an RSA and an ed25519 key and sign with both (RFC 8463 §6: verifiers that do not
know ed25519 ignore that signature and check the RSA one).

Keys are read in the formats dkimpy's own `dknewkey` writes: a PEM RSA private key (PKCS#1
"RSA PRIVATE KEY" or PKCS#8 "PRIVATE KEY"), or an ed25519 seed as base64 text (or the 32
raw bytes, or an OpenSSL PKCS#8 ed25519 PEM). ed25519 needs PyNaCl (dkimpy's `ed25519`
extra) for signing and for deriving the public key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)

#: Header fields signed by default. Only fields present in the message are listed in h=
#: (once per occurrence); RFC 6376 §5.4.1 recommends this set for mail we originate.
DEFAULT_SIGNED_HEADERS: tuple[bytes, ...] = (
    b"From",
    b"To",
    b"Cc",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"In-Reply-To",
    b"References",
    b"Reply-To",
    b"Auto-Submitted",
    b"MIME-Version",
    b"Content-Type",
)

#: Fields listed one extra time in h= ("oversigning", RFC 6376 §8.15): a verifier then
#: treats a second, added From as signed-as-absent and the signature fails, so nobody can
#: prepend a forged From above ours and keep a passing signature.
OVERSIGNED_HEADERS: tuple[bytes, ...] = (b"from",)

#: RFC 8301 §3.2: verifiers MUST reject RSA keys under 1024 bits; 2048 is the norm.
MIN_RSA_BITS = 1024

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
# AlgorithmIdentifier of id-Ed25519 (RFC 8410 §3): SEQUENCE { OID 1.3.101.112 }.
_ED25519_ALG_ID = bytes.fromhex("300506032b6570")
# rsaEncryption OID 1.2.840.113549.1.1.1 followed by NULL parameters (RFC 8017 A.1).
_RSA_ALG_ID = bytes.fromhex("300d06092a864886f70d0101010500")


@dataclass(frozen=True)
class DkimKey:
    """One signing key: the d= domain, the s= selector and the private key material.

    `private_key` is what dkimpy signs with: PEM bytes for rsa-sha256, the base64 text of
    the 32-byte seed for ed25519-sha256.
    """

    domain: str
    selector: str
    private_key: bytes
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported DKIM algorithm {self.algorithm!r}; use {ALGORITHMS}")
        _check_label("domain", self.domain)
        _check_label("selector", self.selector)

    def __repr__(self) -> str:  # never print key material into logs
        return (
            f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, "
            f"algorithm={self.algorithm!r}, private_key=<redacted>)"
        )


def _check_label(what: str, value: str) -> None:
    # d= and s= are DNS names (RFC 6376 §3.5); anything else would make a record nobody
    # can publish, so refuse early rather than sign mail that can never verify.
    if not value or not value.isascii() or not re.fullmatch(r"[A-Za-z0-9._-]+", value):
        raise ValueError(f"invalid DKIM {what} {value!r}")


def load_key(path: Path, domain: str, selector: str) -> DkimKey:
    """Read a private key file; raise ValueError naming the file when it is not a key."""
    path = Path(path)
    data = path.read_bytes()
    try:
        private_key, algorithm = _parse_private_key(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a usable DKIM private key: {exc}") from None
    return DkimKey(domain=domain, selector=selector, private_key=private_key, algorithm=algorithm)


def _parse_private_key(data: bytes) -> tuple[bytes, str]:
    """Return (key material as dkimpy wants it, algorithm) or raise ValueError."""
    stripped = data.strip()
    pem = _PEM_RE.search(stripped.replace(b"\r\n", b"\n"))
    if pem is not None:
        label = pem.group(1).decode("ascii")
        try:
            der = base64.b64decode(b"".join(pem.group(2).split()), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64 in PEM block: {exc}") from None
        return _pem_key(label, der)
    if b"-----BEGIN" in stripped:
        raise ValueError("malformed PEM (no matching END line)")
    return _seed_key(data, stripped)


def _pem_key(label: str, der: bytes) -> tuple[bytes, str]:
    """A PEM block's key: an ed25519 PKCS#8 seed, or an RSA key re-armoured for dkimpy."""
    if label == "ENCRYPTED PRIVATE KEY":
        raise ValueError("encrypted private keys are not supported; store it unencrypted")
    if label == "PRIVATE KEY" and _ED25519_ALG_ID in der[:16] and len(der) >= 32:
        # PKCS#8 OneAsymmetricKey whose privateKey is OCTET STRING { 32-byte seed }
        # (RFC 8410 §7), as written by `openssl genpkey -algorithm ed25519`.
        return base64.b64encode(der[-32:]), ED25519_SHA256
    if label not in ("RSA PRIVATE KEY", "PRIVATE KEY"):
        raise ValueError(f"unexpected PEM block {label!r}")
    try:
        dkim.crypto.parse_private_key(der)
    except Exception as exc:  # dkimpy raises assorted errors on malformed ASN.1
        raise ValueError(f"unparsable RSA key ({exc})") from None
    # dkimpy's own PEM reader wants LF line endings and one base64 body.
    body = base64.encodebytes(der).strip()
    return (
        b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), body, label.encode()),
        RSA_SHA256,
    )


def _seed_key(data: bytes, stripped: bytes) -> tuple[bytes, str]:
    """A key that is not PEM: an ed25519 seed, raw or base64 (alone or with its public key)."""
    if len(data) == 32:  # the raw seed
        return base64.b64encode(data), ED25519_SHA256
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) == 32:  # dknewkey --ktype ed25519 writes base64(seed)
        return base64.b64encode(raw), ED25519_SHA256
    if len(raw) == 64:  # libsodium's secret key: seed || public key
        return base64.b64encode(raw[:32]), ED25519_SHA256
    raise ValueError("expected a PEM RSA key or a base64/raw 32-byte ed25519 seed")


# -- the RSA operation (docs/decisions.md D16.5) ---------------------------------------------
#
# dkimpy canonicalises and hashes (pure Python, cheap), then computes the RSA signature
# with Python big integers: 6.8-32 ms per 2048-bit signature, the larger part of signing.
# `cryptography` (OpenSSL) does the same RSASSA-PKCS1-v1_5 operation on the same digest in
# well under a millisecond (bench/loop_stall.py prints both). Signatures are deterministic
# (PKCS#1 v1.5), so the output is byte-identical to dkimpy's and verifies with dkimpy.
# The hook replaces only the final modular exponentiation; everything DKIM-specific stays
# dkimpy's. Set FAST_RSA = False to measure (or fall back to) the pure-Python path.

FAST_RSA = True
_pure_rsa_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_rsa_keys: dict[int, Any] = {}


def _cryptography_key(pk: dict[str, int]) -> Any:
    """The OpenSSL key for dkimpy's parsed key dict (cached by modulus: one per key)."""
    key = _rsa_keys.get(pk["modulus"])
    if key is None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        public = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"])
        key = rsa.RSAPrivateNumbers(
            p=pk["prime1"],
            q=pk["prime2"],
            d=pk["privateExponent"],
            dmp1=pk["exponent1"],
            dmq1=pk["exponent2"],
            iqmp=pk["coefficient"],
            public_numbers=public,
        ).private_key()
        _rsa_keys[pk["modulus"]] = key
    return key


def _rsa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    if FAST_RSA and getattr(hash, "name", "") == "sha256":
        try:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding, utils
        except ImportError:  # not installed: dkimpy's own arithmetic
            return bytes(_pure_rsa_sign(hash, private_key))
        key = _cryptography_key(private_key)
        return bytes(key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
    return bytes(_pure_rsa_sign(hash, private_key))


# dkimpy calls the name it imported into its package namespace.
dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign

# dkimpy parses the PEM private key (base64, then its pure-Python ASN.1 reader, twice) on
# every signature: ~0.29 ms of the ~1.2 ms an acknowledgement's signature costs, for the same
# few keys over and over. The parse is a pure function of the PEM bytes, so its result is
# kept per key (a handful: the configured keys and the brands'). dkimpy only reads the dict.
_pure_parse_pem_private_key = dkim.parse_pem_private_key
_parsed_keys: dict[bytes, dict[str, int]] = {}
#: Past this many distinct keys the cache is emptied (a bound, never reached in practice).
_PARSED_KEYS_MAX = 64


def _parse_pem_private_key(data: bytes) -> dict[str, int]:
    """dkimpy's `parse_pem_private_key`, parsed once per key (errors are not cached)."""
    parsed = _parsed_keys.get(data)
    if parsed is None:
        parsed = _pure_parse_pem_private_key(data)
        if len(_parsed_keys) >= _PARSED_KEYS_MAX:
            _parsed_keys.clear()
        _parsed_keys[bytes(data)] = parsed
    return parsed


dkim.parse_pem_private_key = _parse_pem_private_key

# dkimpy's relaxed canonicalization (RFC 6376 §3.4.2, §3.4.4) runs `re.sub` with a pattern
# string over every header field and the body: ~22 substitutions per signature, each a
# pattern-cache lookup and a copy, nearly all of which change nothing (our mail has no tabs,
# no runs of spaces, no folded or trailing-space lines). These do the same substitutions
# with compiled patterns, after a plain substring test that tells when a substitution
# cannot match: the output is byte for byte dkimpy's (tests/unit/test_dkim_sign.py), one
# signature costs ~0.1 ms less. dkimpy's canonicalizers look the names up in their module.
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
#: A run of two or more, or a lone tab: a lone space already is what "[\t ]+" -> " " makes
#: of it, and matching every space of a body (a substitution each) cost more than the rest of
#: the canonicalization.
_WSP = re.compile(rb"[\t ]{2,}|\t")
_NEWLINE = re.compile(rb"\r?\n")


def _strip_trailing_whitespace(content: bytes) -> bytes:
    # "[\t ]+\r\n" needs a space or tab right before a CRLF.
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


def _compress_whitespace(content: bytes) -> bytes:
    # "[\t ]+" -> " " changes nothing unless there is a tab or two spaces in a row.
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP.sub(b" ", content)


def _unfold_header_value(content: bytes) -> bytes:
    if b"\n" not in content:
        return content
    return _NEWLINE.sub(b"", content)


dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace
dkim.canonicalization.compress_whitespace = _compress_whitespace
dkim.canonicalization.unfold_header_value = _unfold_header_value


#: Signed once at start-up with every key (`warm_up`).
_WARM_UP = b"From: warm-up@localhost\r\nSubject: warm-up\r\n\r\nwarm-up\r\n"


def warm_up(keys: Sequence[DkimKey]) -> None:
    """Sign a throw-away message with each key, so that what the first real signature would
    do once happens now, before mail arrives: importing `cryptography` and its OpenSSL
    bindings, building the OpenSSL key from the PEM. Done in a delivery thread under load,
    that held the interpreter lock for ~100 ms, stalling the SMTP event loop
    (bench/loop_stall.py); a key that cannot sign fails here as it would on the first mail."""
    for key in keys:
        sign(_WARM_UP, [key])


def sign(
    message: bytes, keys: Sequence[DkimKey], *, headers: Sequence[bytes] | None = None
) -> bytes:
    """Return `message` with one DKIM-Signature prepended per key (keys[0]'s on top).

    Canonicalization is relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4): it survives the header
    refolding and trailing-whitespace changes that relays make. With no keys the message
    is returned unchanged (DKIM is optional in the configuration).
    """
    if not keys:
        return message
    wanted = [h.lower() for h in (headers if headers is not None else DEFAULT_SIGNED_HEADERS)]
    if b"from" not in wanted:
        raise ValueError("the From header field must be signed (RFC 6376 §5.4)")
    # The message is parsed once: the first key's signer carries the parse that says which
    # fields are present (dkim.sign would parse it again for the signature).
    first = dkim.DKIM(
        message, signature_algorithm=keys[0].algorithm.encode("ascii"), linesep=_linesep(message)
    )
    present = [name.lower() for name, _ in first.headers]
    if b"from" not in present:
        raise ValueError("message has no From header field; DKIM requires one")
    include: list[bytes] = []
    for name in dict.fromkeys(wanted):  # de-duplicate, keep order
        include.extend([name] * present.count(name))
        if name in OVERSIGNED_HEADERS:
            include.append(name)
    signatures = []
    for n, key in enumerate(keys):
        algorithm = key.algorithm.encode("ascii")
        try:
            # What dkim.sign does (a fresh signer per signature), minus the first re-parse.
            signer = (
                first
                if n == 0
                else dkim.DKIM(message, signature_algorithm=algorithm, linesep=first.linesep)
            )
            sig = signer.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                key.private_key,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=algorithm,
                include_headers=include,
            )
        except dkim.NaClNotFoundError:
            raise RuntimeError(
                "ed25519 DKIM signing needs PyNaCl (pip install 'dkimpy[ed25519]')"
            ) from None
        except dkim.DKIMException as exc:
            raise ValueError(f"DKIM signing with {key!r} failed: {exc}") from exc
        signatures.append(sig)
    return b"".join(signatures) + message


def _linesep(message: bytes) -> bytes:
    """The line ending the message's header uses (dkimpy folds the signature with it)."""
    head = message.split(b"\n\n", 1)[0]
    return b"\r\n" if b"\r\n" in head else b"\n"


def public_txt_record(key: DkimKey) -> str:
    """The TXT record value for `key`: 'v=DKIM1; k=rsa|ed25519; p=<base64>' (RFC 6376 §3.6.1)."""
    if key.algorithm == RSA_SHA256:
        pk = dkim.crypto.parse_pem_private_key(key.private_key)
        rsa_public = _der(0x30, _der_int(pk["modulus"]) + _der_int(pk["publicExponent"]))
        # SubjectPublicKeyInfo (RFC 5280 §4.1), the form DKIM verifiers expect in p=.
        spki = _der(0x30, _RSA_ALG_ID + _der(0x03, b"\x00" + rsa_public))
        return f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}"
    # RFC 8463 §4.2: p= is the raw 32-byte ed25519 public key, base64.
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(_ed25519_public(key)).decode('ascii')}"


def keygen(
    key_path: Path,
    *,
    domain: str,
    selector: str,
    algorithm: str = RSA_SHA256,
    bits: int = 2048,
) -> str:
    """Create a private key file (mode 0600, never overwriting) and return its DNS record.

    The return value is a zone-file line such as
    'gw1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=..."', with the value split
    into 255-octet character-strings (RFC 1035 §3.3.14, RFC 6376 §3.6.2.2).
    """
    key_path = Path(key_path)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported DKIM algorithm {algorithm!r}; use {ALGORITHMS}")
    _check_label("domain", domain)
    _check_label("selector", selector)
    if key_path.exists():
        raise FileExistsError(f"{key_path} already exists; refusing to overwrite a key")
    if algorithm == RSA_SHA256:
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys under {MIN_RSA_BITS} bits are rejected (RFC 8301 §3.2)")
        content = _generate_rsa_pem(bits)
    else:
        # Same format as dkimpy's `dknewkey --ktype ed25519`: base64 of a random seed.
        content = base64.b64encode(os.urandom(32)) + b"\n"
    # O_EXCL: refuse to clobber a key that appeared since the check above.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, content)
    finally:
        os.close(fd)
    key = load_key(key_path, domain, selector)
    return dns_record(key)


def dns_record(key: DkimKey) -> str:
    """The zone-file line publishing `key` (TXT value split into 255-char strings)."""
    value = public_txt_record(key)
    chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT {chunks}"


def _generate_rsa_pem(bits: int) -> bytes:
    """An unencrypted RSA private key in PEM (`cryptography` is a dependency: no openssl CLI)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _ed25519_public(key: DkimKey) -> bytes:
    try:
        import nacl.encoding
        import nacl.signing
    except ImportError:
        raise RuntimeError(
            "ed25519 DKIM keys need PyNaCl (pip install 'dkimpy[ed25519]')"
        ) from None
    signing = nacl.signing.SigningKey(key.private_key, encoder=nacl.encoding.Base64Encoder)
    return bytes(signing.verify_key)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _der_int(value: int) -> bytes:
    # Two's complement, big-endian, with a leading zero when the top bit is set.
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))
