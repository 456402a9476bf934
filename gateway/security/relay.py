"""Trust in a front MTA: who was the real SMTP client when mail reached us through a relay.

Behind Postfix (relay mode: Postfix owns port 25 and passes the support domains to the
daemon on a loopback port; pipe mode: Postfix runs `support-gateway ingest`) the SMTP
client the daemon sees is Postfix itself. SPF (RFC 7208 §4) evaluated against 127.0.0.1
then says `fail` for every domain whose SPF lists its real servers, and the message looks
forged (docs/decisions.md D14.3). The facts that matter are what the *front MTA* saw.

`security.trusted_relays` lists the addresses or networks of such front hosts. When the
client is one of them (or the message came in through pipe mode, where the local MTA is the
only possible client), this module reads the client address and HELO name from the topmost
``Received`` header -- the one the trusted relay prepended (RFC 5321 §4.4: each hop adds its
trace field at the top) -- and the pipeline evaluates SPF against those. If that header
names another trusted relay (a chain: Postfix -> content filter -> Postfix), the next one down
is read, and so on. Headers below the first untrusted hop were written by strangers and are
never read.

Accepted ``Received`` forms (the "from" clause, RFC 5321 §4.4 ``From-domain`` and
``TCP-info``)::

    from HELO (RDNS [IP])          Postfix, Sendmail: "from mail.example (mail.example [192.0.2.1])"
    from HELO (unknown [IP])       Postfix when reverse DNS failed
    from HELO ([IP])               no reverse name at all
    from HELO (RDNS [IPv6:2001:db8::1])  IPv6 literal (RFC 5321 §4.1.3)
    from RDNS ([IP] helo=HELO)     Exim

A trailing ``:port`` after the bracket (Postfix ``smtpd_client_port_logging``) is ignored.
When the relay's header cannot be parsed, the client is *unknown* (``None``): SPF then says
``none``, never a false ``fail`` against the relay's own address.

``Authentication-Results`` (RFC 8601 §5): headers from ``security.trusted_authserv_ids`` are
honoured only when the message came through a trusted relay, since only a relay we trust
removes look-alike headers arriving from outside. With ``trusted_relays`` empty the previous
behaviour stands (trusted authserv-ids are honoured from any client) so existing
installations keep working.
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EffectiveClient",
    "effective_client",
    "effective_client_of",
    "is_trusted_relay",
    "parse_networks",
    "parse_received_from",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# "from HELO (RDNS [IP])", "from HELO ([IP])", "from RDNS ([IP] helo=HELO)"; IPv6 literals
# carry the "IPv6:" tag of RFC 5321 §4.1.3; Postfix may log ":port" after the bracket.
_FROM_RE = re.compile(
    r"^\s*from\s+(?P<name>\S+)\s*\(\s*(?:(?P<rdns>[^\s\[\]()]+)\s+)?"
    r"\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+)\](?::\d+)?(?:\s+helo=(?P<helo>[^\s)]+))?[^)]*\)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class EffectiveClient:
    """The client to judge the sender by, and which Authentication-Results to honour."""

    client_ip: str | None
    helo: str | None
    trusted_authserv_ids: tuple[str, ...]
    #: The trusted relay the facts were read through (None: direct connection).
    via: str | None = None


def parse_networks(values: Iterable[str]) -> list[Network]:
    """`["127.0.0.1/32", "::1", "10.0.0.0/8"]` -> networks; raise ValueError naming a bad one."""
    out: list[Network] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{v!r} is not an IP address or network (e.g. 127.0.0.1/32, ::1, 10.0.0.0/8)"
            ) from None
    return out


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket
    return addr


def _in(ip: str, networks: Sequence[Network]) -> bool:
    addr = _ip(ip)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def is_trusted_relay(settings: Any, ip: str | None) -> bool:
    """True when `ip` is listed in `security.trusted_relays` (addresses or networks)."""
    if not ip:
        return False
    return _in(ip, parse_networks(settings.security.trusted_relays))


def parse_received_from(value: str) -> tuple[str, str, str] | None:
    """The (helo, reverse name, ip) of a ``Received:`` "from" clause, or None (see module doc)."""
    m = _FROM_RE.match(" ".join(value.split()))
    if m is None or _ip(m.group("ip")) is None:
        return None
    ip = str(_ip(m.group("ip")))
    if m.group("helo"):  # Exim: the name outside the parentheses is the reverse name
        return m.group("helo"), m.group("name"), ip
    rdns = m.group("rdns") or ""
    return m.group("name"), "" if rdns.lower() == "unknown" else rdns, ip


def _received_headers(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\n\n")
    return [str(v) for v in msg.get_all("Received", [])]


def effective_client(
    *,
    peer: str | None,
    helo: str | None,
    source: str,
    raw: bytes,
    trusted_relays: Sequence[str],
    trusted_authserv_ids: Sequence[str],
) -> EffectiveClient:
    """Decide whose address and HELO the sender checks use (pure; see the module docstring).

    `source` is the spool envelope's (`smtp` or `pipe`): in pipe mode the local MTA that ran
    `ingest` is the relay, whatever `trusted_relays` says.
    """
    ids = tuple(trusted_authserv_ids)
    networks = parse_networks(trusted_relays)
    via_pipe = source == "pipe" and not peer
    if not via_pipe and not (peer and _in(peer, networks)):
        # A direct client: its own address counts; Authentication-Results are only honoured
        # without trusted_relays (legacy behaviour), as nothing vouches for them otherwise.
        return EffectiveClient(peer or None, helo or None, () if networks else ids)
    for value in _received_headers(raw):
        parsed = parse_received_from(value)
        if parsed is None:
            # The relay's own header without a "from" clause (e.g. Postfix "from userid 0"
            # for local submission): the origin is unknown.
            return EffectiveClient(None, None, ids, via=peer or "pipe")
        got_helo, _rdns, ip = parsed
        if _in(ip, networks):
            continue  # another trusted hop (content filter re-injection): look further down
        return EffectiveClient(ip, got_helo or None, ids, via=peer or "pipe")
    return EffectiveClient(None, None, ids, via=peer or "pipe")


def effective_client_of(raw: bytes, envelope: Any, settings: Any) -> EffectiveClient:
    """`effective_client` for a spool envelope and the settings (the pipeline's one call)."""
    sec = settings.security
    return effective_client(
        peer=envelope.peer,
        helo=envelope.helo,
        source=envelope.source,
        raw=raw,
        trusted_relays=sec.trusted_relays,
        trusted_authserv_ids=sec.trusted_authserv_ids,
    )
