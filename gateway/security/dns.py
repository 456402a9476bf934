"""DNS lookups for sender authentication, behind one small injectable interface.

Everything in :mod:`gateway.security.sender_auth` (DKIM key lookups per RFC 6376 §3.6.2,
SPF evaluation per RFC 7208 §4-5, DMARC policy discovery per RFC 7489 §6.6.3) asks a
:class:`Resolver` for answers, so that tests and ``rules explain`` can run with no network
(:class:`StaticResolver`) while the daemon uses dnspython (:class:`SystemResolver`).

Answer shapes (``Resolver.query(name, rtype)``):

* ``TXT``: one string per record, the record's character-strings concatenated
  (RFC 6376 §3.6.2.2, RFC 7208 §3.3);
* ``A`` / ``AAAA``: address text; ``PTR``: target name without the trailing dot;
* ``MX``: ``"<preference> <exchange>"`` with the exchange lower-cased, no trailing dot.

NXDOMAIN and NODATA give ``[]``; timeouts and SERVFAIL raise :class:`DnsTempError`, which
callers turn into ``temperror`` results (RFC 8601 §2.7).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import dns.exception
import dns.name
import dns.resolver

__all__ = [
    "SUPPORTED_RTYPES",
    "DnsTempError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "normalize_name",
]

#: Record types the gateway asks for.
SUPPORTED_RTYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})


class DnsTempError(Exception):
    """A transient DNS failure (timeout, SERVFAIL, no reachable server): retry later."""


@runtime_checkable
class Resolver(Protocol):
    """Anything that answers DNS questions in the shapes described in the module docstring."""

    def query(self, name: str, rtype: str) -> list[str]:
        """Return the answers for ``name``/``rtype``; ``[]`` for NXDOMAIN or NODATA.

        Raises :class:`DnsTempError` on timeout or server failure.
        """
        ...


def normalize_name(name: str | bytes) -> str:
    """Lower-case a DNS name and drop a trailing root dot (``b"A.Example."`` → ``"a.example"``)."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.strip().rstrip(".").lower()


class StaticResolver:
    """Answers from a fixed table, for tests and offline ``rules explain``.

    ``records`` maps ``(name, rtype)`` to a list of answers; names are matched
    case-insensitively and without a trailing dot.  A key whose value is a
    :class:`DnsTempError` instance (or listed in ``temp_errors``) raises it, to exercise
    ``temperror`` paths.  Every question asked is appended to :attr:`queries`.
    """

    def __init__(
        self,
        records: Mapping[tuple[str, str], Sequence[str] | DnsTempError] | None = None,
        *,
        temp_errors: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._records: dict[tuple[str, str], list[str] | DnsTempError] = {}
        for (name, rtype), answers in (records or {}).items():
            key = (normalize_name(name), rtype.upper())
            self._records[key] = answers if isinstance(answers, DnsTempError) else list(answers)
        for name, rtype in temp_errors:
            key = (normalize_name(name), rtype.upper())
            self._records[key] = DnsTempError(f"simulated temporary failure for {name}/{rtype}")
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rtype: str, *answers: str) -> None:
        """Append answers for ``name``/``rtype`` (creating the entry)."""
        key = (normalize_name(name), rtype.upper())
        existing = self._records.get(key)
        current = existing if isinstance(existing, list) else []
        self._records[key] = [*current, *answers]

    def remove(self, name: str, rtype: str) -> None:
        """Forget every answer for ``name``/``rtype``: the name then has no such record."""
        self._records.pop((normalize_name(name), rtype.upper()), None)

    def query(self, name: str, rtype: str) -> list[str]:
        """Look ``name``/``rtype`` up in the table (see class docstring)."""
        key = (normalize_name(name), rtype.upper())
        self.queries.append(key)
        answers = self._records.get(key, [])
        if isinstance(answers, DnsTempError):
            raise answers
        return list(answers)


class SystemResolver:
    """dnspython-backed resolver with a per-question time budget.

    ``nameservers`` overrides ``/etc/resolv.conf`` (IP addresses).  ``timeout`` is the total
    lifetime of one question in seconds, retries included.  Searching the resolv.conf search
    list is disabled: authentication names are always absolute.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
    ) -> None:
        self.timeout = timeout
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        else:
            self._resolver = dns.resolver.Resolver(configure=True)
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(self._resolver.timeout, timeout)

    def query(self, name: str, rtype: str) -> list[str]:
        """Ask the configured servers; see the module docstring for answer shapes."""
        rtype = rtype.upper()
        if rtype not in SUPPORTED_RTYPES:
            raise ValueError(f"unsupported record type {rtype!r}")
        qname = normalize_name(name)
        if not qname:
            return []
        try:
            answer = self._resolver.resolve(
                qname + ".", rtype, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsTempError(f"{qname}/{rtype}: {exc}") from exc
        except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong):
            return []  # not a valid DNS name: nothing can exist there
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{qname}/{rtype}: {exc}") from exc
        if answer.rrset is None:
            return []
        out: list[str] = []
        for rdata in answer.rrset:
            if rtype == "TXT":
                # RFC 7208 §3.3 / RFC 6376 §3.6.2.2: character-strings are concatenated.
                out.append(b"".join(rdata.strings).decode("utf-8", "surrogateescape"))
            elif rtype in ("A", "AAAA"):
                out.append(str(rdata.address))
            elif rtype == "MX":
                out.append(f"{rdata.preference} {normalize_name(rdata.exchange.to_text())}")
            else:  # PTR
                out.append(normalize_name(rdata.target.to_text()))
        return out
