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

DNS trouble must not stall the pipeline (docs/decisions.md D10.2: with the nameservers unreachable
every message waited for two 5.4 s timeouts, one message at a time, about 5 messages a
minute).  Three bounds, each in the manner of a caching stub resolver (RFC 1035 §7.4,
RFC 2308 for negative caching, RFC 9520 for caching resolution failures):

* :class:`SystemResolver` caches answers for their TTL (capped), NXDOMAIN/NODATA for a short
  negative TTL and failures for a few seconds, so one message's lookups serve the next;
* it has a circuit breaker: after consecutive timeouts it declares the servers unreachable
  and answers :class:`DnsTempError` at once, while a background thread probes the servers
  and closes the breaker as soon as one answers; the pipeline never waits on a dead server;
* :class:`BudgetResolver` wraps any resolver for ONE message and gives all its questions a
  shared time budget (``security.dns_budget``); when it is spent every further question is a
  ``temperror`` at once, and :attr:`BudgetResolver.cut` records that it happened.

A ``temperror`` is never evidence either way: :mod:`gateway.security.verdict` turns it into
"wait and check again", never into "authentic" or "forged".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import dns.exception
import dns.name
import dns.resolver

__all__ = [
    "SUPPORTED_RTYPES",
    "BudgetResolver",
    "DnsTempError",
    "OfflineResolver",
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


class OfflineResolver:
    """Answers nothing: every question is a temporary failure, at once.

    Used when ``security.verify_senders`` is off but ``trusted_authserv_ids`` is set (a site
    without working DNS that relies on its front MTA): the trusted Authentication-Results
    are still read, and anything that would need DNS is ``temperror``, never a guess.
    """

    def query(self, name: str, rtype: str) -> list[str]:
        """Always raise :class:`DnsTempError`."""
        raise DnsTempError(f"{name}/{rtype}: DNS lookups are disabled (verify_senders = false)")


class BudgetResolver:
    """One message's view of a resolver: all its questions share ``budget`` seconds.

    The clock starts at the first question.  Each question is given at most the time left
    (when the inner resolver supports ``query_within``); once the budget is spent, further
    questions raise :class:`DnsTempError` without asking, and :attr:`cut` is set so the
    pipeline can record the cut on the message.  Thread-safe: the checks of one message run
    concurrently (see :func:`gateway.security.sender_auth.authenticate`).
    """

    def __init__(
        self,
        inner: Resolver,
        budget: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.budget = budget
        self._monotonic = monotonic
        self._deadline: float | None = None
        self._lock = threading.Lock()
        self.cut = False  # a question was refused or shortened because the budget ran out
        self.temp_errors = 0
        self.questions = 0

    def remaining(self) -> float:
        """Seconds left of the budget (the full budget before the first question)."""
        with self._lock:
            if self._deadline is None:
                return self.budget
            return self._deadline - self._monotonic()

    def query(self, name: str, rtype: str) -> list[str]:
        """Ask the inner resolver within what is left of the budget."""
        with self._lock:
            now = self._monotonic()
            if self._deadline is None:
                self._deadline = now + self.budget
            left = self._deadline - now
            self.questions += 1
            if left <= 0:
                self.cut = True
                self.temp_errors += 1
        if left <= 0:
            raise DnsTempError(f"{name}/{rtype}: per-message DNS budget of {self.budget:g}s spent")
        within = getattr(self.inner, "query_within", None)
        try:
            if within is not None:
                return list(within(name, rtype, left))
            return self.inner.query(name, rtype)
        except DnsTempError:
            with self._lock:
                self.temp_errors += 1
                if self._deadline is not None and self._monotonic() >= self._deadline:
                    self.cut = True
            raise


#: Cap on how long a positive answer is cached whatever its TTL (a key rotation shows up
#: within the hour; RFC 1035 §7.4 lets a resolver keep answers for less than their TTL).
MAX_CACHE_TTL = 3600.0
#: NXDOMAIN/NODATA are cached this long (RFC 2308 §5; short, so a freshly published
#: DKIM key or SPF record is seen within the minute).
NEGATIVE_TTL = 60.0
#: A SERVFAIL or timeout for one name is remembered this long (RFC 9520 §3.2 asks for at
#: least 1 s and at most 5 min): a burst of mail from one broken domain asks once.
FAILURE_TTL = 5.0
#: Consecutive timeouts (any names) that open the circuit breaker.
BREAKER_TIMEOUTS = 2
#: Seconds between probes while the breaker is open.
PROBE_INTERVAL = 5.0
#: Seconds a probe may take (the root's NS comes from any working resolver's cache).
PROBE_LIFETIME = 1.0
#: Entries kept in the cache at most (oldest dropped first).
CACHE_SIZE = 10_000


class SystemResolver:
    """dnspython-backed resolver with a per-question time budget, a cache and a breaker.

    ``nameservers`` overrides ``/etc/resolv.conf`` (IP addresses).  ``timeout`` is the total
    lifetime of one question in seconds, retries included.  Searching the resolv.conf search
    list is disabled: authentication names are always absolute.  See the module docstring
    for the cache and the circuit breaker.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        probe_interval: float = PROBE_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
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
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, list[str] | DnsTempError]] = {}
        self._timeouts = 0
        self._down_since: float | None = None
        self._probe_interval = probe_interval
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        #: Set while the breaker is open (tests and ``doctor`` may wait on it).
        self.breaker_open = threading.Event()

    # -- breaker -----------------------------------------------------------------------

    @property
    def unreachable(self) -> bool:
        """True while the breaker is open (the servers did not answer; a probe runs)."""
        with self._lock:
            return self._down_since is not None

    def _open(self) -> None:
        # (called with the lock held)
        if self._down_since is None:
            self._down_since = self._monotonic()
            self.breaker_open.set()

    def _record_timeout(self) -> None:
        """A question timed out: the servers are suspect.  A second consecutive timeout
        opens the breaker at once; after the first, the prober asks the root's NS right away
        and opens it if that times out too (one slow domain is not a dead resolver)."""
        with self._lock:
            self._timeouts += 1
            if self._timeouts >= BREAKER_TIMEOUTS:
                self._open()
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(
                    target=self._probe, name="dns-breaker-probe", daemon=True
                )
                self._prober.start()

    def _record_answer(self) -> None:
        with self._lock:
            self._timeouts = 0
            self._down_since = None
            self.breaker_open.clear()

    def close(self) -> None:
        """Stop the probe thread (the daemon's stop): it ends after its current ping, at
        most PROBE_LIFETIME later; not joined, so a stop never waits on a dead server."""
        self._closed.set()

    def _ping(self) -> bool:
        """Do the servers answer at all?  The root's NS: any working recursive resolver has
        it in its cache, so only a dead or unreachable server makes this time out."""
        try:
            self._resolver.resolve(".", "NS", search=False, lifetime=PROBE_LIFETIME)
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            return False
        except dns.exception.DNSException:
            return True  # an answer of any kind (even NXDOMAIN): the servers are there
        except Exception:  # never let the probe thread die silently with the breaker open
            return False
        return True

    def _probe(self) -> None:
        """Ping now; while the breaker is open, ping again every ``probe_interval``.  The
        first answer closes the breaker; a failed ping opens it."""
        while not self._closed.is_set():
            if self._ping():
                self._record_answer()
                return
            with self._lock:
                self._open()
            if self._closed.wait(self._probe_interval):
                return

    # -- cache -------------------------------------------------------------------------

    def _cached(self, key: tuple[str, str]) -> list[str] | DnsTempError | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            expires, value = hit
            if expires <= self._monotonic():
                del self._cache[key]
                return None
            return value

    def _store(self, key: tuple[str, str], value: list[str] | DnsTempError, ttl: float) -> None:
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (self._monotonic() + ttl, value)

    # -- questions ---------------------------------------------------------------------

    def query(self, name: str, rtype: str) -> list[str]:
        """Ask the configured servers; see the module docstring for answer shapes."""
        return self.query_within(name, rtype, self.timeout)

    def query_within(self, name: str, rtype: str, seconds: float) -> list[str]:
        """:meth:`query` with at most ``seconds`` (never more than ``timeout``) to answer."""
        rtype = rtype.upper()
        if rtype not in SUPPORTED_RTYPES:
            raise ValueError(f"unsupported record type {rtype!r}")
        qname = normalize_name(name)
        if not qname:
            return []
        key = (qname, rtype)
        cached = self._cached_or_refused(key)
        if cached is not None:
            return cached
        lifetime = max(0.05, min(self.timeout, seconds))
        try:
            answer = self._resolver.resolve(
                qname + ".", rtype, search=False, raise_on_no_answer=False, lifetime=lifetime
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            self._record_answer()
            self._store(key, [], NEGATIVE_TTL)
            return []
        except dns.exception.Timeout as exc:
            self._record_timeout()
            err = DnsTempError(f"{qname}/{rtype}: {exc}")
            self._store(key, err, FAILURE_TTL)
            raise err from exc
        except dns.resolver.NoNameservers as exc:
            # SERVFAIL/REFUSED from every server: this name is broken, the servers are not.
            err = DnsTempError(f"{qname}/{rtype}: {exc}")
            self._store(key, err, FAILURE_TTL)
            raise err from exc
        except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong):
            return []  # not a valid DNS name: nothing can exist there
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{qname}/{rtype}: {exc}") from exc
        self._record_answer()
        if answer.rrset is None:
            self._store(key, [], NEGATIVE_TTL)
            return []
        out = [_rdata_text(rtype, rdata) for rdata in answer.rrset]
        self._store(key, out, min(float(answer.rrset.ttl), MAX_CACHE_TTL))
        return list(out)

    def _cached_or_refused(self, key: tuple[str, str]) -> list[str] | None:
        """A cached answer (a copy), None to ask the servers; raises a cached failure, or
        when the breaker is open."""
        qname, rtype = key
        cached = self._cached(key)
        if isinstance(cached, DnsTempError):
            raise DnsTempError(f"{qname}/{rtype}: {cached} (cached failure)")
        if cached is not None:
            return list(cached)
        if self.unreachable:
            raise DnsTempError(f"{qname}/{rtype}: DNS servers unreachable (breaker open)")
        return None


def _rdata_text(rtype: str, rdata: Any) -> str:
    """One record of an answer as text (module docstring: answer shapes)."""
    if rtype == "TXT":
        # RFC 7208 §3.3 / RFC 6376 §3.6.2.2: character-strings are concatenated.
        return b"".join(rdata.strings).decode("utf-8", "surrogateescape")
    if rtype in ("A", "AAAA"):
        return str(rdata.address)
    if rtype == "MX":
        return f"{rdata.preference} {normalize_name(rdata.exchange.to_text())}"
    return normalize_name(rdata.target.to_text())  # PTR
