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
import functools
import re
from collections.abc import Iterator
from email.message import Message
from email.policy import Policy

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


def _parsed(name: str, raw: str, policy: Policy) -> str:
    """``str(msg[name])`` for a header whose raw value is ``raw``. A policy that knows the
    text of a simple value without its parser says so first (``simple_text``:
    gateway/pipeline/parse.py, the same text by construction and by test); raises what the
    policy's parser raises."""
    quick = getattr(policy, "simple_text", None)
    if quick is not None:
        text: str | None = quick(name, raw)
        if text is not None:
            return text
    return _policy_text(name, raw, policy)


@functools.lru_cache(maxsize=8192)
def _policy_text(name: str, raw: str, policy: Policy) -> str:
    """What the policy's parser makes of the value: it parses a header on every read
    (addresses, encoded words), and one message's headers are read many times by parse,
    classify and bounce; the text depends only on (name, raw value, policy). Raises what
    the parser raises (not cached)."""
    return str(policy.header_fetch_parse(name, raw))


def _raw_values(msg: Message, name: str) -> list[str]:
    """The stored (unparsed) values of every instance of a header, in order."""
    wanted = name.lower()
    return [v for k, v in raw_headers(msg) if k.lower() == wanted]


def _all_parsed(msg: Message, name: str) -> list[str]:
    """Every instance of a header as ``msg.get_all(name)`` gives it, as text; raises like it."""
    return [_parsed(name.lower(), v, msg.policy) for v in _raw_values(msg, name)]


def header_values(msg: Message, name: str) -> list[str]:
    """Every instance of a header, RFC 2047-decoded and stripped; [] if absent."""
    try:
        values = _all_parsed(msg, name)
    except Exception:  # the default policy parses on access, and parsers have bugs
        values = _raw_values(msg, name)
    return [decode_rfc2047(v).strip() for v in values]


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
    raw = _raw_values(msg, name)
    if not raw:
        return ""
    try:
        # Only the first instance is parsed, as `msg.get(name)` does.
        return _parsed(name.lower(), raw[0], msg.policy)
    except Exception:
        # Fall back to the raw header text (compat32 semantics).
        return decode_words(raw[0])


def header_texts(msg: Message, name: str) -> list[str]:
    """Every value of a header as text; the raw values, decoded, when the structured parser
    chokes (e.g. a malformed group such as `To: :;0`, found by hypothesis)."""
    try:
        return _all_parsed(msg, name)
    except Exception:
        return [decode_words(v) for v in _raw_values(msg, name)]


def address_pairs(values: list[str]) -> list[tuple[str, str]]:
    """(display name, address) pairs in header values, as `email.utils.getaddresses`."""
    try:
        return email.utils.getaddresses(values)
    except Exception:
        return []


# ------------------------------------------------------------------------------ parts


def content_type(part: Message) -> str:
    """The part's content type, lowercase; text/plain (RFC 2045 §5.2) when unreadable.

    What ``part.get_content_type()`` answers, without its cost on every call: with the
    default policy each call parses the header again (~0.1 ms), and robot detection and
    bounce reading ask ~30 times per message. The answer depends only on the first raw
    Content-Type value and the policy (else on the part's default type), so it is kept
    per distinct value."""
    try:
        for name, value in raw_headers(part):
            if name.lower() == "content-type":
                return _type_of(value, part.policy)
        return str(part.get_default_type()).lower()
    except Exception:
        return "text/plain"


@functools.lru_cache(maxsize=4096)
def _type_of(raw: str, policy: Policy) -> str:
    """``Message.get_content_type`` for a Content-Type header whose raw value is ``raw``."""
    try:
        value = str(policy.header_fetch_parse("Content-Type", raw))
    except Exception:
        return "text/plain"
    ctype = value.split(";", 1)[0].strip().lower()
    return ctype if ctype.count("/") == 1 else "text/plain"


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
