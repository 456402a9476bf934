"""Signed reply tokens and signed Message-IDs: how a reply finds its ticket (docs/design.md §4).

Two things we put into mail must come back to us intact and must not be forgeable:

* the **reply token** in the reply address, ``support+<token>@example.com`` (threading rule 2);
* the **Message-ID** of every message we send, which replies name in ``In-Reply-To`` /
  ``References`` (threading rule 3). Anyone can write ``<anything@our-host>``; only an id
  carrying our HMAC counts as ours (zammad#5064 shows what happens when a guessable ticket
  reference is enough to join a ticket).

Reply token format, version ``1`` (everything lowercase, so mail systems that lowercase local
parts cannot break it; the version character lets the format change later)::

    1 <mac:16 base32 chars> <ticket id in base 36> [ "." <person slug> ]

``mac`` is HMAC-SHA256 over the version, ticket id and person, truncated to 80 bits. The
person slug (``[a-z0-9_-]``) is carried verbatim: every character of that alphabet is
``atext`` (RFC 5322 §3.2.3) and case-proof, and ``.`` never occurs in it, so the separator
is unambiguous. The whole token is at most 56 characters, so ``support+<token>`` fits the
64-octet local-part limit of RFC 5321 §4.5.3.1.1.

Message-ID format, version ``1``::

    <g1.<kind>.<ticket id in base 36 or "-">.<nonce>.<mac>@<hostname>>

The hostname is deliberately outside the MAC, so renaming the host does not orphan the
threads already in customers' mailboxes; the nonce makes every id unique (RFC 5322 §3.6.4).

All verification is constant-time (``hmac.compare_digest``), case-insensitive, and never
raises on hostile input: anything truncated, altered or signed with another key is ``None``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MessageIdClaim",
    "ReplyClaim",
    "Signer",
]

TOKEN_VERSION = "1"  # noqa: S105 (a format version, not a password)
MESSAGE_ID_VERSION = "g1"
#: ``support+`` (8) + token must fit the 64-octet local part (RFC 5321 §4.5.3.1.1).
MAX_TOKEN_LENGTH = 56
_MAC_BYTES = 10  # 80 bits: the floor the design asks for; base32 of 10 bytes is 16 chars
_MAC_CHARS = 16
_NONCE_BYTES = 10

_PERSON_RE = re.compile(r"[a-z0-9_-]{1,32}")
_TOKEN_RE = re.compile(r"1([a-z2-7]{16})(0|[1-9a-z][0-9a-z]{0,12})(?:\.([a-z0-9_-]{1,32}))?")
_KIND_RE = re.compile(r"[a-z0-9-]{1,16}")
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_MSGID_LEFT_RE = re.compile(
    r"g1\.([a-z0-9-]{1,16})\.(-|0|[1-9a-z][0-9a-z]{0,12})\.([a-z2-7]{16})\.([a-z2-7]{16})"
)
_B36_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class ReplyClaim:
    """What a valid reply token says: the ticket, and the staff person it was issued to."""

    ticket_id: int
    person: str | None  # person id for staff tokens, None for customer tokens


@dataclass(frozen=True)
class MessageIdClaim:
    """What a valid signed Message-ID of ours says."""

    ticket_id: int | None  # None for mail not tied to a ticket
    kind: str  # what we sent: "msg", "ack", "notice", ...


def _b36(number: int) -> str:
    if number < 0:
        raise ValueError("ticket ids are non-negative")
    if number == 0:
        return "0"
    digits: list[str] = []
    while number:
        number, rem = divmod(number, 36)
        digits.append(_B36_DIGITS[rem])
    return "".join(reversed(digits))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


class Signer:
    """Issues and verifies reply tokens and Message-IDs with one secret key.

    ``previous`` keys are accepted when verifying (never used to sign), so the secret can be
    rotated without breaking replies to mail sent before the rotation.
    """

    def __init__(self, secret: bytes, previous: Iterable[bytes] = ()) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) == 0:
            # An empty key would let anyone compute valid tokens.
            raise ValueError("Signer needs a non-empty secret key (bytes)")
        self._keys = [bytes(secret), *(bytes(k) for k in previous if k)]

    # -- keyed MACs; separate labels so a token MAC can never pass as a Message-ID MAC ----------

    @staticmethod
    def _mac(key: bytes, label: bytes, *fields: str) -> str:
        message = label + b"\x00" + b"\x00".join(f.encode("ascii") for f in fields)
        digest = hmac.new(key, message, hashlib.sha256).digest()
        return _b32(digest[:_MAC_BYTES])

    def _matches(self, label: bytes, given: str, *fields: str) -> bool:
        ok = False
        for key in self._keys:
            # compare_digest on ASCII bytes: constant time, never raises.
            expected = self._mac(key, label, *fields).encode("ascii")
            ok |= hmac.compare_digest(expected, given.encode("ascii"))
        return ok

    # -- the installation ---------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A fingerprint of the signing key: an HMAC of a constant, never the key itself.

        Recorded in the database so that every node of one installation can check that it
        signs with the same key (docs/decisions.md D13.6). Knowing it does not help to forge a
        token (HMAC-SHA256 is a PRF: one output says nothing about others)."""
        return hmac.new(self._keys[0], b"support-gateway key fingerprint v1", "sha256").hexdigest()[
            :32
        ]

    def installation_id(self) -> str:
        """The value of our loop header: the same on every node that shares the key, unlike
        a node's host name (docs/decisions.md D13.7), and meaningless to anyone else."""
        return self.installation_ids()[0]

    def installation_ids(self) -> list[str]:
        """Our loop header values: the current key's and those of previous keys."""
        out = []
        for key in self._keys:
            mac = hmac.new(key, b"support-gateway installation v1", "sha256").digest()
            out.append("sgw-" + _b32(mac[:10]))
        return out

    # -- reply tokens -------------------------------------------------------------------------

    def reply_token(self, ticket_id: int, person: str | None = None) -> str:
        """Token for ``support+<token>@domain``; raises ValueError for an invalid person slug."""
        if isinstance(ticket_id, bool) or not isinstance(ticket_id, int) or ticket_id < 0:
            raise ValueError(f"invalid ticket id: {ticket_id!r}")
        if person is not None and not _PERSON_RE.fullmatch(person):
            raise ValueError(f"person id must match [a-z0-9_-]{{1,32}}: {person!r}")
        ticket = _b36(ticket_id)
        mac = self._mac(self._keys[0], b"reply-token", TOKEN_VERSION, ticket, person or "")
        token = TOKEN_VERSION + mac + ticket + (f".{person}" if person else "")
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError("reply token would not fit in a local part (ticket id too large)")
        return token

    def verify_reply_token(self, token: str) -> ReplyClaim | None:
        """The claim a token makes if it is ours and intact, else None (never raises)."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return None
        token = token.strip().lower()
        if not token.isascii():
            return None
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            return None
        mac, ticket, person = match.group(1), match.group(2), match.group(3)
        if not self._matches(b"reply-token", mac, TOKEN_VERSION, ticket, person or ""):
            return None
        return ReplyClaim(ticket_id=int(ticket, 36), person=person)

    def reply_address(
        self, local: str, domain: str, ticket_id: int, person: str | None = None
    ) -> str:
        """``local+<token>@domain``, e.g. ``support+1abc...@example.com``."""
        if "+" in local or "@" in local or "@" in domain:
            raise ValueError("local part must not contain '+' or '@'")
        return f"{local}+{self.reply_token(ticket_id, person)}@{domain}"

    def parse_reply_address(self, address: str) -> ReplyClaim | None:
        """Find ``+<token>`` in the local part of ``address``; None if absent or invalid.

        Accepts a bare address, ``<addr>`` or ``Name <addr>``; never raises.
        """
        if not isinstance(address, str):
            return None
        addr = address.strip()
        if "<" in addr:
            addr = addr[addr.rfind("<") + 1 :]
            addr = addr.split(">", 1)[0]
        local = addr.rsplit("@", 1)[0] if "@" in addr else addr
        local = local.strip().strip('"')
        if "+" not in local:
            return None
        return self.verify_reply_token(local.rsplit("+", 1)[1])

    # -- Message-IDs --------------------------------------------------------------------------

    def message_id(self, hostname: str, ticket_id: int | None = None, kind: str = "msg") -> str:
        """A fresh, unique, signed ``<...@hostname>``; raises ValueError on bad arguments."""
        if not _HOST_RE.fullmatch(hostname):
            raise ValueError(f"invalid hostname for a Message-ID: {hostname!r}")
        if not _KIND_RE.fullmatch(kind):
            raise ValueError(f"kind must match [a-z0-9-]{{1,16}}: {kind!r}")
        if ticket_id is not None and (
            isinstance(ticket_id, bool) or not isinstance(ticket_id, int) or ticket_id < 0
        ):
            raise ValueError(f"invalid ticket id: {ticket_id!r}")
        ticket = "-" if ticket_id is None else _b36(ticket_id)
        nonce = _b32(secrets.token_bytes(_NONCE_BYTES))
        mac = self._mac(self._keys[0], b"message-id", MESSAGE_ID_VERSION, kind, ticket, nonce)
        return f"<{MESSAGE_ID_VERSION}.{kind}.{ticket}.{nonce}.{mac}@{hostname.lower()}>"

    def verify_message_id(self, message_id: str) -> MessageIdClaim | None:
        """The claim of a Message-ID we generated and signed, else None (never raises).

        Accepts the id with or without angle brackets and surrounding whitespace.
        """
        if not isinstance(message_id, str) or len(message_id) > 998:
            return None
        text = message_id.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        if "@" not in text or not text.isascii():
            return None
        left = text.rsplit("@", 1)[0].lower()
        match = _MSGID_LEFT_RE.fullmatch(left)
        if match is None:
            return None
        kind, ticket, nonce, mac = match.groups()
        if not self._matches(b"message-id", mac, MESSAGE_ID_VERSION, kind, ticket, nonce):
            return None
        return MessageIdClaim(ticket_id=None if ticket == "-" else int(ticket, 36), kind=kind)

    def ticket_from_message_id(self, message_id: str) -> int | None:
        """The ticket id a signed Message-ID of ours names; None if unsigned/invalid/no ticket."""
        claim = self.verify_message_id(message_id)
        return None if claim is None else claim.ticket_id
