"""The front filter's spam verdict, and whether we may believe it: pure functions.

A support address is public, so most of what reaches it at scale is spam (docs/decisions.md D18).
The gateway does not score mail itself: a front MTA (Postfix with rspamd or SpamAssassin as a
milter, docs/spam.md) does, and writes its verdict into headers. Those headers are plain
text that any sender can write too (a spammer writes ``X-Spam-Flag: NO`` as easily as the
filter writes ``YES``), so they count only when the SMTP client that handed us the message
is one of our own front hosts, ``security.trusted_relays`` (client addresses or networks).
From anybody else the verdict is still read and recorded, marked *untrusted*, and never
acted on (Request Tracker's SpamAssassin filter, Zammad's ``X-Spam-Flag`` postmaster filter
and Znuny's PostMaster filters all make the same assumption: a trusted hop wrote it).

Headers read (the topmost occurrence: a front filter prepends its own above anything the
sender supplied, RFC 5321 §4.4 trace-header order):

- ``X-Spam-Flag: YES|NO`` (SpamAssassin, rspamd's milter in SpamAssassin-compatible mode);
- ``X-Spam-Status: Yes, score=7.3 required=5.0 tests=...`` (SpamAssassin);
- ``X-Spamd-Result: default: True [12.40 / 15.00]; ...`` (rspamd);
- ``X-Rspamd-Action: add header`` (rspamd: ``reject``, ``rewrite subject``, ``add header``
  and ``soft reject`` mean spam; ``no action`` and ``greylist`` do not);
- ``X-Spam-Score`` / ``X-Rspamd-Score`` (a bare score);
- ``X-MS-Exchange-Organization-SCL`` (Microsoft's spam confidence level: 5 and up is spam,
  -1 is mail the organisation trusts).

``Authentication-Results`` with a trusted authserv-id is governed by the same trust: see
:func:`authserv_ids_for` (used by the authenticate stage).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.security.relay import parse_networks

__all__ = [
    "SpamVerdict",
    "authserv_ids_for",
    "client_is_trusted_relay",
    "parse_networks",
    "read_spam_verdict",
    "relay_client",
]

_SCORE_RE = re.compile(r"score\s*=\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_REQUIRED_RE = re.compile(r"required\s*=\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_SPAMD_RE = re.compile(
    r"^\s*\w+\s*:\s*(true|false)\s*\[\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
#: rspamd actions that mean "this is spam"
# (https://rspamd.com/doc/faq.html#what-are-rspamd-actions).
_RSPAMD_SPAM = {"reject", "rewrite subject", "add header", "soft reject"}
_RSPAMD_HAM = {"no action", "greylist"}


@dataclass(frozen=True)
class SpamVerdict:
    """What the front filter said, and whether it is believed.

    ``spam`` is the filter's yes/no (None: no verdict header at all); ``score`` its score when
    one was given. ``trusted`` is True only when the SMTP client is a trusted relay; routes
    see ``spam``/``score`` only then (:attr:`spam_for_routes`, :attr:`score_for_routes`).
    """

    spam: bool | None = None
    score: float | None = None
    required: float | None = None
    source: str = ""  # the header the verdict came from
    trusted: bool = False
    client: str = ""
    reasons: tuple[str, ...] = field(default=())

    @property
    def present(self) -> bool:
        return self.spam is not None or self.score is not None

    @property
    def spam_for_routes(self) -> bool:
        return self.trusted and self.spam is True

    @property
    def score_for_routes(self) -> float | None:
        return self.score if self.trusted else None

    def describe(self) -> str:
        if not self.present:
            return "no spam verdict headers"
        what = {True: "spam", False: "not spam", None: "no yes/no"}[self.spam]
        if self.score is not None:
            what += f", score {self.score:g}"
            if self.required is not None:
                what += f" (required {self.required:g})"
        who = (
            f"trusted: client {self.client} is a trusted relay"
            if self.trusted
            else f"UNTRUSTED: client {self.client or '(unknown)'} is not in "
            "security.trusted_relays, so it is recorded and ignored"
        )
        return f"{self.source}: {what}; {who}"

    def to_json(self) -> dict[str, Any]:
        return {
            "spam": self.spam,
            "score": self.score,
            "required": self.required,
            "source": self.source,
            "trusted": self.trusted,
            "client": self.client,
        }


def client_is_trusted_relay(trusted_relays: Sequence[str], client_ip: str | None) -> bool:
    """Is the SMTP client one of our front hosts? (An IPv4-mapped IPv6 peer counts as its
    IPv4 address: a dual-stack listener reports ``::ffff:10.0.0.5``.)"""
    if not client_ip or not trusted_relays:
        return False
    try:
        ip = ipaddress.ip_address(client_ip.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    try:
        networks = parse_networks(trusted_relays)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def relay_client(peer: str, source: str) -> str:
    """The client address to judge trust by: the SMTP peer, or for pipe mode (``ingest``,
    run by the local MTA after its milters) the loopback address, so that listing
    ``127.0.0.1/32`` in ``trusted_relays`` trusts the local Postfix either way."""
    if peer:
        return peer
    return "127.0.0.1" if source == "pipe" else ""


def authserv_ids_for(
    trusted_authserv_ids: Sequence[str], trusted_relays: Sequence[str], client_ip: str | None
) -> list[str]:
    """The authserv-ids whose Authentication-Results may be believed for this message.

    With ``security.trusted_relays`` configured, only mail handed over by one of those hosts:
    a message sent straight to us can carry a forged ``Authentication-Results: mx.ours; dkim=pass``
    (RFC 8601 §5 says to remove such fields at the border; we refuse to read them instead).
    With no trusted relays configured, the older behaviour stands (every client; documented
    in docs/spam.md as a reason to configure them).
    """
    if not trusted_relays:
        return list(trusted_authserv_ids)
    return list(trusted_authserv_ids) if client_is_trusted_relay(trusted_relays, client_ip) else []


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return " ".join(str(value).split())
    return None


def _number(text: str) -> float | None:
    m = _NUMBER_RE.match(text)
    return float(m.group(1)) if m else None


@dataclass
class _Reading:
    """What the headers read so far say; each reader below adds its header's word."""

    headers: Sequence[tuple[str, str]]
    spam: bool | None = None
    score: float | None = None
    required: float | None = None
    sources: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _read_flag(r: _Reading) -> None:
    flag = _first(r.headers, "X-Spam-Flag")
    if flag is not None and flag.strip().lower() in ("yes", "no", "true", "false"):
        r.spam = flag.strip().lower() in ("yes", "true")
        r.sources.append("X-Spam-Flag")
        r.reasons.append(f"X-Spam-Flag: {flag.strip()}")


def _read_status(r: _Reading) -> None:
    status = _first(r.headers, "X-Spam-Status")
    if status is None:
        return
    word = status.split(",", 1)[0].strip().lower()
    if word in ("yes", "no"):
        if r.spam is None:
            r.spam = word == "yes"
        r.sources.append("X-Spam-Status")
    if (m := _SCORE_RE.search(status)) is not None:
        r.score = float(m.group(1))
    if (m := _REQUIRED_RE.search(status)) is not None:
        r.required = float(m.group(1))
    r.reasons.append(f"X-Spam-Status: {status[:80]}")


def _read_spamd(r: _Reading) -> None:
    result = _first(r.headers, "X-Spamd-Result")
    if result is None or (m := _SPAMD_RE.match(result)) is None:
        return
    if r.spam is None:
        r.spam = m.group(1).lower() == "true"
    if r.score is None:
        r.score, r.required = float(m.group(2)), float(m.group(3))
    r.sources.append("X-Spamd-Result")
    r.reasons.append(f"X-Spamd-Result: {result[:80]}")


def _read_rspamd_action(r: _Reading) -> None:
    action = _first(r.headers, "X-Rspamd-Action")
    if action is None:
        return
    word = action.strip().lower()
    if word in _RSPAMD_SPAM or word in _RSPAMD_HAM:
        if r.spam is None or word in _RSPAMD_SPAM:
            # The action is rspamd's final word: it overrides a "no" from a weaker header.
            r.spam = word in _RSPAMD_SPAM
        r.sources.append("X-Rspamd-Action")
        r.reasons.append(f"X-Rspamd-Action: {action.strip()}")


def _read_scores(r: _Reading) -> None:
    for name in ("X-Spam-Score", "X-Rspamd-Score"):
        value = _first(r.headers, name)
        if value is not None and r.score is None and (n := _number(value)) is not None:
            r.score = n
            r.sources.append(name)


def _read_scl(r: _Reading) -> None:
    scl = _first(r.headers, "X-MS-Exchange-Organization-SCL")
    if scl is not None and (n := _number(scl)) is not None:
        if r.spam is None:
            r.spam = n >= 5
        if r.score is None:
            r.score = n
        r.sources.append("X-MS-Exchange-Organization-SCL")


# The headers in the order they are read: an earlier header's verdict or score stands
# against a later one's, except rspamd's action (see _read_rspamd_action).
_READERS: tuple[Callable[[_Reading], None], ...] = (
    _read_flag,
    _read_status,
    _read_spamd,
    _read_rspamd_action,
    _read_scores,
    _read_scl,
)


def read_spam_verdict(
    headers: Sequence[tuple[str, str]], *, client_ip: str = "", trusted: bool = False
) -> SpamVerdict:
    """The verdict in ``headers`` (name, value pairs in message order). ``trusted`` is the
    caller's judgement of the client (:func:`client_is_trusted_relay`)."""
    r = _Reading(headers)
    for read in _READERS:
        read(r)
    return SpamVerdict(
        spam=r.spam,
        score=r.score,
        required=r.required,
        source=", ".join(dict.fromkeys(r.sources)),
        trusted=trusted and (r.spam is not None or r.score is not None),
        client=client_ip,
        reasons=tuple(r.reasons),
    )
