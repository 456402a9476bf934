"""Subject lines: normalisation for thread matching, and our ticket references (docs/design.md §4).

``normalise_subject`` gives the form two subjects of one conversation share, for the optional
"same normalised subject and same participants" threading rule (§4.6). ``find_ticket_refs``
finds our ``[ACME-1042]`` references (§4.5; a reference alone never proves the sender may join
the ticket, zammad#5064 — the caller checks participation).

Decisions:

* Reply/forward prefixes in the languages mail clients actually emit are stripped, however
  nested and mixed (``Re: AW: Fwd[2]: Re: x``), including counters (``Re[2]:``, ``Re(2):``,
  ``Re^2:``), French spacing (``Re :``) and full-width colons (``回复：``).
* **Leading bracketed tags are stripped too** (``[fedora-devel]``, ``[EXTERNAL]``), whether
  they come before or after a reply prefix, provided the tag has no whitespace inside. Such
  tags are added by intermediaries on some copies of a thread and not others: Mailman puts
  its list tag before ``Re:`` (``[list] Re: x``) while clients put ``Re:`` first
  (``Re: [list] x``), and corporate gateways stamp ``[EXTERNAL]`` on inbound copies only. So
  they are not part of the conversation's identity. Tags with spaces (``[Printer issue] x``)
  and tags in the middle or at the end of the subject are kept: those are what people typed.
* With ``prefix`` given, our own references (``[ACME-1042]``) are removed wherever they are.
* Encoded words (RFC 2047) are decoded first; input that is already decoded is left alone.
* The result is NFKC-normalised, whitespace-collapsed and casefolded: a comparison key, not
  something to show a person.
"""

from __future__ import annotations

import re
import unicodedata
from email.header import decode_header, make_header

__all__ = [
    "decode_rfc2047",
    "find_ticket_refs",
    "format_ref",
    "normalise_subject",
]

# Reply and forward prefixes, casefolded. Sources: Outlook/Thunderbird localisations and
# Wikipedia's "List of email subject abbreviations".
_PREFIX_WORDS = (
    "re",  # Latin "in re"; universal reply
    "aw",  # German Antwort
    "antw",  # Dutch/German
    "antwort",
    "sv",  # Scandinavian svar
    "vs",  # Finnish vastaus
    "rif",  # Italian riferimento
    "r",  # Italian Outlook reply
    "ref",
    "réf",
    "odp",  # Polish odpowiedź
    "ynt",  # Turkish yanıt
    "atb",  # Latvian
    "vá",  # Hungarian
    "απ",  # Greek reply
    "σχετ",  # Greek
    "回复",  # Chinese reply (simplified)
    "回覆",  # Chinese reply (traditional)
    "答复",
    "fwd",
    "fw",
    "wg",  # German weitergeleitet
    "tr",  # French transféré
    "rv",  # Spanish reenviado
    "enc",  # Portuguese encaminhado
    "pd",  # Polish przekazanie dalej
    "doorst",  # Dutch doorsturen
    "vb",  # Swedish vidarebefordrat
    "vl",  # Finnish välitetty
    "πρθ",  # Greek forward
    "转发",  # Chinese forward
    "轉寄",
)
_PREFIX_RE = re.compile(
    r"(?:"
    + "|".join(re.escape(w) for w in sorted(_PREFIX_WORDS, key=len, reverse=True))
    + r")\s*(?:\[\d{1,4}\]|\(\d{1,4}\)|\^\d{1,4})?\s*:\s*"
)
# A tag an intermediary adds: brackets, no whitespace, not empty, not absurdly long.
_TAG_RE = re.compile(r"\[[^\[\]\s]{1,64}\]\s*")
_TRAILER_RE = re.compile(r"\s*\((?:fwd|fw)\)\s*$")
_WS_RE = re.compile(r"\s+")


def decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded words in a header value; return it unchanged if it has none.

    Never raises: undecodable input comes back as it was given.
    """
    if not isinstance(value, str):
        return ""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # malformed encoded words, unknown charsets, ...
        return value


def _ref_re(prefix: str) -> re.Pattern[str]:
    # [ACME-1042], case-insensitive prefix, tolerant of inner spaces ("[ ACME-1042 ]").
    return re.compile(r"\[\s*" + re.escape(prefix) + r"-([0-9]{1,18})\s*\]", re.IGNORECASE)


def normalise_subject(subject: str, prefix: str | None = None) -> str:
    """The comparison key of a subject: prefixes, tags and our refs removed, casefolded."""
    if not isinstance(subject, str):
        return ""
    text = decode_rfc2047(subject)
    text = unicodedata.normalize("NFKC", text)
    if prefix:
        text = _ref_re(prefix).sub(" ", text)
    text = _WS_RE.sub(" ", text).strip().casefold()
    # Peel prefixes and leading tags in any order until none is left.
    while True:
        match = _PREFIX_RE.match(text) or _TAG_RE.match(text)
        if match is None or match.end() == 0:
            break
        text = text[match.end() :]
    text = _TRAILER_RE.sub("", text)
    return text.strip()


def find_ticket_refs(subject: str, prefix: str) -> list[str]:
    """Our references in a subject, canonical and in order: ``[acme-01042]`` -> ``ACME-1042``.

    References with another prefix are ignored; duplicates are reported once.
    """
    if not isinstance(subject, str) or not prefix:
        return []
    text = unicodedata.normalize("NFKC", decode_rfc2047(subject))
    refs: list[str] = []
    for match in _ref_re(prefix).finditer(text):
        ref = format_ref(prefix, int(match.group(1)))
        if ref not in refs:
            refs.append(ref)
    return refs


def format_ref(prefix: str, number: int) -> str:
    """``format_ref("acme", 1042) == "ACME-1042"`` (the canonical, upper-case form)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"invalid ticket number: {number!r}")
    return f"{prefix.upper()}-{number}"
