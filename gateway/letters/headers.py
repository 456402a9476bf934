"""The headers of every letter the gateway writes, in one place (public helpers).

Every module that composes a letter (``gateway.letters.*``, and through them the pipeline,
the escalator, the handover and the alerts) sets its headers with these functions, so the
rules below are written once:

- ``Auto-Submitted`` (RFC 3834 §5): ``auto-replied`` on a letter that answers one message
  (acknowledgements), ``auto-generated`` on notices, ``no`` on a staff answer relayed to the
  customer (written by a person);
- ``X-Auto-Response-Suppress: All`` (Microsoft [MS-OXCMAIL] 2.2.3.2.20) for Exchange/Outlook;
- our loop header ``X-Support-Gateway-Loop: <installation id>`` (the same on every node): mail
  carrying it that comes back is recognised as our own (RFC 3834 §2, docs/design.md §3);
- ``In-Reply-To``/``References`` naming the message answered (RFC 3834 §3.1.5, RFC 5322
  §3.6.4), with ``References`` trimmed to the last ten ids (:func:`trim_references`);
- ``From`` of the ticket's identity or brand (docs/templates.md "Brands").

No ``Precedence`` header: RFC 3834 §3.1.8 discourages it on auto-replies. Nothing here
signs: DKIM is applied last, by the delivery worker, after every header is final
(docs/design.md §6). Letters are composed as :class:`gateway.letters.mime.Draft`: the bytes
``email.message`` would write with the SMTP policy, without its cost (docs/performance.md §5).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr
from typing import TYPE_CHECKING

from gateway.letters.mime import Draft

if TYPE_CHECKING:
    from gateway.letters.brands import Identity

__all__ = [
    "AUTO_GENERATED",
    "AUTO_REPLIED",
    "BY_A_PERSON",
    "LOOP_HEADER",
    "MAX_REFERENCES",
    "as_bytes",
    "brand_from",
    "clean_subject",
    "format_address",
    "new_message",
    "set_automatic",
    "set_base",
    "set_thread",
    "split_address",
    "tagged_subject",
    "trim_references",
]

#: Our own loop header (the classifier treats it as a loop when it comes back).
LOOP_HEADER = "X-Support-Gateway-Loop"
#: RFC 3834 §5.2: a reply to one message (an acknowledgement).
AUTO_REPLIED = "auto-replied"
#: RFC 3834 §5.1: automatic, not a reply to any one message (notices, alerts).
AUTO_GENERATED = "auto-generated"
#: RFC 3834 §5: written by a person (a staff answer relayed to the customer).
BY_A_PERSON = "no"
#: How many earlier ids ``References`` keeps before the parent (RFC 5322 §3.6.4 allows
#: trimming; ten keep the thread without letting a long thread grow the header forever).
MAX_REFERENCES = 10


def new_message() -> Draft:
    """An empty letter (written as the SMTP policy writes it: CRLF line endings)."""
    return Draft()


def as_bytes(msg: Draft) -> bytes:
    """The RFC 5322 bytes of ``msg`` (CRLF line endings)."""
    return msg.as_bytes()


def clean_subject(subject: str | None) -> str:
    """One line, single spaces."""
    return " ".join((subject or "").split())


def tagged_subject(ref: str, subject: str | None, no_subject: str = "(no subject)") -> str:
    """``[REF] subject``, without doubling a ``[REF]`` already present."""
    text = clean_subject(subject) or no_subject
    tag = f"[{ref}]"
    if tag.isascii() and text.isascii():
        # ASCII only: a case-insensitive match is a match of the lower-cased texts (the
        # regular expression below, without compiling one per reference).
        if tag.lower() in text.lower():
            return text
    elif re.search(rf"\[{re.escape(ref)}\]", text, re.IGNORECASE):
        return text
    return f"[{ref}] {text}"


def split_address(address: str) -> tuple[str, str]:
    """(local part without a ``+tag``, domain) of ``address``: the base of a reply address."""
    local, _, domain = address.rpartition("@")
    return local.split("+", 1)[0], domain


def format_address(name: str, address: str) -> str:
    """``"Name" <address>`` (RFC 5322 quoting when needed), or the bare address."""
    return formataddr((name, address)) if name else address


def brand_from(me: Identity, display: str | None = None) -> str:
    """The ``From`` of a letter sent as identity ``me`` (the installation or a brand);
    ``display`` replaces the identity's name (a relayed staff answer: "Alice via B2")."""
    name = me.from_name if display is None else display
    return format_address(name, me.from_address)


def trim_references(parent: str | None, references: Sequence[str] = ()) -> str:
    """The ``References`` of a letter answering ``parent``: the parent's own references
    (the last :data:`MAX_REFERENCES`, without the parent) and then the parent. "" without
    a parent. The one place the gateway trims ``References``."""
    if not parent:
        return ""
    earlier = [r for r in references if r and r != parent]
    return " ".join([*earlier[-MAX_REFERENCES:], parent])


def set_thread(msg: Draft, parent: str | None, references: Sequence[str] = ()) -> None:
    """``In-Reply-To`` and ``References`` naming ``parent`` (RFC 3834 §3.1.5); nothing
    without a parent."""
    if not parent:
        return
    msg["In-Reply-To"] = parent
    msg["References"] = trim_references(parent, references)


def set_automatic(msg: Draft, auto_submitted: str, loop: str) -> None:
    """``Auto-Submitted``, ``X-Auto-Response-Suppress`` and our loop header (``loop``: the
    installation id, ``Signer.installation_id()``; docs/design.md §3 rule 6)."""
    msg["Auto-Submitted"] = auto_submitted  # RFC 3834 §5
    msg["X-Auto-Response-Suppress"] = "All"  # [MS-OXCMAIL]; docs/design.md §3
    msg[LOOP_HEADER] = loop


def set_base(
    msg: Draft,
    *,
    from_header: str,
    to: str,
    subject: str,
    message_id: str,
    now: datetime,
    auto_submitted: str,
    loop: str,
) -> None:
    """From, To, Subject, Date, Message-ID and the automatic-mail headers, in that order.

    ``from_header`` is a full header value: :func:`brand_from` or :func:`format_address`.
    """
    msg["From"] = from_header
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = message_id
    set_automatic(msg, auto_submitted, loop)
