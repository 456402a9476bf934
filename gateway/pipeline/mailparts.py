"""Fail-safe access to the parts of a message: headers, MIME parts, payloads, text.

Mail is hostile input: header values may be malformed, non-ASCII or missing, MIME trees
broken, charsets unknown, transfer encodings wrong. Python's `email` package with the
default policy parses a header when it is *read*, and its parsers have bugs that raise
almost anything (AttributeError, IndexError, ValueError, HeaderParseError...; the
hypothesis tests in tests/unit found several). Parsing (parse.py), robot detection
(classify.py) and bounce reading (bounce.py) must never raise on a message
(docs/design.md §3: a classifier bug fails safe), so every read that can reach such a
parser goes through one function here, which never raises; its callers need no `try`.

Where the failure is known and narrow (decoding bytes in a charset) only that is caught.
Where the email package's own parsing runs on our behalf, `Exception` is caught on purpose,
once, here.
"""

from __future__ import annotations

import email.header
import email.utils
import re
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Any, TypeVar

from gateway.pipeline.subject import decode_rfc2047

__all__ = [
    "address_pairs",
    "attached_message",
    "charset",
    "content_type",
    "decode_words",
    "decoded_payload",
    "first_header",
    "header_names",
    "header_text",
    "header_texts",
    "header_values",
    "iter_parts",
    "param",
    "part_text",
    "payload",
    "raw_headers",
    "text_parts",
]


# ------------------------------------------------------------------------------ headers

_T = TypeVar("_T")
# Reads remembered per message (docs/performance.md §5): the default policy parses a header
# again on every read, and the stages read the same few headers of a message some 27 times.
# What was read is kept while the message's header list holds the same items; a part whose
# headers change (parse.py replacing a dropped attachment) is read afresh.
_READS = "_gateway_reads"


def _remembered(msg: Message, key: tuple[str, str], read: Callable[[], _T]) -> _T:
    headers = getattr(msg, "_headers", None)
    state = getattr(msg, "__dict__", None)
    if not isinstance(headers, list) or not isinstance(state, dict):
        return read()
    kept = state.get(_READS)
    # list == list compares item by item, identity first: a few pointer comparisons.
    if kept is None or kept[0] != headers:
        kept = state[_READS] = (list(headers), {})
    reads: dict[tuple[str, str], Any] = kept[1]
    if key not in reads:
        reads[key] = read()
    value: _T = reads[key]
    return value


def raw_headers(msg: Message) -> list[tuple[str, str]]:
    """(name, value) as stored, unparsed; what is left when parsing a header fails."""
    out: list[tuple[str, str]] = []
    for item in getattr(msg, "_headers", None) or []:
        if isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
    return out


def header_names(msg: Message) -> list[str]:
    """Header field names, as written."""
    try:
        return [str(k) for k in msg]
    except Exception:
        return [name for name, _ in raw_headers(msg)]


def header_values(msg: Message, name: str) -> list[str]:
    """Every instance of a header, RFC 2047-decoded and stripped; [] if absent."""
    return list(_remembered(msg, ("values", name.lower()), lambda: _header_values(msg, name)))


def _header_values(msg: Message, name: str) -> tuple[str, ...]:
    try:
        values = [str(v) for v in msg.get_all(name) or []]
    except Exception:  # the default policy parses on access, and parsers have bugs
        values = [v for k, v in raw_headers(msg) if k.lower() == name.lower()]
    return tuple(decode_rfc2047(v).strip() for v in values)


def first_header(msg: Message, name: str) -> str:
    """The first instance of `header_values`, or ""."""
    values = header_values(msg, name)
    return values[0] if values else ""


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded by the email package; the text itself if it cannot."""
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:  # HeaderParseError, LookupError, UnicodeError and parser bugs
        return text


def header_text(msg: Message, name: str) -> str:
    """The first value of a header as the policy parsed it; the raw value, decoded, when
    the structured parser chokes; "" when absent."""
    return _remembered(msg, ("text", name.lower()), lambda: _header_text(msg, name))


def _header_text(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:
        value = None
    if value is None:
        # Fall back to the raw header text (compat32 semantics).
        for k, v in raw_headers(msg):
            if k.lower() == name.lower():
                return decode_words(v)
        return ""
    return str(value)


def header_texts(msg: Message, name: str) -> list[str]:
    """Every value of a header as text; the raw values, decoded, when the structured parser
    chokes (e.g. a malformed group such as `To: :;0`, found by hypothesis)."""
    return list(_remembered(msg, ("texts", name.lower()), lambda: _header_texts(msg, name)))


def _header_texts(msg: Message, name: str) -> tuple[str, ...]:
    try:
        return tuple(str(v) for v in msg.get_all(name, []) or [])
    except Exception:
        return tuple(decode_words(v) for k, v in raw_headers(msg) if k.lower() == name.lower())


def address_pairs(values: list[str]) -> list[tuple[str, str]]:
    """(display name, address) pairs in header values, as `email.utils.getaddresses`."""
    try:
        return email.utils.getaddresses(values)
    except Exception:
        return []


# ------------------------------------------------------------------------------ parts


def content_type(part: Message) -> str:
    """The part's content type, lowercase; text/plain (RFC 2045 §5.2) when unreadable."""
    # Without a Content-Type header the type is the part's default (message/rfc822 in a
    # multipart/digest): part of what is remembered.
    default = str(getattr(part, "_default_type", ""))
    return _remembered(part, ("ctype", default), lambda: _content_type(part))


def _content_type(part: Message) -> str:
    try:
        return str(part.get_content_type()).lower()
    except Exception:
        return "text/plain"


def param(part: Message, name: str) -> str:
    """A Content-Type parameter, lowercase ("" if absent or unreadable)."""
    try:
        value = part.get_param(name)
    except Exception:
        return ""
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
        value = value[2]
    return str(value or "").strip().lower()


def charset(part: Message, default: str = "utf-8") -> str:
    try:
        return part.get_content_charset() or default
    except Exception:
        return default


def payload(part: Message) -> object:
    """`get_payload()`: a list of parts, a str, or None when unreadable."""
    try:
        return part.get_payload()
    except Exception:
        return None


def decoded_payload(part: Message) -> bytes | None:
    """The part's body with its transfer encoding undone, or None."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return None
    return data if isinstance(data, bytes) else None


def attached_message(part: Message) -> Message | None:
    """The message inside a message/rfc822 (or message/global) part, if readable."""
    inner = payload(part)
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        return inner[0]
    return None


def iter_parts(msg: Message, *, into_messages: bool = False, limit: int = 200) -> Iterator[Message]:
    """Walk MIME parts depth-first; by default do not descend into attached messages
    (message/rfc822), whose content is the *original* mail, not the report."""
    stack: list[Message] = [msg]
    seen = 0
    while stack and seen < limit:
        part = stack.pop()
        seen += 1
        yield part
        if content_type(part).startswith("message/") and not into_messages and part is not msg:
            continue
        children = payload(part)
        if isinstance(children, list):
            stack.extend(reversed([p for p in children if isinstance(p, Message)]))


def part_text(part: Message, max_bytes: int = 262144) -> str:
    """A leaf part's text in its charset (undecodable bytes replaced); at most `max_bytes`
    of the body are decoded, so a huge attachment is never decoded whole."""
    data = decoded_payload(part)
    if data is None:
        text = payload(part)
        return text if isinstance(text, str) else ""
    data = data[:max_bytes]
    try:
        return data.decode(charset(part), errors="replace")
    except (LookupError, ValueError):  # an unknown charset name
        return data.decode("utf-8", errors="replace")


def text_parts(msg: Message, max_chars: int = 65536) -> str:
    """The message's own text (text/plain, else text/html with tags dropped), not attachments'
    inner messages; at most ``max_chars`` characters."""
    chunks: list[str] = []
    total = 0
    for part in iter_parts(msg):
        ctype = content_type(part)
        if ctype.startswith("multipart/"):
            # A multipart whose boundary was never found keeps its body as one string
            # (StartBoundaryNotFoundDefect); bounces from hand-rolled MTAs do this.
            body = payload(part)
            if not isinstance(body, str):
                continue
            text = body
        elif ctype in ("text/plain", "text/html"):
            text = part_text(part)
        else:
            continue
        if ctype == "text/html":
            text = re.sub(r"<[^>]*>", " ", text)
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(chunks)[:max_chars]
