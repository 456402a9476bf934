"""What a bounce or report is about: which message of ours, which recipient, how final.

A bounce never opens a ticket (docs/design.md §3.7); it is attached to the ticket whose outbound
message bounced, found through the original Message-ID (ours are signed, see
``gateway.security.tokens``), and a permanent failure is told to the owner.

Sources, most reliable first:

* RFC 3464 delivery status (``message/delivery-status``, RFC 6533 ``global-`` variant):
  ``Final-Recipient``, ``Original-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``;
  the original in a ``message/rfc822`` or ``text/rfc822-headers`` part (RFC 6522 §3).
* RFC 5965 abuse feedback (ARF): ``Original-Rcpt-To``, ``Feedback-Type``, attached original.
* RFC 8098 disposition notifications (MDN): ``Original-Message-ID``, ``Disposition``.
* Anything else that ``classify`` recognises as a bounce (qmail, Exim, Exchange 2003, Gmail,
  Yahoo... text bounces): ``X-Failed-Recipients`` (Exim), recipient lines in the text before
  the returned copy, ``Message-ID:`` lines of the returned copy, and as a last resort the
  bounce's own ``In-Reply-To`` (Apache James, Verizon and some others set it).

``parse_bounce`` is pure and never raises; it returns None for mail that is not a bounce or
report (a person forwarding a message as an attachment is not a bounce).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser

from gateway.pipeline.classify import bounce_reasons
from gateway.pipeline.mailparts import (
    attached_message,
    content_type,
    decoded_payload,
    header_values,
    iter_parts,
    payload,
    raw_headers,
    text_parts,
)

__all__ = ["BounceInfo", "parse_bounce"]

_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_STATUS_RE = re.compile(r"(?<![\d.])([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![\d.])")
_MSGID_RE = re.compile(r"<([^<>\s@]+@[^<>\s]+)>")
# Bounded repetitions keep scanning linear on hostile text (no quadratic backtracking).
_ADDR = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}"
_ADDR_RE = re.compile(_ADDR)
# Recipient lines MTAs write before the returned copy.
_RCPT_LINE_RES = (
    re.compile(r"^[ \t>]*<(" + _ADDR + r")>\s*:", re.MULTILINE),  # Postfix, qmail
    # An address alone on its line, maybe bulleted: Exim, Sendmail, Gmail, Mimecast.
    re.compile(r"^[ \t>*-]*<?(" + _ADDR + r")>?\s*$", re.MULTILINE),
    # An address starting a line, then the reason: Sendmail "...", Exchange "on", "[User unknown]".
    re.compile(r"^[ \t>*-]*<?(" + _ADDR + r")>?\s*(?:\(|\[|\.\.\.|:|on\s)", re.MULTILINE),
    re.compile(r"RCPT TO:\s*<?(" + _ADDR + r")>?", re.IGNORECASE),
    re.compile(
        r"(?:recipients?|addresse?s?|user|mailbox|to)\s*(?:\([^)]*\))?\s*[:=]?\s*<("
        + _ADDR
        + r")>",
        re.IGNORECASE,
    ),
    re.compile(
        r"(?:recipients?|addresse?s?|mailbox)\s*:\s*(" + _ADDR + r")",
        re.IGNORECASE,
    ),
    # "Delivery failed 20 attempts: user@example.com" (IMail) and similar.
    re.compile(r":\s*<?(" + _ADDR + r")>?\s*$", re.MULTILINE),
)
# Where the returned copy of the original starts in text bounces.
_COPY_MARKER_RE = re.compile(
    r"^.*(?:this is a copy of the message|copy of the message|original message follows"
    r"|original message|returned message|message headers follow|unsent message"
    r"|headers of the original|message text follows).*$"
    r"|^(?:Received|Return-Path|DKIM-Signature|X-Received):",
    re.IGNORECASE | re.MULTILINE,
)
_BODY_MSGID_RE = re.compile(r"^[ \t>]*Message-ID\s*:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_FIELD_LINE_RE = re.compile(
    r"^[ \t>]*(Final-Recipient|Original-Recipient|Action|Status|Diagnostic-Code"
    r"|Original-Rcpt-To|Feedback-Type|Original-Message-ID|Disposition)\s*:\s*(.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_SMTP_LINE_RE = re.compile(r"^.*\b[45][0-9][0-9][ -].*$", re.MULTILINE)


@dataclass(frozen=True)
class BounceInfo:
    """What a bounce or report says about a message we sent."""

    kind: str  # "dsn" | "feedback" (ARF) | "mdn" | "heuristic" (non-standard bounce text)
    original_message_ids: tuple[str, ...]  # with <>, of the message that bounced
    failed_recipients: tuple[str, ...]  # lowercased; for ARF the complaining recipient
    status: str | None  # RFC 3463 enhanced status, e.g. "5.1.1"
    action: str | None  # failed | delayed | delivered | relayed | expanded
    diagnostic: str | None

    @property
    def permanent(self) -> bool:
        """A permanent failure: status 5.x.x (RFC 3463 §3.1) or action failed (RFC 3464)."""
        return (self.status or "").startswith("5") or self.action == "failed"


# --------------------------------------------------------------------------------------------
# Small helpers (none raises).

Fields = dict[str, list[str]]


def _unfold(value: str) -> str:
    return re.sub(r"\s*\r?\n[ \t]+", " ", value).strip()


def _block_fields(block: Message) -> Fields:
    fields: Fields = {}
    for name, value in raw_headers(block):
        fields.setdefault(name.strip().lower(), []).append(_unfold(value))
    return fields


def _text_blocks(text: str) -> list[Fields]:
    """Parse ``Field: value`` blocks separated by blank lines (RFC 3464 §2.1)."""
    blocks: list[Fields] = []
    current: Fields = {}
    last: tuple[str, int] | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            name, index = last
            current[name][index] += " " + line.strip()
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            key = name.strip().lower()
            current.setdefault(key, []).append(value.strip())
            last = (key, len(current[key]) - 1)
    if current:
        blocks.append(current)
    return blocks


def _report_blocks(part: Message) -> list[Fields]:
    """The field blocks of a message/delivery-status (or feedback/MDN) part."""
    body = payload(part)
    if isinstance(body, list):
        blocks = [_block_fields(b) for b in body if isinstance(b, Message)]
        return [b for b in blocks if b]
    if isinstance(body, str):
        data = decoded_payload(part)
        return _text_blocks(data.decode("utf-8", errors="replace") if data is not None else body)
    return []


def _typed_value(value: str) -> str:
    """``rfc822; <User@Example.com>`` -> ``user@example.com``; ``smtp; 550 ...`` -> ``550 ...``."""
    if ";" in value:
        value = value.split(";", 1)[1]
    return value.strip()


def _address(value: str) -> str | None:
    value = _typed_value(value).strip().strip("<>").strip()
    match = _ADDR_RE.search(value)
    return match.group(0).lower() if match else None


def _msgids(value: str) -> list[str]:
    ids = [f"<{m}>" for m in _MSGID_RE.findall(value)]
    if not ids:
        bare = value.strip()
        if bare and " " not in bare and "@" in bare and len(bare) < 250:
            ids = [f"<{bare.strip('<>')}>"]
    return ids


def _add(seq: list[str], items: list[str] | tuple[str, ...]) -> None:
    for item in items:
        if item and item not in seq:
            seq.append(item)


def _original_ids(msg: Message) -> list[str]:
    """Message-IDs of returned originals in message/rfc822 or text/rfc822-headers parts."""
    ids: list[str] = []
    for part in iter_parts(msg):
        ctype = content_type(part)
        if ctype in ("message/rfc822", "message/global") and part is not msg:
            inner = attached_message(part)
            if inner is not None:
                for value in header_values(inner, "Message-ID"):
                    _add(ids, _msgids(value))
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers"):
            data = decoded_payload(part)
            text = data.decode("utf-8", errors="replace") if data is not None else ""
            if data is None:
                body = payload(part)
                text = body if isinstance(body, str) else ""
            # The feed parser records defects instead of raising (email.parser docs).
            headers = HeaderParser().parsestr(text.lstrip("\r\n"), headersonly=True)
            for value in header_values(headers, "Message-ID"):
                _add(ids, _msgids(value))
        elif part is not msg and header_values(part, "Message-ID"):
            # A MIME part with a Message-ID is a returned original whose headers the MTA
            # pasted straight after a boundary (no Content-Type of its own).
            for value in header_values(part, "Message-ID"):
                _add(ids, _msgids(value))
    return ids


def _first_status(values: list[str]) -> str | None:
    for value in values:
        match = _STATUS_RE.search(value)
        if match:
            return match.group(1)
    return None


def _action(values: list[str]) -> str | None:
    for value in values:
        word = value.strip().split(None, 1)[0].lower() if value.strip() else ""
        if word in _ACTIONS:
            return word
    return None


# --------------------------------------------------------------------------------------------


def _from_dsn(blocks: list[Fields]) -> tuple[list[str], str | None, str | None, str | None]:
    """(recipients, status, action, diagnostic) from RFC 3464 field blocks.

    Recipients whose action is a success (delivered/relayed/expanded) are not failed ones;
    status/action/diagnostic come from the first recipient that did not succeed.
    """
    recipients: list[str] = []
    chosen: Fields | None = None
    first: Fields | None = None
    for block in blocks:
        if "final-recipient" not in block and "original-recipient" not in block:
            continue
        first = first or block
        action = _action(block.get("action", []))
        if action in ("delivered", "relayed", "expanded"):
            continue
        chosen = chosen or block
        for name in ("final-recipient", "original-recipient"):
            for value in block.get(name, []):
                address = _address(value)
                if address:
                    _add(recipients, [address])
    picked = chosen or first
    if picked is None:
        return recipients, None, None, None
    diagnostic = next((_typed_value(v) for v in picked.get("diagnostic-code", []) if v), None)
    status = _first_status(picked.get("status", [])) or _first_status([diagnostic or ""])
    return recipients, status, _action(picked.get("action", [])), diagnostic or None


def _before_copy(text: str) -> str:
    match = _COPY_MARKER_RE.search(text)
    return text[: match.start()] if match else text


def _returned_to(msg: Message, text: str) -> list[str]:
    """The single To address of the returned original, if there is exactly one."""
    addrs: list[str] = []
    for part in iter_parts(msg):
        inner = attached_message(part) if content_type(part) == "message/rfc822" else None
        if inner is not None:
            for header in ("To", "Cc"):
                for value in header_values(inner, header):
                    _add(addrs, [a.lower() for a in _ADDR_RE.findall(value)])
            break
    else:
        marker = _COPY_MARKER_RE.search(text)
        tail = text[marker.start() :] if marker else ""
        header_block = re.split(r"\n[ \t>]*\n", tail, maxsplit=2)
        for block in header_block[:2]:
            for match in re.finditer(r"^[ \t>]*(?:To|Cc)\s*:\s*(.+)$", block, re.I | re.M):
                _add(addrs, [a.lower() for a in _ADDR_RE.findall(match.group(1))])
    return addrs if len(addrs) == 1 else []


def _merged(blocks: list[Fields]) -> Fields:
    """The fields of several report blocks as one table, values in block order."""
    fields: Fields = {}
    for block in blocks:
        for name, values in block.items():
            fields.setdefault(name, []).extend(values)
    return fields


def _heuristic_recipients(msg: Message, text: str, fields: Fields, head: str) -> list[str]:
    """The failed recipients a text bounce names, most explicit source first."""
    recipients: list[str] = []
    for value in header_values(msg, "X-Failed-Recipients"):
        _add(recipients, [a.lower() for a in _ADDR_RE.findall(value)])
    for name in ("final-recipient", "original-recipient"):
        for value in fields.get(name, []):
            address = _address(value)
            if address:
                _add(recipients, [address])
    if recipients:
        return recipients
    own: set[str] = set()
    for header in ("From", "To", "Return-Path", "Sender", "Reply-To"):
        for value in header_values(msg, header):
            own.update(a.lower() for a in _ADDR_RE.findall(value))
    for pattern in _RCPT_LINE_RES:
        found = [m.group(1).lower() for m in pattern.finditer(head)]
        _add(recipients, [a for a in found if a not in own])
        if recipients:
            return recipients
    # Last resort (old Sendmail, v5): the returned copy was addressed to one recipient only.
    _add(recipients, _returned_to(msg, text))
    return recipients


def _heuristic_action(fields: Fields, status: str | None, head: str) -> str | None:
    """The Action field when there is one, else what the bounce's words say."""
    action = _action(fields.get("action", []))
    if action is not None:
        return action
    lowered = head.lower()
    if re.search(
        r"delay|will be retried|still being retried|warning|not yet been delivered", lowered
    ):
        return "delayed"
    if (status or "").startswith("5") or re.search(
        r"permanent|fatal|failed|could not be delivered|undeliverable|unable to deliver",
        lowered,
    ):
        return "failed"
    return None


def _heuristic(
    msg: Message, text: str
) -> tuple[list[str], str | None, str | None, str | None, list[str]]:
    """(recipients, status, action, diagnostic, ids) from a text bounce."""
    fields = _merged(
        _text_blocks(
            "\n".join(f"{m.group(1)}: {m.group(2)}" for m in _FIELD_LINE_RE.finditer(text))
        )
    )
    head = _before_copy(text)
    recipients = _heuristic_recipients(msg, text, fields, head)
    diagnostic = next((_typed_value(v) for v in fields.get("diagnostic-code", [])), None)
    if diagnostic is None:
        smtp = _SMTP_LINE_RE.search(head)
        diagnostic = smtp.group(0).strip()[:300] if smtp else None
    status = _first_status(fields.get("status", [])) or _first_status([diagnostic or "", head])
    action = _heuristic_action(fields, status, head)
    ids: list[str] = []
    for value in fields.get("original-message-id", []):
        _add(ids, _msgids(value))
    for match in _BODY_MSGID_RE.finditer(text):
        _add(ids, _msgids(match.group(1)))
    return recipients, status, action, diagnostic, ids


# Report parts by content type (RFC 3464, RFC 6533, RFC 5965, RFC 8098), by report kind.
_REPORT_KINDS = {
    "message/delivery-status": "dsn",
    "message/global-delivery-status": "dsn",
    "message/feedback-report": "feedback",
    "message/disposition-notification": "mdn",
    "message/global-disposition-notification": "mdn",
}


def _report_parts(msg: Message) -> dict[str, list[Fields]]:
    """The blocks of every machine-readable report part, by kind ("dsn", "feedback", "mdn")."""
    found: dict[str, list[Fields]] = {"dsn": [], "feedback": [], "mdn": []}
    for part in iter_parts(msg):
        kind = _REPORT_KINDS.get(content_type(part))
        if kind is not None:
            found[kind].extend(_report_blocks(part))
    return found


def _text_kind(msg: Message, envelope_sender: str | None, ids: list[str]) -> str | None:
    """The kind of a message without a report part: "feedback", "heuristic" or None."""
    subject = " ".join(header_values(msg, "Subject"))
    complaint = re.match(r"\s*complaint about message from", subject, re.IGNORECASE)
    if complaint and ids:
        return "feedback"  # Hotmail JMRP: original attached, no feedback-report part
    if bounce_reasons(msg, envelope_sender):
        return "heuristic"
    return None


def _parse(msg: Message, envelope_sender: str | None) -> BounceInfo | None:
    reports = _report_parts(msg)
    own_ids = {i for v in header_values(msg, "Message-ID") for i in _msgids(v)}
    ids = _original_ids(msg)
    text = text_parts(msg)
    recipients: list[str] = []
    status = action = diagnostic = None

    if reports["dsn"]:
        kind = "dsn"
        recipients, status, action, diagnostic = _from_dsn(reports["dsn"])
        if not recipients:
            more, _, _, _, _ = _heuristic(msg, text)
            _add(recipients, more)
    elif reports["feedback"]:
        kind = "feedback"  # RFC 5965 §3.1
        fields = _merged(reports["feedback"])
        for value in fields.get("original-rcpt-to", []):
            address = _address(value)
            if address:
                _add(recipients, [address])
        diagnostic = next((v for v in fields.get("feedback-type", []) if v), None)
    elif reports["mdn"]:
        kind = "mdn"  # RFC 8098 §3.2
        fields = _merged(reports["mdn"])
        for value in fields.get("original-message-id", []):
            _add(ids, _msgids(value))
        diagnostic = next((v for v in fields.get("disposition", []) if v), None)
    else:
        found = _text_kind(msg, envelope_sender, ids)
        if found is None:
            return None
        kind = found
        if kind == "heuristic":
            recipients, status, action, diagnostic, body_ids = _heuristic(msg, text)
            _add(ids, body_ids)
    ids = [i for i in _with_fallback_ids(ids, msg, text) if i not in own_ids]
    return BounceInfo(
        kind=kind,
        original_message_ids=tuple(ids),
        failed_recipients=tuple(recipients),
        status=status,
        action=action,
        diagnostic=(diagnostic[:500] if diagnostic else None),
    )


def _with_fallback_ids(ids: list[str], msg: Message, text: str) -> list[str]:
    """``ids``, or failing any, the Message-IDs the body names, or failing those, the
    In-Reply-To of the report itself."""
    if not ids:
        for match in _BODY_MSGID_RE.finditer(text):
            _add(ids, _msgids(match.group(1)))
    if not ids:
        for value in header_values(msg, "In-Reply-To"):
            _add(ids, _msgids(value))
    return ids


def parse_bounce(msg: Message, envelope_sender: str | None = None) -> BounceInfo | None:
    """What a bounce/report says, or None when ``msg`` is not one. Never raises.

    ``envelope_sender`` (optional) lets a null reverse-path count as a robot sender when the
    message itself carries no ``Return-Path``.
    """
    try:
        return _parse(msg, envelope_sender)
    except Exception:
        return None
