"""Parse stage: raw bytes to a `ParsedMessage`, tolerating every defect.

Broken MIME, unknown charsets, missing or malformed headers never stop a message: each
accessor falls back to something safe and the defect is recorded. Only the raw bytes are
authoritative; everything here is derived and can be recomputed on replay.

Oversize policy (docs/oversize.md): a message larger than `smtp.max_message_size` keeps its
headers and text parts; the largest attachments are replaced by a short placeholder until it
fits, and each is listed in `not_kept` so the acknowledgement can say what we did not keep.

Depth bound (docs/decisions.md D10.8): the standard library's MIME parser, `walk()` and the
generator recurse once per nesting level, so a message nested ~1,000 levels deep raises
`RecursionError` (a poison message that used to end in the quarantine, silently). Real mail
nests a handful of levels (forwarded digests perhaps ten); past `MAX_MIME_DEPTH` the message
degrades: its top-level headers are kept, its body becomes one explanatory line plus the
original bytes as the attachment `original-message.eml`, and a defect says why. The same
degraded form is what the worker falls back to before quarantining a message
(`degraded()`), so a customer still gets a ticket and an acknowledgement.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import functools
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import (
    AddressHeader,
    HeaderRegistry,
    SingleAddressHeader,
    UniqueAddressHeader,
    UniqueSingleAddressHeader,
    UniqueUnstructuredHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage, Message
from email.policy import EmailPolicy, Policy
from html.parser import HTMLParser
from typing import Any, cast

from gateway.pipeline.mailparts import (
    address_pairs,
    charset,
    decode_words,
    decoded_payload,
    header_text,
    header_texts,
    payload,
    raw_headers,
)

_MSGID_RE = re.compile(r"<[^<>\s]+>")


class _ParsedOncePolicy(EmailPolicy):
    """``email.policy.default`` (CRLF) whose MIME header objects are made once per distinct
    (name, raw value) and then shared.

    The default policy parses a header on every read, and the email package reads a part's
    MIME headers many times: the feed parser asks its Content-Type three times,
    ``get_content_type``/``get_param``/``get_filename``/``get_content`` each again, so one
    ``Content-Type: text/plain; charset=utf-8`` was parsed ten times per message (10 of the
    13 header parses of a plain one-part message). A header object is a function of the
    name, the value and the header factory only (``EmailPolicy.header_fetch_parse``), and it
    is immutable (a ``str`` whose parse tree folding copies, never changes), so sharing it
    between reads and between messages changes no result
    (tests/unit/test_parse_policy_cache.py compares every corpus message with the plain
    policy).

    Memory: a header object is 4-15 kB (its own class, its parse tree) and grows ~5 kB per
    parameter, so only the MIME headers (the ones read again and again, and with few
    distinct values) of at most `_CACHED_VALUE_MAX` characters are kept, 128 of them
    (~2 MB; a few tens of MB if every one were a long, many-parameter value).
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if (
            type(value) is not str
            or len(value) > _CACHED_VALUE_MAX
            or name.lower() not in _CACHED_HEADERS
        ):
            return super().header_fetch_parse(name, value)
        return _header_object(self, name, value)

    def simple_text(self, lname: str, raw: str) -> str | None:
        """The text this policy gives a simple value, without its parser (`_simple_text`);
        None for any other value. `mailparts` asks a message's policy for it first."""
        return _simple_text(lname, raw)


#: Longest raw value whose parsed header object, address pairs or part presentation is kept.
_CACHED_VALUE_MAX = 200
_CACHED_HEADERS = frozenset(
    {"content-type", "content-disposition", "content-transfer-encoding", "mime-version"}
)


@functools.lru_cache(maxsize=128)
def _header_object(policy: EmailPolicy, name: str, value: str) -> Any:
    """What ``EmailPolicy.header_fetch_parse`` returns; raises what it raises (not cached)."""
    return EmailPolicy.header_fetch_parse(policy, name, value)


#: ``email.policy.default.clone(linesep="\r\n")`` with parsed headers kept (same registry).
_POLICY: Policy = _ParsedOncePolicy(
    header_factory=email.policy.default.header_factory, linesep="\r\n"
)
#: The header classes by lowercase name of that registry (the rest are unstructured).
_REGISTRY: dict[str, type] = cast(HeaderRegistry, email.policy.default.header_factory).registry


# ---------------------------------------------------------------------------- header texts
# The text the default policy gives a *simple* value is known without its parser, and
# mailparts' readers (`header_text`, `header_texts`, `header_values`, `first_header`) ask
# the message's policy for it first (`_ParsedOncePolicy.simple_text`).
# Each message's own From, Date, Subject and Message-ID are distinct values, so the per-value
# caches never hit them, and their parse was most of what was left of parse + classify
# (~190 us for one ``Name <a@b>``, ~60 us for a Date or a Message-ID). `_simple_text` answers
# only for values in narrow shapes (printable ASCII, no encoded word; a lone mailbox of plain
# atoms; one dot-atom msg-id); any other value, and any message not parsed with `_POLICY`, is
# read by the policy's parser exactly as before. tests/unit/test_parse_policy_cache.py checks the
# shortcut against the policy on generated values and every corpus header, and that it
# never answers where the policy's parser raises.

_PRINTABLE_RE = re.compile(r"[\t\x20-\x7e]*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE_MSGID_RE = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
# No "=" or "?" in a local part (the address parser tries encoded words there).
_LOCAL = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/^_`{|}~-]+)*"
_ADDR = rf"{_LOCAL}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_NAME = r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*"
_SIMPLE_MAILBOX_RE = re.compile(rf'(?:({_NAME})|"({_NAME})") <({_ADDR})>|({_ADDR})')
_UNSTRUCTURED = (UnstructuredHeader, UniqueUnstructuredHeader)
_MAILBOXES = (AddressHeader, UniqueAddressHeader, SingleAddressHeader, UniqueSingleAddressHeader)


def _simple_text(lname: str, raw: str) -> str | None:
    """``str(_POLICY.header_fetch_parse(lname, raw))`` for a simple value; None for others.

    The policy removes CR and LF, then: an unstructured header's text is the value itself
    unless it has encoded words; a lone ``Name <addr>``, ``"Name" <addr>`` or ``addr`` of
    plain atoms is written back as ``Name <addr>`` or ``addr``; a msg-id of dot-atoms is
    itself; a Date is ``format_datetime(parsedate_to_datetime(value))``, or the value when
    that raises ValueError (``email.headerregistry.DateHeader.parse``)."""
    value = raw.replace("\r", "").replace("\n", "")
    if not _PRINTABLE_RE.fullmatch(value):
        return None  # non-ASCII, 8-bit (surrogates), control characters
    kind = _REGISTRY.get(lname)
    if kind is None or kind in _UNSTRUCTURED:
        return None if "=?" in value else value
    if lname == "message-id":
        return value if _SIMPLE_MSGID_RE.fullmatch(value) else None
    if kind in _MAILBOXES:
        m = _SIMPLE_MAILBOX_RE.fullmatch(value)
        if m is None:
            return None
        name = m.group(1) or m.group(2)
        return f"{name} <{m.group(3)}>" if name else m.group(4)
    if lname == "date" and value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except ValueError:
            return value
        except Exception:  # the policy raises these: mailparts' fallback decides
            return None
        return email.utils.format_datetime(when)
    return None


#: Deepest MIME nesting read part by part; deeper mail is kept whole as an attachment.
MAX_MIME_DEPTH = 64
#: Most parts walked in one message (a flat bomb of 100,000 parts is no better).
MAX_MIME_PARTS = 5000
#: The file name of the original bytes in a degraded message.
ORIGINAL_NAME = "original-message.eml"


class TooDeep(Exception):
    """The MIME structure is nested deeper than `MAX_MIME_DEPTH` (or has too many parts)."""


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int


@dataclass
class ParsedMessage:
    raw: bytes
    msg: Message
    message_id: str | None
    in_reply_to: list[str]
    references: list[str]
    from_address: str
    from_name: str
    reply_to: str
    to: list[str]
    cc: list[str]
    subject: str
    date: datetime | None
    text: str
    html: str
    attachments: list[Attachment]
    headers: list[tuple[str, str]]
    defects: list[str] = field(default_factory=list)
    not_kept: list[dict[str, Any]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    @property
    def referenced_ids(self) -> list[str]:
        """In-Reply-To first, then References newest first (the likeliest parent first)."""
        seen: list[str] = []
        for mid in [*self.in_reply_to, *reversed(self.references)]:
            if mid not in seen:
                seen.append(mid)
        return seen


def normalise_message_id(value: str) -> str | None:
    m = _MSGID_RE.search(value or "")
    if m:
        return m.group(0)
    value = (value or "").strip()
    if value and " " not in value and "@" in value:
        return f"<{value}>"  # some mailers forget the angle brackets
    return None


def message_ids(value: str) -> list[str]:
    return _MSGID_RE.findall(value or "")


def address_pairs_of(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`mailparts.address_pairs`, kept per distinct values (up to `_CACHED_VALUE_MAX`
    characters): parse reads From and classify the same text again; To and Cc are mostly
    our own address, the same for every message."""
    if sum(len(v) for v in values) > _CACHED_VALUE_MAX:
        return tuple(address_pairs(list(values)))
    return _address_pairs(values)


@functools.lru_cache(maxsize=1024)
def _address_pairs(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(address_pairs(list(values)))


def _addresses(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for name, raw in address_pairs_of(tuple(values)):
        addr = raw.strip().strip("<>").strip()
        if "@" in addr:
            out.append((name, addr.lower()))
    return out


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "tr", "li", "h1", "h2", "h3"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    try:
        p.feed(html)
        p.close()
    except Exception:
        return re.sub(r"<[^>]+>", " ", html)
    text = "".join(p.parts)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _part_text(part: Message, defects: list[str]) -> str:
    try:
        if isinstance(part, EmailMessage):
            content = part.get_content()
            if isinstance(content, str):
                return content
    except Exception as exc:  # unknown charset, broken transfer encoding
        defects.append(f"body part decoding: {exc.__class__.__name__}")
    data = decoded_payload(part)
    if data is None:
        body = payload(part)
        return body if isinstance(body, str) else ""
    for cs in (charset(part), "utf-8", "cp1252", "latin-1"):
        try:
            return data.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("utf-8", "replace")


def walk_parts(msg: Message) -> list[Message]:
    """`msg.walk()` without recursion, in the same order; raises `TooDeep` past the bounds.

    `Message.walk()` is a recursive generator (one Python frame per level); this walks with
    an explicit stack so depth costs memory, not the interpreter's stack.
    """
    out: list[Message] = []
    stack: list[tuple[Message, int]] = [(msg, 1)]
    while stack:
        part, depth = stack.pop()
        if depth > MAX_MIME_DEPTH:
            raise TooDeep(f"MIME nesting deeper than {MAX_MIME_DEPTH} levels")
        out.append(part)
        if len(out) > MAX_MIME_PARTS:
            raise TooDeep(f"more than {MAX_MIME_PARTS} MIME parts")
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, Message))
    return out


@dataclass(frozen=True)
class Leaf:
    """One non-multipart part, with how it presents itself."""

    part: Message
    content_type: str
    filename: str
    disposition: str

    @property
    def body_kind(self) -> str | None:
        """ "text/plain" or "text/html" for an inline body part, else None (an attachment)."""
        inline = self.disposition != "attachment" and not self.filename
        if inline and self.content_type in ("text/plain", "text/html"):
            return self.content_type
        return None


def _presentation(part: Message) -> tuple[str, str, str]:
    """(content type, disposition, file name) of a leaf part, as `_read_presentation` gives
    them, kept per distinct (Content-Type, Content-Disposition, default type): the three
    answers depend on nothing else (``Message.get`` reads a header's first instance), and
    most parts of most mail share them. A part whose headers were set rather than parsed
    (header objects, not raw text) or are long is read directly."""
    if part.policy is _POLICY and type(part) is EmailMessage:
        ctype: str | None = None
        disposition: str | None = None
        for name, value in getattr(part, "_headers", None) or []:
            if type(value) is not str:
                return _read_presentation(part)
            lname = name.lower()
            if lname == "content-type" and ctype is None:
                ctype = value
            elif lname == "content-disposition" and disposition is None:
                disposition = value
        if len(ctype or "") + len(disposition or "") <= _CACHED_VALUE_MAX:
            return _presentation_of(ctype, disposition, part.get_default_type())
    return _read_presentation(part)


@functools.lru_cache(maxsize=1024)
def _presentation_of(
    ctype: str | None, disposition: str | None, default_type: str
) -> tuple[str, str, str]:
    """`_read_presentation` of a part with just these headers (None: absent)."""
    part = EmailMessage(policy=_POLICY)
    part.set_default_type(default_type)
    if ctype is not None:
        part.set_raw("Content-Type", ctype)
    if disposition is not None:
        part.set_raw("Content-Disposition", disposition)
    return _read_presentation(part)


def _read_presentation(part: Message) -> tuple[str, str, str]:
    try:
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = part.get_filename() or ""
    except Exception:
        return "application/octet-stream", "attachment", ""
    return ctype, disposition, filename


def leaf_parts(msg: Message, defects: list[str] | None = None) -> list[Leaf]:
    """Every leaf part of `msg` in order; never raises (a broken structure is one leaf)."""
    try:
        parts = walk_parts(msg)
    except TooDeep as exc:  # walking reads no header: the bounds are its only failure
        if defects is not None:
            defects.append(f"MIME structure: {exc.__class__.__name__}")
        parts = [msg]
    out: list[Leaf] = []
    for part in parts:
        if part.is_multipart():
            continue
        ctype, disposition, filename = _presentation(part)
        if ctype.startswith("multipart/"):
            continue
        out.append(Leaf(part, ctype, filename, disposition))
    return out


def _walk(msg: Message, defects: list[str]) -> tuple[str, str, list[Attachment]]:
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    for leaf in leaf_parts(msg, defects):
        part, ctype, filename = leaf.part, leaf.content_type, leaf.filename
        if leaf.body_kind == "text/plain":
            texts.append(_part_text(part, defects))
        elif leaf.body_kind == "text/html":
            htmls.append(_part_text(part, defects))
        else:
            size = len(decoded_payload(part) or b"")
            attachments.append(Attachment(filename or f"(unnamed {ctype})", ctype, size))
    return "\n".join(texts), "\n".join(htmls), attachments


def parse(raw: bytes, *, max_size: int | None = None, truncated_bytes: int = 0) -> ParsedMessage:
    """Parse raw bytes; never raises for malformed mail."""
    defects: list[str] = []
    not_kept: list[dict[str, Any]] = []
    if truncated_bytes:
        not_kept.append(
            {
                "what": "the end of the message",
                "size": truncated_bytes,
                "why": "message larger than the gateway accepts from the network",
            }
        )
    if max_size is not None and len(raw) > max_size:
        try:
            raw, dropped = trim_oversize(raw, max_size)
        except (RecursionError, TooDeep) as exc:
            return degraded(raw, _depth_reason(exc), not_kept=not_kept)
        not_kept.extend(dropped)
    try:
        msg = email.message_from_bytes(raw, policy=_POLICY)
        walk_parts(msg)  # the depth bound, before anything recursive touches the tree
    except (RecursionError, TooDeep) as exc:
        return degraded(raw, _depth_reason(exc), not_kept=not_kept)
    for d in getattr(msg, "defects", []):
        defects.append(d.__class__.__name__)
    text, html, attachments = _walk(msg, defects)
    return _build(raw, msg, defects, not_kept, text, html, attachments)


def _depth_reason(exc: BaseException) -> str:
    if isinstance(exc, TooDeep):
        return str(exc)
    return f"MIME nesting too deep to parse ({exc.__class__.__name__})"


def degraded(
    raw: bytes, reason: str, *, not_kept: list[dict[str, Any]] | None = None
) -> ParsedMessage:
    """The message as its top-level headers plus the original bytes as one attachment.

    Used when the structure cannot be read (nesting bound) and by the worker's last attempt
    before the quarantine: whoever reads the ticket gets sender, subject and the untouched
    original, and the defect names the reason. Never raises.
    """
    cut = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    head = raw[: min(cut)] if cut else raw
    try:
        msg = email.message_from_bytes(head + b"\r\n\r\n", policy=_POLICY)
        for name in {k.lower() for k in msg}:
            if name.startswith("content-") or name == "mime-version":
                del msg[name]
    except Exception:
        msg = EmailMessage(policy=_POLICY)
    text = (
        f"[This message could not be read normally: {reason}. The original message is"
        f" attached unchanged as {ORIGINAL_NAME}.]"
    )
    assert isinstance(msg, EmailMessage)
    msg.set_content(text)
    msg.add_attachment(raw, maintype="application", subtype="octet-stream", filename=ORIGINAL_NAME)
    attachments = [Attachment(ORIGINAL_NAME, "application/octet-stream", len(raw))]
    return _build(raw, msg, [f"degraded: {reason}"], list(not_kept or []), text, "", attachments)


def _words(value: str) -> str:
    """`decode_words`, without its cost for a value with no RFC 2047 encoded word in it.

    ``email.header.decode_header`` returns such a value whole with no charset (it looks for
    ``=?``), and ``make_header`` of that one chunk gives it back unchanged: most header
    values (Received, Date, Message-ID, DKIM-Signature...) are their own decoding."""
    return decode_words(value) if "=?" in value else value


def _unfolded(value: str) -> str:
    """A header value as `ParsedMessage.headers` keeps it: decoded, on one line."""
    return _words(value).replace("\r\n", "").replace("\n", "")


def _build(
    raw: bytes,
    msg: Message,
    defects: list[str],
    not_kept: list[dict[str, Any]],
    text: str,
    html: str,
    attachments: list[Attachment],
) -> ParsedMessage:

    headers = [(k, _unfolded(v)) for k, v in raw_headers(msg)]

    from_pairs = _addresses([header_text(msg, "From")])
    from_name, from_address = from_pairs[0] if from_pairs else ("", "")
    reply_pairs = _addresses([header_text(msg, "Reply-To")])
    date = None
    date_text = header_text(msg, "Date")
    if date_text:
        try:
            date = email.utils.parsedate_to_datetime(date_text)
            if date.tzinfo is None:
                date = None
        except (ValueError, TypeError, IndexError, OverflowError):  # no date, or none real
            defects.append("unparseable Date")
    if not text.strip() and html:
        text = html_to_text(html)
    subject = " ".join(header_text(msg, "Subject").split())
    return ParsedMessage(
        raw=raw,
        msg=msg,
        message_id=normalise_message_id(header_text(msg, "Message-ID")),
        in_reply_to=message_ids(header_text(msg, "In-Reply-To")),
        references=message_ids(header_text(msg, "References")),
        from_address=from_address,
        from_name=from_name,
        reply_to=reply_pairs[0][1] if reply_pairs else "",
        to=[a for _, a in _addresses(header_texts(msg, "To"))],
        cc=[a for _, a in _addresses(header_texts(msg, "Cc"))],
        subject=subject,
        date=date,
        text=text,
        html=html,
        attachments=attachments,
        headers=headers,
        defects=defects,
        not_kept=not_kept,
    )


def trim_oversize(raw: bytes, max_size: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Replace the largest attachments with placeholders until the message fits."""
    msg = email.message_from_bytes(raw, policy=_POLICY)
    dropped: list[dict[str, Any]] = []
    candidates = []
    for part in walk_parts(msg):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        is_body = ctype in ("text/plain", "text/html") and not part.get_filename()
        if not is_body:
            candidates.append(part)
    size = len(raw)
    for part in sorted(candidates, key=lambda p: len(str(p.get_payload())), reverse=True):
        if size <= max_size:
            break
        payload = str(part.get_payload())
        name = part.get_filename() or part.get_content_type()
        data = decoded_payload(part)
        real = len(data) if data is not None else len(payload)
        note = (
            f"[The attachment {name!r} ({real} bytes) was not kept: the message was larger"
            f" than this support address accepts ({max_size} bytes).]\r\n"
        )
        for h in ("Content-Transfer-Encoding", "Content-Disposition", "Content-Type"):
            del part[h]
        part.set_payload(note, charset="utf-8")
        part["Content-Disposition"] = "inline"
        size -= len(payload) - len(note)
        dropped.append({"what": f"attachment {name}", "size": real, "why": "message too large"})
    out = msg.as_bytes(policy=_POLICY)
    if len(out) > max_size:
        # Still too big (huge text): keep the headers and the first max_size bytes.
        cut = len(out) - max_size
        out = out[:max_size]
        dropped.append({"what": "the end of the message text", "size": cut, "why": "too large"})
    return out, dropped
