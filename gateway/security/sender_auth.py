"""Inbound sender authentication: DKIM, SPF, DMARC and ARC, or a trusted front MTA's verdict.

:func:`authenticate` turns a raw inbound message plus its SMTP envelope into an
:class:`AuthResult`, which the pipeline stores on the message and consults before sending an
acknowledgement (docs/design.md §3 rule 8: never ack a likely-forged sender, that is backscatter)
and before trusting a ``From:`` address (docs/design.md §5).

What is checked, and where the standards come in:

* **DKIM** (RFC 6376, RFC 8463 for ed25519-sha256): *every* ``DKIM-Signature`` header is
  verified with dkimpy, each on its own (``dkim.verify`` only looks at the first).  Results use
  the RFC 8601 §2.7.1 vocabulary, narrowed to ``pass | fail | temperror | permerror``.
  ed25519 needs PyNaCl (dkimpy's optional dependency); without it such signatures are
  ``permerror`` (RFC 6376 §6.1.1: unsupported algorithm).
* **SPF** (RFC 7208) with pyspf.  The MAIL FROM identity is checked; for the null sender
  (``<>``) the HELO identity, as ``postmaster@<helo>`` (RFC 7208 §2.3, §2.4).  pyspf's DNS goes
  through the injected :class:`~gateway.security.dns.Resolver` by overriding ``query.dns`` in a
  per-call subclass (no global monkeypatch, so concurrent checks with different resolvers are
  safe).
* **DMARC** (RFC 7489): policy discovery per §6.6.3 (``_dmarc.<From domain>``, then the
  organizational domain's record), identifier alignment per §3.1 (relaxed unless
  ``adkim=s``/``aspf=s``), ``sp=`` for subdomains found via the organizational record.
  ``pct=`` is ignored (every message is evaluated as if ``pct=100``): we only use the policy
  to decide whether to *suppress an acknowledgement*, never to reject mail.
* **ARC** (RFC 8617): ``dkim.arc_verify``'s chain validation result is recorded only.
* **Trusted front MTA** (RFC 8601 §5, §7): with ``trusted_authserv_ids`` configured, the
  topmost run of ``Authentication-Results`` headers carrying a trusted authserv-id is read
  instead of re-verifying.  Headers with any other authserv-id are ignored; the front MTA must
  strip look-alike headers arriving from outside (RFC 8601 §5 requires it), as we cannot tell
  a forged copy of its authserv-id from the real one.

Organizational domains come from the Public Suffix List (RFC 7489 §3.2) as shipped inside the
``publicsuffixlist`` package: read from its bundled file, never fetched, so the daemon needs no
network for it.  Both the ICANN and the private section count, so two tenants of a shared
hosting suffix (``a.github.io`` and ``b.github.io``) are *not* aligned under relaxed mode.  A
name that is itself a public suffix (``co.uk``) is its own organizational domain, so it only
aligns with itself.

Nothing here raises on malformed input: parse failures become ``permerror``/``none`` results,
DNS timeouts become ``temperror`` (RFC 8601 §2.7), and any unexpected error yields a
``source="skipped"`` result.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import email.utils
import functools
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dmarc
import dkim
import dkim.util
import spf
from publicsuffixlist import PublicSuffixList

from gateway.security.dns import DnsTempError, Resolver, normalize_name

__all__ = [
    "AuthResult",
    "DkimCheck",
    "authenticate",
    "organizational_domain",
]

_log = logging.getLogger(__name__)
#: dkimpy logs every failed signature at ERROR; give it its own logger so ops can quieten it.
_DKIM_LOG = logging.getLogger(__name__ + ".dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())  # no stderr noise when logging is unconfigured

_DKIM_RESULTS = frozenset({"pass", "fail", "temperror", "permerror"})
_SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
_DMARC_RESULTS = frozenset({"pass", "fail", "none", "temperror"})
_DMARC_POLICIES = frozenset({"none", "quarantine", "reject"})
_ARC_RESULTS = frozenset({"pass", "fail", "none"})

#: Minimum RSA key size accepted (RFC 8301 §3.2: verifiers MUST NOT consider keys < 1024 bits).
_MIN_RSA_BITS = 1024
#: Seconds dkimpy passes to the DNS function; our Resolver applies its own timeout.
_DKIM_DNS_TIMEOUT = 5

# --------------------------------------------------------------------------------------------
# Result types


@dataclass(frozen=True)
class DkimCheck:
    """The outcome of verifying one DKIM-Signature header (RFC 6376 §6, RFC 8601 §2.7.1).

    ``domain``/``selector``/``algorithm`` are the signature's ``d=``/``s=``/``a=`` tags
    (lower-cased, empty when absent or unparseable).
    """

    domain: str
    selector: str
    algorithm: str
    result: str  # pass | fail | temperror | permerror


@dataclass(frozen=True)
class AuthResult:
    """What we know about who really sent a message; stored with it (see :meth:`to_json`)."""

    from_domain: str
    dkim: tuple[DkimCheck, ...]
    spf: str  # pass | fail | softfail | neutral | none | temperror | permerror
    spf_domain: str  # MAIL FROM domain, or HELO domain for the null sender
    dmarc: str  # pass | fail | none | temperror
    dmarc_policy: str | None  # none | quarantine | reject (p=, or sp= for subdomains)
    arc: str | None  # pass | fail | none, None when not evaluated
    source: str  # verified | trusted-header | skipped

    @classmethod
    def skipped(cls, from_domain: str = "") -> AuthResult:
        """A result for mail we did not (or could not) authenticate."""
        return cls(
            from_domain=from_domain,
            dkim=(),
            spf="none",
            spf_domain="",
            dmarc="none",
            dmarc_policy=None,
            arc=None,
            source="skipped",
        )

    @property
    def authenticated(self) -> bool:
        """True when the From domain is proven: an aligned DKIM pass or aligned SPF pass.

        That is DMARC ``pass`` (RFC 7489 §4.2).  When the domain publishes no DMARC record
        (``dmarc == "none"``) the same test is applied with RFC 7489's default relaxed
        alignment, so a domain without DMARC can still be authenticated by its signature.
        """
        if self.dmarc == "pass":
            return True
        if self.dmarc != "none" or not self.from_domain:
            return False
        if any(
            c.result == "pass" and _aligned(c.domain, self.from_domain, strict=False)
            for c in self.dkim
        ):
            return True
        return self.spf == "pass" and _aligned(self.spf_domain, self.from_domain, strict=False)

    @property
    def has_evidence(self) -> bool:
        """Whether there was anything to check: a DKIM signature, an SPF policy that gave a
        verdict, or a DMARC result. A domain that publishes nothing yields no evidence either
        way, which is not the same as failing."""
        return (
            bool(self.dkim)
            or self.spf in ("pass", "fail", "softfail", "neutral")
            or (self.dmarc in ("pass", "fail"))
        )

    @property
    def inconclusive(self) -> bool:
        """True when some check could not complete (DNS timeout, SERVFAIL, spent budget):
        RFC 8601 §2.7 ``temperror`` anywhere.  Such a result is evidence of nothing, neither
        authenticity nor forgery (docs/decisions.md D10); :mod:`gateway.security.verdict` decides
        what waits for a re-check."""
        return (
            any(c.result == "temperror" for c in self.dkim)
            or self.spf == "temperror"
            or self.dmarc == "temperror"
        )

    @property
    def likely_forged(self) -> bool:
        """True when an automatic reply would probably be backscatter (docs/design.md §3 rule 8).

        DMARC ``fail`` under ``p=reject``/``quarantine`` (RFC 7489 §6.3), or an SPF hard
        ``fail`` (RFC 7208 §2.6.4) — unless the From domain is nevertheless authenticated
        (e.g. a forwarded message whose aligned DKIM signature survived while SPF broke).
        """
        if self.authenticated:
            return False
        if self.dmarc == "fail" and self.dmarc_policy in ("reject", "quarantine"):
            return True
        return self.spf == "fail"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_json` reverses it."""
        return {
            "from_domain": self.from_domain,
            "dkim": [
                {
                    "domain": c.domain,
                    "selector": c.selector,
                    "algorithm": c.algorithm,
                    "result": c.result,
                }
                for c in self.dkim
            ],
            "spf": self.spf,
            "spf_domain": self.spf_domain,
            "dmarc": self.dmarc,
            "dmarc_policy": self.dmarc_policy,
            "arc": self.arc,
            "source": self.source,
            "authenticated": self.authenticated,
            "likely_forged": self.likely_forged,
            "inconclusive": self.inconclusive,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuthResult:
        """Rebuild a result stored with :meth:`to_json` (derived keys are recomputed)."""
        return cls(
            from_domain=str(data.get("from_domain", "")),
            dkim=tuple(
                DkimCheck(
                    domain=str(c.get("domain", "")),
                    selector=str(c.get("selector", "")),
                    algorithm=str(c.get("algorithm", "")),
                    result=str(c.get("result", "permerror")),
                )
                for c in data.get("dkim", ())
            ),
            spf=str(data.get("spf", "none")),
            spf_domain=str(data.get("spf_domain", "")),
            dmarc=str(data.get("dmarc", "none")),
            dmarc_policy=data.get("dmarc_policy"),
            arc=data.get("arc"),
            source=str(data.get("source", "skipped")),
        )

    def header_value(self, authserv_id: str) -> str:
        """An RFC 8601 ``Authentication-Results`` field value (without the field name)."""
        results: list[Any] = []
        for c in self.dkim:
            results.append(
                authres.DKIMAuthenticationResult(
                    result=c.result,
                    header_d=c.domain or None,
                    header_s=c.selector or None,
                    header_a=c.algorithm or None,
                )
            )
        if not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        results.append(
            authres.SPFAuthenticationResult(result=self.spf, smtp_mailfrom=self.spf_domain or None)
        )
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc,
                header_from=self.from_domain or None,
                policy=self.dmarc_policy,
            )
        )
        if self.arc is not None:
            results.append(authres.arc.ARCAuthenticationResult(result=self.arc))
        header = _AR_FEATURES.header(authserv_id=authserv_id, results=results)
        return str(header.header_value())


# --------------------------------------------------------------------------------------------
# Public entry point


def authenticate(
    raw: bytes,
    *,
    envelope_sender: str,
    client_ip: str | None,
    helo: str | None,
    resolver: Resolver,
    trusted_authserv_ids: Sequence[str] = (),
) -> AuthResult:
    """Authenticate an inbound message; never raises (see module docstring).

    ``envelope_sender`` is the MAIL FROM address (``""`` or ``"<>"`` for the null sender),
    ``client_ip``/``helo`` the SMTP client's address and HELO/EHLO name (``None`` when unknown:
    SPF is then ``none``).
    """
    try:
        return _authenticate(
            raw,
            envelope_sender=envelope_sender,
            client_ip=client_ip,
            helo=helo,
            resolver=resolver,
            trusted_authserv_ids=trusted_authserv_ids,
        )
    except Exception:  # pragma: no cover - safety net, every step below already guards itself
        _log.exception("sender authentication failed unexpectedly; marking as skipped")
        return AuthResult.skipped()


def _authenticate(
    raw: bytes,
    *,
    envelope_sender: str,
    client_ip: str | None,
    helo: str | None,
    resolver: Resolver,
    trusted_authserv_ids: Sequence[str],
) -> AuthResult:
    headers = _header_fields(raw)
    if not headers:
        return AuthResult.skipped()
    from_domain = _from_domain(headers)

    if trusted_authserv_ids:
        trusted = _trusted_ar_results(headers, trusted_authserv_ids)
        if trusted:
            return _from_trusted(
                trusted,
                from_domain=from_domain,
                envelope_sender=envelope_sender,
                helo=helo,
                resolver=resolver,
            )

    # The independent checks run concurrently (docs/decisions.md D10: DNS trouble must not stall the
    # pipeline): with a slow or dead resolver the message waits for the slowest question,
    # not for the sum of all of them.  DMARC discovery (RFC 7489 §6.6.3) needs no other
    # result; only its evaluation (§6.6.2) waits for DKIM and SPF.
    pool = _executor()
    dkim_f = pool.submit(_verify_dkim, raw, resolver)
    spf_f = pool.submit(_check_spf, envelope_sender, client_ip, helo, resolver)
    arc_f = pool.submit(_verify_arc, raw, resolver)
    discovered = _discover_or_temp(from_domain, resolver)
    checks = dkim_f.result()
    spf_result, spf_domain = spf_f.result()
    arc = arc_f.result()
    dmarc, policy = _evaluate_dmarc(
        from_domain, checks, spf_result, spf_domain, resolver, discovered=discovered
    )
    return AuthResult(
        from_domain=from_domain,
        dkim=checks,
        spf=spf_result,
        spf_domain=spf_domain,
        dmarc=dmarc,
        dmarc_policy=policy,
        arc=arc,
        source="verified",
    )


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """One small pool per process for the concurrent checks (created on first use, so a
    spawned pipeline process builds its own)."""
    global _POOL  # noqa: PLW0603 (one lazily created pool per process, under _POOL_LOCK)
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sender-auth")
        return _POOL


# --------------------------------------------------------------------------------------------
# Domains


@functools.cache
def _suffix_list() -> PublicSuffixList:
    """The Public Suffix List bundled with ``publicsuffixlist`` (parsed once per process)."""
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 §3.2): the public suffix plus one label, by the
    Public Suffix List; a public suffix itself (or an empty name) is returned as it is."""
    name = ".".join(label for label in normalize_name(domain).split(".") if label)
    if not name:
        return ""
    return _suffix_list().privatesuffix(name) or name


def _aligned(identifier: str, from_domain: str, *, strict: bool) -> bool:
    """RFC 7489 §3.1 identifier alignment: exact match (strict) or same org domain (relaxed)."""
    a, b = normalize_name(identifier), normalize_name(from_domain)
    if not a or not b:
        return False
    if strict:
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def _domain_of(address: str) -> str:
    """Domain part of an address (``"<a@B.example>"`` → ``"b.example"``), ``""`` if none."""
    address = address.strip().strip("<>").strip()
    if "@" not in address:
        return ""
    return normalize_name(address.rpartition("@")[2])


# --------------------------------------------------------------------------------------------
# Header parsing

_FOLD = re.compile(r"\r?\n[ \t]")


def _header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields in order, values unfolded; ``[]`` when there is no header section."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        return [(str(name), _FOLD.sub(" ", str(value)).strip()) for name, value in msg.items()]
    except Exception:
        return []


def _from_domain(headers: list[tuple[str, str]]) -> str:
    """The RFC5322.From domain (RFC 7489 §3.1, §6.6.1).

    ``""`` when there is not exactly one From field or its addresses span several domains:
    DMARC cannot be applied (and the message is then never ``authenticated``).
    """
    values = [v for name, v in headers if name.lower() == "from"]
    if len(values) != 1:
        return ""
    domains = {_domain_of(addr) for _, addr in email.utils.getaddresses(values)}
    domains.discard("")
    return domains.pop() if len(domains) == 1 else ""


# --------------------------------------------------------------------------------------------
# DKIM (RFC 6376) and ARC (RFC 8617)


@dataclass
class _TxtLookupState:
    """What happened during the key lookups of one dkimpy verification."""

    temp_error: bool = False
    missing: bool = False
    last: tuple[str, bytes] | None = None


def _make_dkim_dnsfunc(resolver: Resolver, state: _TxtLookupState) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc(name, timeout=5)`` answering key TXT lookups from ``resolver``."""

    def dnsfunc(name: bytes | str, timeout: float = _DKIM_DNS_TIMEOUT) -> bytes | None:
        qname = normalize_name(name)
        try:
            records = resolver.query(qname, "TXT")
        except DnsTempError as exc:
            # RFC 6376 §6.1.2: a key query that fails to respond is TEMPFAIL.
            state.temp_error = True
            raise dkim.DnsTimeoutError(str(exc)) from exc
        if not records:
            # RFC 6376 §6.1.2: no key record is PERMFAIL.
            state.missing = True
            return None
        # RFC 6376 §3.6.2.2: several TXT records at a key name are undefined; prefer a key.
        chosen = next((r for r in records if "p=" in r), records[0])
        txt = chosen.encode("utf-8", "surrogateescape")
        state.last = (qname, txt)
        return txt

    return dnsfunc


def _parse_tags(value: bytes) -> dict[str, str]:
    """A DKIM tag-list (RFC 6376 §3.2) as lower-case-keyed strings; ``{}`` when unparseable."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:
        return {}
    out: dict[str, str] = {}
    for key, val in tags.items():
        k = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        v = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
        out[k.strip()] = v.strip()
    return out


def _verify_dkim(raw: bytes, resolver: Resolver) -> tuple[DkimCheck, ...]:
    """Verify every DKIM-Signature header independently (RFC 6376 §6.1, §4: any may pass)."""
    try:
        verifier = dkim.DKIM(raw, logger=_DKIM_LOG, minkey=_MIN_RSA_BITS)
    except Exception:
        return ()
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    checks: list[DkimCheck] = []
    for idx, value in enumerate(signatures):
        tags = _parse_tags(value)
        state = _TxtLookupState()
        result = _verify_one(verifier, idx, _make_dkim_dnsfunc(resolver, state), state)
        checks.append(
            DkimCheck(
                domain=normalize_name(tags.get("d", "")),
                selector=tags.get("s", "").lower(),
                algorithm=tags.get("a", "").lower(),
                result=result,
            )
        )
    return tuple(checks)


def _verify_one(
    verifier: dkim.DKIM,
    idx: int,
    dnsfunc: Callable[..., bytes | None],
    state: _TxtLookupState,
) -> str:
    """Map one dkimpy verification onto RFC 8601 results."""
    try:
        ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        # A body hash mismatch is a signature that failed verification (RFC 6376 §6.1.3);
        # missing tags, bad versions and expiry are PERMFAIL of the header (§6.1.1).
        return "fail" if "body hash mismatch" in str(exc) else "permerror"
    except Exception:
        # MessageFormatError, KeyFormatError (e.g. RSA key under 1024 bits, RFC 8301),
        # NaClNotFoundError (ed25519 without PyNaCl), or anything else malformed.
        return "temperror" if state.temp_error else "permerror"
    if ok:
        return "pass"
    if state.temp_error:
        return "temperror"
    if state.missing:
        return "permerror"
    if state.last is not None:
        # dkimpy returns False for an unusable key record; that is PERMFAIL, not a bad
        # signature (RFC 6376 §6.1.2 steps 5-10).
        name, txt = state.last
        try:
            dkim.evaluate_pk(name, txt)
        except (dkim.DKIMException, binascii.Error, ValueError):
            return "permerror"
    return "fail"


def _verify_arc(raw: bytes, resolver: Resolver) -> str | None:
    """RFC 8617 §5.2 chain validation; recorded only.  ``None`` when DNS prevented it."""
    state = _TxtLookupState()
    try:
        cv, _results, _comment = dkim.arc_verify(
            raw, logger=_DKIM_LOG, dnsfunc=_make_dkim_dnsfunc(resolver, state)
        )
    except Exception:
        return None if state.temp_error else "fail"
    value = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    value = value.lower()
    if state.temp_error and value != "pass":
        return None
    return value if value in _ARC_RESULTS else "fail"


# --------------------------------------------------------------------------------------------
# SPF (RFC 7208)


class _ResolverSpfQuery(spf.query):  # type: ignore[misc]  # pyspf ships no type hints
    """A pyspf query whose DNS goes through a :class:`Resolver`.

    pyspf 2.0.14 funnels every lookup (TXT, A, AAAA, MX, PTR, for mechanisms, macros and
    ``exp=``) through ``query.dns``, which calls the module-global ``spf.DNSLookup``.
    Overriding the method on a subclass keeps the resolver per query object, hence
    thread-safe, instead of patching the module.  The override keeps pyspf's contract: a list
    of answers shaped like its own ``DNSLookup_dnspython`` output (TXT as lists of bytes, MX as
    ``(preference, host)``), a per-query cache, and the RFC 7208 §4.6.4 void-lookup limit.
    CNAMEs are followed by the resolver itself.
    """

    def __init__(self, *, resolver: Resolver, i: str, s: str, h: str) -> None:
        super().__init__(i=i, s=s, h=h)
        self._gateway_resolver = resolver

    def dns(
        self,
        name: Any,
        qtype: str,
        cnames: Any = None,
        ignore_void: bool = False,
    ) -> list[Any]:
        if not name:
            raise spf.PermError("invalid DNS name in SPF evaluation")
        qname = normalize_name(str(name))
        labels = qname.split(".")
        if not qname or not all(0 < len(label) < 64 for label in labels):
            return []  # invalid DNS name (too long or empty label), as pyspf does
        key = (qname, qtype)
        cached = self.cache.get(key)
        if cached is not None:
            return list(cached)
        result: list[Any] = []
        if qtype in ("TXT", "A", "AAAA", "MX", "PTR"):
            try:
                answers = self._gateway_resolver.query(qname, qtype)
            except DnsTempError as exc:
                # RFC 7208 §4.4: a DNS error other than NXDOMAIN is a temperror.
                raise spf.TempError(f"DNS {exc}") from exc
            result = _spf_shape(qtype, answers)
        # "SPF" (type 99) is obsolete (RFC 7208 §3.1) and only asked in pyspf's harsh mode.
        self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


def _spf_shape(qtype: str, answers: list[str]) -> list[Any]:
    """Convert Resolver answers into what pyspf's ``DNSLookup`` would have returned."""
    out: list[Any] = []
    for answer in answers:
        if qtype == "TXT":
            out.append([answer.encode("utf-8", "surrogateescape")])
        elif qtype == "MX":
            pref, _, host = answer.strip().partition(" ")
            try:
                out.append((int(pref), normalize_name(host)))
            except ValueError:
                continue
        else:
            out.append(answer.strip())
    return out


def _check_spf(
    envelope_sender: str, client_ip: str | None, helo: str | None, resolver: Resolver
) -> tuple[str, str]:
    """Return ``(result, checked domain)`` for the MAIL FROM, or HELO for the null sender."""
    sender = (envelope_sender or "").strip().strip("<>").strip()
    helo_name = normalize_name(helo or "")
    if sender:
        domain = _domain_of(sender)
        local = sender.rpartition("@")[0] or "postmaster"
        identity = f"{local}@{domain}" if domain else ""
    else:
        # RFC 7208 §2.4: for the null sender the identity is postmaster@<HELO>.  §2.3: the
        # HELO check only makes sense for a fully qualified name, not an address literal.
        domain = helo_name if "." in helo_name and not helo_name.startswith("[") else ""
        identity = ""
    if not domain or not client_ip:
        return "none", domain  # RFC 7208 §4.3: no checkable identity
    try:
        ip = str(ipaddress.ip_address(client_ip.strip().strip("[]").removeprefix("IPv6:")))
    except ValueError:
        return "none", domain
    try:
        query = _ResolverSpfQuery(resolver=resolver, i=ip, s=identity, h=helo_name or domain)
        result, _code, _explanation = query.check()
    except Exception:
        _log.debug("SPF evaluation raised for %s", domain, exc_info=True)
        return "permerror", domain
    result = str(result).lower()
    # pyspf's RFC 4408 compatibility names, just in case.
    result = {"error": "temperror", "unknown": "permerror", "ambiguous": "permerror"}.get(
        result, result
    )
    return (result if result in _SPF_RESULTS else "permerror"), domain


# --------------------------------------------------------------------------------------------
# DMARC (RFC 7489)


@dataclass(frozen=True)
class _DmarcRecord:
    policy: str  # the policy that applies to the From domain (p= or sp=)
    adkim_strict: bool
    aspf_strict: bool


def _parse_dmarc(txt: str) -> dict[str, str] | None:
    """Parse a DMARC record's tag list (RFC 7489 §6.3-6.4); ``None`` if not a DMARC record."""
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            continue
        tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    return tags


def _dmarc_records(name: str, resolver: Resolver) -> list[dict[str, str]]:
    """The DMARC records at ``_dmarc.<name>`` (RFC 7489 §6.6.3 step 2)."""
    answers = resolver.query(f"_dmarc.{name}", "TXT")
    records = [r for r in (_parse_dmarc(a) for a in answers if a.lstrip().startswith("v=")) if r]
    return records


def _discover_dmarc(from_domain: str, resolver: Resolver) -> _DmarcRecord | None:
    """Policy discovery (RFC 7489 §6.6.3).  Raises DnsTempError."""
    records = _dmarc_records(from_domain, resolver)
    from_org = False
    if not records:
        org = organizational_domain(from_domain)
        if org and org != from_domain:
            records = _dmarc_records(org, resolver)
            from_org = True
    if len(records) != 1:
        return None  # none, or several (§6.6.3: several records means no DMARC processing)
    tags = records[0]
    policy = tags.get("p", "").lower()
    if policy not in _DMARC_POLICIES:
        # §6.6.3 step 6: an invalid p= with a rua= behaves as p=none; otherwise no DMARC.
        if not tags.get("rua"):
            return None
        policy = "none"
    if from_org:
        # §6.3 sp=: the policy for subdomains of the organizational domain.
        sub = tags.get("sp", "").lower()
        if sub in _DMARC_POLICIES:
            policy = sub
    return _DmarcRecord(
        policy=policy,
        adkim_strict=tags.get("adkim", "r").lower() == "s",
        aspf_strict=tags.get("aspf", "r").lower() == "s",
    )


def _discover_or_temp(from_domain: str, resolver: Resolver) -> _DmarcRecord | DnsTempError | None:
    """:func:`_discover_dmarc`, with a DNS failure returned instead of raised."""
    if not from_domain:
        return None
    try:
        return _discover_dmarc(from_domain, resolver)
    except DnsTempError as exc:
        return exc


def _evaluate_dmarc(
    from_domain: str,
    checks: Sequence[DkimCheck],
    spf_result: str,
    spf_domain: str,
    resolver: Resolver,
    *,
    discovered: _DmarcRecord | DnsTempError | str | None = "ask",
) -> tuple[str, str | None]:
    """RFC 7489 §4.2 / §6.6.2: pass iff an aligned identifier passes; ``(result, policy)``.

    ``discovered`` is the outcome of policy discovery when it was done already (``"ask"``:
    discover now).
    """
    if not from_domain:
        return "none", None
    record = _discover_or_temp(from_domain, resolver) if isinstance(discovered, str) else discovered
    if isinstance(record, DnsTempError):
        return "temperror", None
    if record is None:
        return "none", None
    dkim_ok = any(
        c.result == "pass" and _aligned(c.domain, from_domain, strict=record.adkim_strict)
        for c in checks
    )
    spf_ok = spf_result == "pass" and _aligned(spf_domain, from_domain, strict=record.aspf_strict)
    if dkim_ok or spf_ok:
        return "pass", record.policy
    # An aligned identifier that could not be checked because of DNS trouble might still have
    # passed; say temperror rather than fail so we never call a real sender forged.
    dkim_temp = any(
        c.result == "temperror" and _aligned(c.domain, from_domain, strict=record.adkim_strict)
        for c in checks
    )
    spf_temp = spf_result == "temperror" and _aligned(
        spf_domain, from_domain, strict=record.aspf_strict
    )
    if dkim_temp or spf_temp:
        return "temperror", record.policy
    return "fail", record.policy


def _lookup_policy(from_domain: str, resolver: Resolver) -> str | None:
    """Just the applicable DMARC policy, ``None`` when unknown."""
    if not from_domain:
        return None
    try:
        record = _discover_dmarc(from_domain, resolver)
    except DnsTempError:
        return None
    return record.policy if record else None


# --------------------------------------------------------------------------------------------
# Trusted Authentication-Results (RFC 8601)

_AR_FEATURES = authres.FeatureContext(authres.dmarc, authres.arc)


def _parse_ar(value: str) -> Any | None:
    try:
        return _AR_FEATURES.parse_value(value)
    except Exception:
        return None


def _trusted_ar_results(headers: list[tuple[str, str]], trusted_ids: Sequence[str]) -> list[Any]:
    """Result clauses from the topmost run of trusted Authentication-Results fields.

    The run starts at the first (topmost) field whose authserv-id is trusted and ends at the
    first field that is not an Authentication-Results field (RFC 8601 §5: the trusted MTA
    prepends its own above everything the sender supplied).  Fields with other authserv-ids
    are ignored wherever they are.
    """
    trusted = {t.strip().lower() for t in trusted_ids if t.strip()}
    results: list[Any] = []
    started = False
    for name, value in headers:
        if name.lower() != "authentication-results":
            if started:
                break
            continue
        parsed = _parse_ar(value)
        if parsed is None or str(parsed.authserv_id or "").lower() not in trusted:
            continue
        started = True
        results.extend(r for r in parsed.results if isinstance(r, authres.AuthenticationResult))
    return results


def _prop(result: Any, ptype: str, pname: str) -> str:
    for p in getattr(result, "properties", ()):
        if p.type == ptype and p.name == pname and p.value:
            return str(p.value)
    return ""


def _trusted_dkim(results: list[Any]) -> list[DkimCheck]:
    """The dkim= clauses (but dkim=none) of a trusted Authentication-Results, in order."""
    checks: list[DkimCheck] = []
    for r in results:
        method, value = str(r.method).lower(), str(r.result).lower()
        if method != "dkim" or value == "none":
            continue
        domain = _prop(r, "header", "d") or _domain_of(_prop(r, "header", "i"))
        # RFC 8601 §2.7.1: "neutral" = could not be processed, "policy" = not accepted.
        mapped = {"neutral": "permerror", "policy": "fail"}.get(value, value)
        checks.append(
            DkimCheck(
                domain=normalize_name(domain),
                selector=_prop(r, "header", "s").lower(),
                algorithm=_prop(r, "header", "a").lower(),
                result=mapped if mapped in _DKIM_RESULTS else "permerror",
            )
        )
    return checks


def _trusted_spf(r: Any, value: str) -> tuple[str, str]:
    """(result, domain checked) of one spf= clause of a trusted Authentication-Results."""
    mapped = "fail" if value == "hardfail" else value  # RFC 6577
    mailfrom = _prop(r, "smtp", "mailfrom")
    domain = (
        (_domain_of(mailfrom) or normalize_name(mailfrom))
        if mailfrom
        else normalize_name(_prop(r, "smtp", "helo"))
    )
    return (mapped if mapped in _SPF_RESULTS else "permerror"), domain


def _from_trusted(
    results: list[Any],
    *,
    from_domain: str,
    envelope_sender: str,
    helo: str | None,
    resolver: Resolver,
) -> AuthResult:
    """Build an AuthResult from a trusted MTA's RFC 8601 result clauses."""
    checks = _trusted_dkim(results)
    spf_result: str | None = None
    spf_domain = ""
    dmarc: str | None = None
    policy: str | None = None
    arc: str | None = None
    for r in results:
        method, value = str(r.method).lower(), str(r.result).lower()
        if method == "spf" and spf_result is None:
            spf_result, spf_domain = _trusted_spf(r, value)
        elif method == "dmarc" and dmarc is None:
            dmarc = value if value in _DMARC_RESULTS else "none"
            stated = _prop(r, "policy", "dmarc").lower()
            policy = stated if stated in _DMARC_POLICIES else None
        elif method == "arc" and arc is None:
            arc = value if value in _ARC_RESULTS else "fail"

    if spf_result is None:
        spf_result = "none"
    if not spf_domain:
        sender = (envelope_sender or "").strip().strip("<>")
        spf_domain = _domain_of(sender) if sender else normalize_name(helo or "")

    if dmarc is None:
        # The front MTA did no DMARC: evaluate it from its DKIM/SPF verdicts (RFC 7489 §6.6.2).
        dmarc, policy = _evaluate_dmarc(from_domain, checks, spf_result, spf_domain, resolver)
    elif policy is None and dmarc in ("pass", "fail"):
        # Most MTAs put p= only in a comment, which authres drops; ask DNS for it.
        policy = _lookup_policy(from_domain, resolver)

    return AuthResult(
        from_domain=from_domain,
        dkim=tuple(checks),
        spf=spf_result,
        spf_domain=spf_domain,
        dmarc=dmarc,
        dmarc_policy=policy,
        arc=arc,
        source="trusted-header",
    )
