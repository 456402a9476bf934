"""The bytes of a letter, written directly: what ``email.message`` would write, cheaper.

Every letter the gateway composes (acknowledgements, notifications, notices, hand-overs,
relayed staff answers) uses a handful of ``EmailMessage`` calls: set headers, ``set_content``
of a text, ``add_alternative`` of its HTML, ``add_attachment`` of decoded files, and
``as_bytes`` with the SMTP policy. The stdlib parses each header on assignment and again on
every read, builds policy and content-manager objects, and walks the result with a
generator: about a fifth of the pipeline's CPU for the two letters of every new ticket
(docs/performance.md §5). :class:`Draft` offers the same calls and writes the same bytes
(the multipart boundaries aside, which are random in both), with a short path for the
common case:

- a header whose ``Name: value`` fits in :data:`MAX_LINE`, without ``=?``, and whose value
  has a shape the stdlib's header classes give back unchanged (printable ASCII words with
  single spaces; ``addr`` or ``Name <addr>``; a Date that survives the stdlib's round trip;
  ``<id@host>``; the Content-* values written here) is written as it is; any other header
  (non-ASCII display names and subjects, long ``References``, parameters needing RFC 2231,
  values the stdlib would repair) is folded by the stdlib's own header class
  (``email.policy.SMTP``): RFC 2047 encoded words, folding at 78, exactly as before;
- a text body gets the content-transfer-encoding the stdlib's heuristics choose
  (``email.contentmanager``): 7bit for ASCII with lines within 78 bytes, 8bit for such UTF-8
  text, else quoted-printable or base64, whichever the stdlib's sniffing prefers;
- attachments are base64 in lines of 76 characters;
- lines end in CRLF; no line is longer than 998 octets (RFC 5322 §2.1.1): bodies are
  encoded when a line exceeds 78, and folded headers stay within 78 where the stdlib can.

tests/unit/test_letter_mime.py compares :class:`Draft`'s bytes with ``email.message``'s for
ASCII, German and Russian letters, long and odd header values and attachments, and parses
them back with the stdlib parser.
"""

from __future__ import annotations

import binascii
import functools
import random
import re
import sys
from collections.abc import Callable
from email import quoprimime
from email.headerregistry import HeaderRegistry
from email.policy import SMTP
from email.utils import encode_rfc2231, format_datetime, parsedate_to_datetime, quote
from typing import Any, cast

__all__ = ["MAX_LINE", "Draft", "header_line"]

#: The SMTP policy's fold width and the width of encoded body lines (RFC 5322 §2.1.1
#: recommends 78).
MAX_LINE = SMTP.max_line_length or 78
_CRLF = b"\r\n"
# Header values written as they are (when short and without "=?"): shapes for which the
# stdlib's header classes give back the very text they were given. Anything else (a display
# name needing quotes, a malformed address the stdlib would repair, non-ASCII) goes through
# them. Unstructured fields: printable ASCII words separated by single spaces.
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*\Z")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_ADDR = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_MAILBOX = rf"(?:{_ADDR}|{_ATOM}(?: {_ATOM})* <{_ADDR}>)"
_PARAM = r'; [a-z-]+="[ !#-\[\]-~]*"'


@functools.lru_cache(maxsize=64)
def _is_date(value: str) -> bool:
    # The stdlib writes a Date as format_datetime(parsedate_to_datetime(value)). Cached: the
    # letters of one ticket, and of every ticket in the same second, carry the same Date.
    try:
        return format_datetime(parsedate_to_datetime(value)) == value
    except (TypeError, ValueError):
        return False


_SHAPES: dict[str, Callable[[str], object]] = {
    "subject": _PLAIN.match,
    **dict.fromkeys(
        ("from", "to", "cc", "bcc", "reply-to", "sender"),
        re.compile(rf"{_MAILBOX}(?:, {_MAILBOX})*\Z").match,
    ),
    "date": _is_date,
    "message-id": re.compile(rf"<{_ADDR}>\Z").match,
    "mime-version": re.compile(r"1\.0\Z").match,
    "content-transfer-encoding": re.compile(r"(?:7bit|8bit|base64|quoted-printable)\Z").match,
    "content-type": re.compile(rf"[a-z0-9.+-]+/[a-z0-9.+-]+(?:{_PARAM})*\Z").match,
    "content-disposition": re.compile(rf"attachment(?:{_PARAM})?\Z").match,
}
# Line breaks the stdlib refuses in a header value (str.splitlines's set).
_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# The SMTP policy's header classes per lower-case name (``header_factory[name]`` builds a new
# class on every call).
_REGISTRY = cast(HeaderRegistry, SMTP.header_factory)
_HEADER_CLASSES: dict[str, Any] = {}
# RFC 5322 §3.6: fields that may appear at most once (the stdlib refuses a second one).
_UNIQUE = frozenset(
    [
        *("bcc", "cc", "content-disposition", "content-transfer-encoding", "content-type"),
        *("date", "from", "message-id", "mime-version", "orig-date", "reply-to", "sender"),
        *("subject", "to"),
    ]
)


# The Content-Type of a multipart entity written by _Part.write, with its boundary (see
# _boundary): too long for one line, the stdlib folds it before the boundary parameter.
_MULTIPART = re.compile(r'(multipart/[a-z]+); (boundary="={15}[0-9]{19}==(?:\.[0-9]+)?")\Z')


def _never(value: str) -> bool:
    return False


def header_line(name: str, value: str) -> bytes:
    """``Name: value`` CRLF, folded and encoded as ``email.policy.SMTP`` writes it."""
    key = name.lower()
    if len(name) + len(value) + 2 <= MAX_LINE and "=?" not in value:
        shape = _SHAPES.get(key)
        if shape is None:
            # Other fields the stdlib parses (orig-date, resent-*) always go through it.
            shape = _never if key in _REGISTRY.registry else _PLAIN.match
        if shape(value):
            return f"{name}: {value}\r\n".encode("ascii")
    elif key == "content-type":
        m = _MULTIPART.match(value)
        if m and len(name) + len(m[1]) + 3 <= MAX_LINE and len(m[2]) < MAX_LINE:
            return f"{name}: {m[1]};\r\n {m[2]}\r\n".encode("ascii")
    return _folded(name, value)


@functools.lru_cache(maxsize=256)
def _folded(name: str, value: str) -> bytes:
    """The stdlib's header class folds (and RFC 2047 encodes) the value: deterministic, and
    cached, because the same values come again: a ticket's subject in its acknowledgement
    and its notifications, a brand's or a person's name in every letter."""
    key = name.lower()
    cls = _HEADER_CLASSES.get(key)
    if cls is None:
        cls = _HEADER_CLASSES[key] = _REGISTRY[name]
    folded: str = cls(name, value).fold(policy=SMTP)
    return folded.encode("ascii", "surrogateescape")


def _check_value(value: str) -> None:
    # The stdlib's header_store_parse: a header value is one line (no header injection).
    if _BREAKS.search(value) and len(value.splitlines()) > 1:
        raise ValueError("Header values may not contain linefeed or carriage return characters")


def _base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 76 characters (57 octets each), CRLF after each line."""
    step = MAX_LINE // 4 * 3
    return b"".join(
        binascii.b2a_base64(data[i : i + step], newline=False) + _CRLF
        for i in range(0, len(data), step)
    )


# Octets quoted-printable writes as they are in a body (``quoprimime``'s body map): tab and
# printable ASCII but "=" (and the line breaks, which separate the lines here). Any other
# run is written "=XX" per octet.
_QP_UNSAFE = re.compile(r"[^\t\n -<>-~]+")


def _qp_quote(m: re.Match[str]) -> str:
    return "=" + m.group().encode("latin-1").hex("=").upper()


def _qp_lines(lines: list[bytes]) -> list[str]:
    """Each line (without its ending) as ``quoprimime.body_encode(..., MAX_LINE)`` writes
    it: octets quoted, soft line breaks ("=" then "\\n") within MAX_LINE, a trailing blank
    quoted. The stdlib quotes character by character through a table, then breaks each line
    it finds; lines are independent, so here they are quoted together by one regular
    expression, and only a line that needs breaking or ends in a blank (rare in a letter)
    goes to the stdlib itself."""
    quoted = _QP_UNSAFE.sub(_qp_quote, b"\n".join(lines).decode("latin-1")).split("\n")
    return [
        x
        if len(x) <= MAX_LINE and (not x or x[-1] not in " \t")
        else quoprimime.body_encode(raw.decode("latin-1"), MAX_LINE)
        for raw, x in zip(lines, quoted, strict=True)
    ]


def _encode_text(text: str) -> tuple[str, bytes]:
    """(content-transfer-encoding, body bytes) of a UTF-8 text part: the choice of
    ``email.contentmanager._encode_text`` under the SMTP policy (8bit allowed, 78 wide).

    The stdlib sniffs the first ten lines: quoted-printable unless base64 of them is
    shorter; quoted-printable is ``quoprimime.body_encode`` of the lines (ended by "\\n")
    with CRLF line endings, written here line by line (:func:`_qp_lines`)."""
    lines = text.encode("utf-8").splitlines()
    if max((len(x) for x in lines), default=0) <= MAX_LINE:
        body = _CRLF.join(lines) + _CRLF
        return ("7bit" if body.isascii() else "8bit"), body
    head = _qp_lines(lines[:10])
    sniff = _CRLF.join(lines[:10]) + _CRLF
    if sum(len(x) + 1 for x in head) > len(binascii.b2a_base64(sniff)):
        return "base64", _base64_lines(_CRLF.join(lines) + _CRLF)
    encoded = head + _qp_lines(lines[10:]) if len(lines) > 10 else head
    return "quoted-printable", ("\n".join(encoded) + "\n").replace("\n", "\r\n").encode("ascii")


class _Part:
    """One MIME entity: its headers in order and either a body or sub-parts."""

    __slots__ = ("body", "headers", "parts")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body: bytes | None = None
        self.parts: list[_Part] | None = None

    def content_headers(self) -> list[tuple[str, str]]:
        return [h for h in self.headers if h[0].lower().startswith("content-")]

    def drop_content(self) -> None:
        self.headers = [h for h in self.headers if not h[0].lower().startswith("content-")]
        self.body = self.parts = None

    def has(self, name: str) -> bool:
        key = name.lower()
        return any(n.lower() == key for n, _ in self.headers)

    def set_text(self, text: str, subtype: str) -> None:
        self.drop_content()
        cte, self.body = _encode_text(text)
        self.headers.append(("Content-Type", f'text/{subtype}; charset="utf-8"'))
        self.headers.append(("Content-Transfer-Encoding", cte))
        if not self.has("MIME-Version"):
            self.headers.append(("MIME-Version", "1.0"))

    def set_bytes(self, data: bytes, maintype: str, subtype: str, filename: str | None) -> None:
        self.drop_content()
        self.body = _base64_lines(data)
        self.headers.append(("Content-Type", f"{maintype}/{subtype}"))
        self.headers.append(("Content-Transfer-Encoding", "base64"))
        if filename is not None:
            self.headers.append(("Content-Disposition", _disposition(filename)))
        if not self.has("MIME-Version"):
            self.headers.append(("MIME-Version", "1.0"))
        if filename is None:  # add_attachment's default disposition comes last
            self.headers.append(("Content-Disposition", "attachment"))

    def subtype(self) -> str | None:
        """The multipart subtype, None for a single part."""
        if self.parts is None:
            return None
        for name, value in self.headers:
            if name.lower() == "content-type":
                return value.partition("/")[2].partition(";")[0].strip().lower()
        return None

    def make_multipart(self, subtype: str) -> None:
        """Move the content into a first sub-part (``EmailMessage._make_multipart``)."""
        current = self.subtype()
        if current == subtype:
            return
        if current is not None and subtype != "mixed":
            raise ValueError(f"Cannot convert {current} to {subtype}")
        inner = self.content_headers()
        if inner:
            first = _Part()
            first.headers, first.body, first.parts = inner, self.body, self.parts
            children = [first]
        else:
            children = []
        self.drop_content()
        self.parts = children
        self.headers.append(("Content-Type", f"multipart/{subtype}"))

    def write(self) -> bytes:
        """The entity's bytes (``BytesGenerator`` with the SMTP policy)."""
        headers = self.headers
        body = self.body or b""
        if self.parts is not None:
            texts = [p.write() for p in self.parts]
            boundary = _boundary(_CRLF.join(texts))
            headers = [
                (n, f'{v}; boundary="{boundary}"' if n.lower() == "content-type" else v)
                for n, v in headers
            ]
            dash = b"--" + boundary.encode("ascii")
            body = dash + _CRLF + (_CRLF + dash + _CRLF).join(texts) + _CRLF + dash + b"--\r\n"
        return b"".join(header_line(n, v) for n, v in headers) + _CRLF + body


def _disposition(filename: str) -> str:
    """``attachment; filename=...`` as ``set_param`` writes it: quoted ASCII, or RFC 2231
    (``filename*=utf-8''...``) for a name that is not ASCII."""
    if not filename:
        return "attachment; filename"
    if filename.isascii():
        return f'attachment; filename="{quote(filename)}"'
    return f"attachment; filename*={encode_rfc2231(filename, 'utf-8', '')}"


def _boundary(text: bytes) -> str:
    """A boundary like the generator's, checked against every line that could be mistaken
    for it (RFC 2046 §5.1.1)."""
    # Not a secret: uniqueness is what matters, checked below (the stdlib uses ``random`` too).
    base = "=" * 15 + f"{random.randrange(sys.maxsize):019d}" + "=="  # noqa: S311
    boundary, counter = base, 0
    while b"--" + boundary.encode("ascii") in text:
        boundary = f"{base}.{counter}"
        counter += 1
    return boundary


class Draft:
    """A letter being composed: the subset of ``EmailMessage`` the letters use.

    Headers keep the order they are set in; reading one (``draft["Subject"]``) gives the
    value as it was set (the stdlib gives a parsed header object whose ``str`` decodes
    encoded words). ``as_bytes`` writes what ``EmailMessage(policy=SMTP).as_bytes()`` would.
    """

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root = _Part()

    def __setitem__(self, name: str, value: str) -> None:
        _check_value(value)
        if name.lower() in _UNIQUE and self._root.has(name):
            raise ValueError(f"There may be at most 1 {name} headers in a message")
        self._root.headers.append((name, value))

    def __getitem__(self, name: str) -> str | None:
        key = name.lower()
        return next((v for n, v in self._root.headers if n.lower() == key), None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._root.has(name)

    def set_content(self, text: str, subtype: str = "plain") -> None:
        """The body: ``text`` as text/<subtype> in UTF-8."""
        if self._root.parts is not None:
            raise TypeError("set_content not valid on multipart")
        self._root.set_text(text, subtype)

    def add_alternative(self, text: str, subtype: str = "html") -> None:
        """Another rendering of the text body (multipart/alternative, RFC 2046 §5.1.4)."""
        self._root.make_multipart("alternative")
        part = _Part()
        part.set_text(text, subtype)
        assert self._root.parts is not None
        self._root.parts.append(part)

    def add_attachment(
        self, data: bytes, *, maintype: str, subtype: str, filename: str | None = None
    ) -> None:
        """A file, base64 (multipart/mixed). ``message`` and ``multipart`` types are refused:
        RFC 2046 §5 does not allow them base64 encoded."""
        if maintype.lower() in ("message", "multipart"):
            raise ValueError(f"cannot attach bytes as {maintype}/{subtype}")
        self._root.make_multipart("mixed")
        part = _Part()
        part.set_bytes(data, maintype, subtype, filename)
        assert self._root.parts is not None
        self._root.parts.append(part)

    def as_bytes(self) -> bytes:
        """The RFC 5322 bytes, CRLF line endings."""
        return self._root.write()
