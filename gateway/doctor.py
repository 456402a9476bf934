"""`support-gateway doctor`: check an installation end to end and say what to fix.

Each check gives ``ok``, ``warn`` or ``fail``, a ``detail`` (what was found) and, unless ok,
a ``fix``: the exact DNS record or setting to add. The JSON shape is docs/interface.md's
``{"checks": [{"name", "status", "detail", "fix"}]}``; the command exits 1 when any check
fails.

What is checked, in order (later checks are skipped when the configuration cannot load):

* ``config``: the settings load (every bad key named, as at start-up);
* ``database``: reachable, and at the newest migration (``db upgrade`` otherwise). The doctor
  never creates or migrates a database itself;
* ``spool``: the folder exists, is writable, and has more than ``smtp.min_free_disk`` free;
* ``relay``: ``outbound.relay`` answers EHLO;
* ``mx:<domain>``: for each support domain, an MX record names ``smtp.hostname`` and that
  name has an address (RFC 5321 §5.1: senders find us through MX, then A/AAAA);
* ``spf:<domain>``: the SPF record (RFC 7208) of the outbound domain (``outbound.from_address``)
  passes for the address mail leaves from: the relay's address, or this host's
  (``smtp.hostname``'s A/AAAA records) when the relay is on loopback;
* ``dkim:<selector>._domainkey.<domain>``: the published TXT record (RFC 6376 §3.6.1) carries
  the public half of each configured signing key;
* ``dmarc:<domain>``: a DMARC record (RFC 7489 §6.1) exists for each support and outbound
  domain, at ``_dmarc.<domain>`` or at the organizational domain;
* ``tls``: STARTTLS is configured, the certificate is valid now, does not expire within
  14 days and names ``smtp.hostname``;
* ``rules``: the rules load; coverage warnings are included when the rules loader offers
  them (a ``coverage_warnings`` function, or ``check_rules`` lines marked ``warning``).

Every DNS question goes through :class:`gateway.security.dns.Resolver`, so tests run the
doctor against a :class:`~gateway.security.dns.StaticResolver`; a DNS failure makes a check
``warn`` ("could not check"), never ``ok``. Checks are plain functions of (settings,
resolver, now); only ``database``, ``spool``, ``relay`` and ``tls`` touch the machine.
"""

from __future__ import annotations

import ipaddress
import os
import smtplib
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from gateway.security.dns import DnsTempError, Resolver
from gateway.settings import Settings

Status = Literal["ok", "warn", "fail"]

#: A certificate expiring sooner than this is a warning (Let's Encrypt renews at 30 days).
CERT_WARN_DAYS = 14


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


# Machine checks -------------------------------------------------------------------------


def check_database(settings: Settings) -> Check:
    url = settings.storage.database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:" and not Path(path).exists():
            return Check(
                "database",
                "fail",
                f"no database at {path}",
                "run `support-gateway db upgrade` (or start `serve` once) as the daemon's user",
            )
    try:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from gateway.store.db import alembic_config, make_engine

        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                current = set(MigrationContext.configure(conn).get_current_heads())
            heads = set(ScriptDirectory.from_config(alembic_config(engine)).get_heads())
        finally:
            engine.dispose()
    except Exception as exc:
        return Check(
            "database",
            "fail",
            f"cannot reach {_redact(url)}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}",
            "check storage.database_url, that the server runs and the user may connect",
        )
    if current != heads:
        return Check(
            "database",
            "fail",
            f"schema at {sorted(current) or 'nothing'}, code expects {sorted(heads)}",
            "run `support-gateway db upgrade`",
        )
    return _ok("database", f"{_redact(url)} reachable, schema at {', '.join(sorted(heads))}")


def check_database_upkeep(settings: Settings) -> list[Check]:
    """PostgreSQL: is autovacuum on? Without it the planner's statistics describe the tables
    as they were at the last ANALYZE (often: empty, or every ticket unplanned) and the rows
    the spool and the outbox delete are never reclaimed, so lookups become whole-table reads
    that grow with every message (docs/performance.md §9: measured at 100 messages a
    second). SQLite needs nothing of the kind."""
    url = settings.storage.database_url
    if not url.startswith("postgresql"):
        return []
    from sqlalchemy import text

    from gateway.store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
            track_counts = conn.execute(text("SHOW track_counts")).scalar()
    except Exception as exc:
        # check_database reports the connection itself.
        return [Check("database upkeep", "warn", f"could not ask the server: {exc!r}")]
    finally:
        engine.dispose()
    return [upkeep_check(str(autovacuum), str(track_counts))]


def upkeep_check(autovacuum: str, track_counts: str) -> Check:
    """The verdict on the server's `autovacuum` and `track_counts` settings (as `SHOW`
    prints them): a warning unless both are on."""
    if autovacuum != "on" or track_counts != "on":
        return Check(
            "database upkeep",
            "warn",
            f"PostgreSQL runs with autovacuum = {autovacuum}, track_counts = {track_counts}:"
            " statistics go stale and deleted spool and outbox rows are never reclaimed,"
            " so lookups turn into whole-table reads as mail flows",
            "set autovacuum = on and track_counts = on (PostgreSQL's defaults), or run"
            " `VACUUM ANALYZE` on the gateway's database every few minutes",
        )
    return _ok("database upkeep", "PostgreSQL autovacuum is on")


def _redact(url: str) -> str:
    # postgresql://user:password@host/db -> hide the password in output meant for tickets.
    head, sep, tail = url.partition("@")
    if sep and ":" in head.split("//", 1)[-1]:
        scheme_user = head.rsplit(":", 1)[0]
        return f"{scheme_user}:***@{tail}"
    return url


def check_spool(settings: Settings) -> Check:
    d = settings.spool_path
    if not d.is_dir():
        return Check(
            "spool",
            "fail",
            f"{d} does not exist",
            f"create it, owned by the daemon's user: install -d -m 0750 {d}"
            " (systemd-tmpfiles --create does it for the packaged layout)",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(
            "spool",
            "fail",
            f"{d} is not writable: {exc.strerror}",
            f"chown the folder to the daemon's user: chown support-gateway: {d}",
        )
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    need = settings.smtp.min_free_disk
    if free < need:
        return Check(
            "spool",
            "fail",
            f"{_mib(free)} free in {d}, below smtp.min_free_disk = {_mib(need)}: "
            "new mail is deferred (452)",
            "free disk space or move storage.spool_dir to a larger file system",
        )
    if free < 2 * need:
        return Check(
            "spool",
            "warn",
            f"{_mib(free)} free in {d}, less than twice smtp.min_free_disk ({_mib(need)})",
            "free disk space before mail starts being deferred",
        )
    return _ok("spool", f"{d} writable, {_mib(free)} free")


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


def check_relay(settings: Settings, timeout: float = 5.0) -> Check:
    relay = settings.relay
    if relay is None:
        return Check(
            "relay",
            "fail",
            "outbound.relay is empty: acknowledgements and notifications cannot leave",
            'set outbound.relay = "127.0.0.1:25" (your MTA) or your smarthost',
        )
    host, port = relay
    try:
        with smtplib.SMTP(host, port, local_hostname=settings.smtp.hostname, timeout=timeout) as s:
            code, text = s.ehlo()
            s.quit()
    except (OSError, smtplib.SMTPException) as exc:
        return Check(
            "relay",
            "fail",
            f"{host}:{port} does not answer: {exc}",
            "start the relay or correct outbound.relay; the outbox keeps mail until it answers",
        )
    if code != 250:
        return Check("relay", "fail", f"{host}:{port} answered EHLO with {code}", "")
    banner = text.decode(errors="replace").splitlines()[0] if text else ""
    return _ok("relay", f"{host}:{port} answers EHLO: 250 {banner}")


def check_tls(settings: Settings, now: datetime) -> Check:
    s = settings.smtp
    if not (s.tls_cert and s.tls_key):
        return Check(
            "tls",
            "warn",
            "STARTTLS is off: senders deliver to us in clear text",
            'set smtp.tls_cert = "/etc/support-gateway/tls/fullchain.pem" and smtp.tls_key'
            " (e.g. from certbot) for the name smtp.hostname",
        )
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(s.tls_cert).read_bytes())
        ssl.create_default_context().load_cert_chain(s.tls_cert, s.tls_key)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return Check(
            "tls",
            "fail",
            f"cannot load smtp.tls_cert/smtp.tls_key: {exc}",
            "point both at a PEM certificate chain and its private key, readable by the daemon",
        )
    not_after = cert.not_valid_after_utc
    not_before = cert.not_valid_before_utc
    names = _cert_names(cert)
    detail = f"{s.tls_cert}: valid until {not_after:%Y-%m-%d}, names {', '.join(names) or '-'}"
    if now < not_before or now >= not_after:
        return Check("tls", "fail", f"certificate not valid now; {detail}", "renew it")
    if not any(_name_matches(s.hostname, n) for n in names):
        return Check(
            "tls",
            "warn",
            f"certificate does not name smtp.hostname {s.hostname!r}; {detail}",
            f"get a certificate for {s.hostname}",
        )
    if not_after - now < timedelta(days=CERT_WARN_DAYS):
        days = (not_after - now).days
        return Check("tls", "warn", f"expires in {days} days; {detail}", "renew it now")
    return _ok("tls", detail)


def _cert_names(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [str(n).lower() for n in ext.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(c.value).lower() for c in cn]


def _name_matches(host: str, pattern: str) -> bool:
    host, pattern = host.lower(), pattern.lower()
    if pattern.startswith("*."):
        return host.count(".") == pattern.count(".") and host.endswith(pattern[1:])
    return host == pattern


def check_rules(settings: Settings) -> list[Check]:
    from gateway.routing import loader

    problems = loader.check_rules(settings.rules_path)
    errors = [p for p in problems if ": warning" not in p.lower()]
    warnings = [p for p in problems if ": warning" in p.lower()]
    if errors:
        return [
            Check(
                "rules",
                "fail",
                "; ".join(errors[:5])
                + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""),
                "fix the lines named, then `support-gateway rules check`",
            )
        ]
    coverage = getattr(loader, "coverage_warnings", None)
    if callable(coverage):  # offered by the rules loader in a later version
        try:
            warnings += [str(w) for w in coverage(loader.load_rules(settings.rules_path))]
        except Exception as exc:  # a coverage bug must not hide the other checks
            warnings.append(f"coverage check failed: {exc!r}")
    if warnings:
        return [Check("rules", "warn", "; ".join(warnings), "see docs/rules.md")]
    return [_ok("rules", f"{settings.rules_path}: rules are valid")]


# DNS checks (pure given the resolver) --------------------------------------------------


def _q(resolver: Resolver, name: str, rtype: str) -> list[str]:
    return resolver.query(name, rtype)


def _addresses(resolver: Resolver, name: str) -> list[str]:
    return [*_q(resolver, name, "A"), *_q(resolver, name, "AAAA")]


def _public_domains(domains: Iterable[str]) -> list[str]:
    # "localhost" and other single-label names are for local testing: nothing to publish.
    return [d for d in dict.fromkeys(domains) if "." in d and not d.endswith(".localhost")]


def check_mx(settings: Settings, resolver: Resolver, domain: str) -> Check:
    host = settings.smtp.hostname.lower().rstrip(".")
    name = f"mx:{domain}"
    fix = f"{domain}. IN MX 10 {host}."
    if "." not in host:
        return Check(
            name,
            "fail",
            f"smtp.hostname is {host!r}, not a public name",
            f'set smtp.hostname = "mx.{domain}" and publish {domain}. IN MX 10 mx.{domain}.',
        )
    try:
        mx = [a.split()[-1] for a in _q(resolver, domain, "MX")]
        addrs = _addresses(resolver, host)
    except DnsTempError as exc:
        return Check(name, "warn", f"could not check: {exc}", "")
    if host not in mx:
        found = ", ".join(mx) if mx else "no MX record"
        return Check(name, "fail", f"{domain}: {found}; expected {host}", fix)
    if not addrs:
        return Check(
            name,
            "fail",
            f"MX points at {host} but {host} has no A/AAAA record",
            f"{host}. IN A <this host's public IPv4 address>",
        )
    return _ok(name, f"{domain} MX {host} ({', '.join(addrs)})")


def _sending_addresses(settings: Settings, resolver: Resolver) -> tuple[list[str], str]:
    """The addresses outgoing mail leaves from, and how we know (see module docstring)."""
    relay = settings.relay
    host = relay[0] if relay else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and not (ip.is_loopback or ip.is_private):
        return [str(ip)], f"the relay {host}"
    if ip is None and host and host != "localhost":
        return _addresses(resolver, host), f"the relay {host}"
    hostname = settings.smtp.hostname
    return _addresses(resolver, hostname), f"this host {hostname} (the relay is local)"


def check_spf(settings: Settings, resolver: Resolver, sender: str = "") -> Check:
    """SPF of the domain our mail leaves from (`sender`; default `outbound.from_address`)."""
    from gateway.security.sender_auth import authenticate

    sender = sender or settings.outbound.from_address
    domain = sender.rsplit("@", 1)[-1].lower()
    name = f"spf:{domain}"
    try:
        records = [t for t in _q(resolver, domain, "TXT") if t.lower().startswith("v=spf1")]
        ips, source = _sending_addresses(settings, resolver)
    except DnsTempError as exc:
        return Check(name, "warn", f"could not check: {exc}", "")
    mechs = " ".join(f"ip{ipaddress.ip_address(i).version}:{i}" for i in ips) or "a:<relay>"
    if not records:
        return Check(
            name,
            "fail",
            f"{domain} publishes no SPF record",
            f'{domain}. IN TXT "v=spf1 {mechs} -all"',
        )
    if not ips:
        return Check(
            name,
            "warn",
            f"cannot tell which address mail leaves from ({source} has no A/AAAA record)",
            "publish the sending host's address record, then run the doctor again",
        )
    # The same evaluator the gateway uses on inbound mail (pyspf over our resolver).
    raw = f"From: <{sender}>\r\nSubject: doctor\r\n\r\n.\r\n".encode()
    failing = []
    for ip in ips:
        result = authenticate(
            raw,
            envelope_sender=sender,
            client_ip=ip,
            helo=settings.smtp.hostname,
            resolver=resolver,
        ).spf
        if result == "temperror":
            return Check(name, "warn", f"could not check: SPF temperror for {ip}", "")
        if result != "pass":
            failing.append(f"{ip}: {result}")
    if failing:
        missing = " ".join(
            f"ip{ipaddress.ip_address(f.split(': ')[0]).version}:{f.split(': ')[0]}"
            for f in failing
        )
        return Check(
            name,
            "fail",
            f"{records[0]!r} does not allow {source}: {', '.join(failing)}",
            f"add {missing} to the record: {domain}. IN TXT "
            f'"{records[0].replace(" -all", "").replace(" ~all", "")} {missing} -all"',
        )
    return _ok(name, f"{records[0]!r} allows {source} ({', '.join(ips)})")


def check_dkim(
    settings: Settings,
    resolver: Resolver,
    signing: tuple[str, str, list[str]] | None = None,
    key_setting: str = "outbound.dkim.key_file",
) -> list[Check]:
    """The published DKIM record matches each signing key. `signing` is (domain, selector,
    key files); default: `[outbound.dkim]`."""
    from gateway.outbound.dkim import dns_record, load_key, public_txt_record

    d = settings.outbound.dkim
    domain, selector, files = signing or (d.domain, d.selector, [d.key_file, *d.extra_key_files])
    files = [f for f in files if f]
    name = f"dkim:{selector}._domainkey.{domain}"
    if not files:
        return [
            Check(
                name,
                "warn",
                f"{key_setting} is empty: outgoing mail from {domain} is not signed",
                "support-gateway dkim keygen --out /etc/support-gateway/dkim.key, set "
                f"{key_setting} to it and publish the record it prints",
            )
        ]
    try:
        published = _q(resolver, f"{selector}._domainkey.{domain}", "TXT")
    except DnsTempError as exc:
        return [Check(name, "warn", f"could not check: {exc}", "")]
    have = {_tag(t, "p") for t in published}
    out = []
    for f in files:
        try:
            key = load_key(Path(f), domain, selector)
        except (OSError, ValueError) as exc:
            out.append(Check(name, "fail", f"cannot read the key {f}: {exc}", "check the path"))
            continue
        want = _tag(public_txt_record(key), "p")
        if want in have:
            out.append(_ok(name, f"the record carries the public key of {f}"))
        elif published:
            out.append(
                Check(
                    name,
                    "fail",
                    f"the published record does not match {f} (wrong key or stale record)",
                    "replace it with: " + dns_record(key),
                )
            )
        else:
            out.append(Check(name, "fail", "no DKIM record published", dns_record(key)))
    return out


def _tag(record: str, tag: str) -> str:
    for part in record.split(";"):
        k, _, v = part.strip().partition("=")
        if k.strip() == tag:
            return "".join(v.split())
    return ""


def check_dmarc(resolver: Resolver, domain: str) -> Check:
    from gateway.security.sender_auth import organizational_domain

    name = f"dmarc:{domain}"
    try:
        for where in dict.fromkeys([domain, organizational_domain(domain)]):
            records = [
                t for t in _q(resolver, f"_dmarc.{where}", "TXT") if t.startswith("v=DMARC1")
            ]
            if records:
                return _ok(name, f"_dmarc.{where}: {records[0]!r}")
    except DnsTempError as exc:
        return Check(name, "warn", f"could not check: {exc}", "")
    return Check(
        name,
        "warn",
        f"{domain} publishes no DMARC record: receivers cannot tell our mail from forgeries",
        f'_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"',
    )


def check_brands(settings: Settings, resolver: Resolver) -> list[Check]:
    """Each `[brands.X]` of the rules is a support identity of its own: replies to its
    reply-address domain must reach us (MX), its From domain must allow our relay (SPF),
    publish its DKIM key and a DMARC record. Invalid rules are reported by `check_rules`."""
    from gateway.routing.loader import load_rules

    try:
        rules = load_rules(settings.rules_path)
    except Exception:
        return []
    out: list[Check] = []
    for brand in rules.brands.values():
        setting = f"[brands.{brand.id}] dkim.key_file"
        out.append(check_mx(settings, resolver, brand.reply_to_domain))
        out.append(check_spf(settings, resolver, sender=brand.from_address))
        signing = (
            brand.dkim_domain or brand.domain,
            brand.dkim_selector or settings.outbound.dkim.selector,
            [brand.dkim_key_file],
        )
        out += check_dkim(settings, resolver, signing, setting)
        out.append(check_dmarc(resolver, brand.domain))
    # One domain is checked once, whoever uses it (the main identity and a brand may share).
    return list({c.name: c for c in out}.values())


# All of it ------------------------------------------------------------------------------


def run_checks(
    config: str | None,
    *,
    resolver: Resolver | None = None,
    now: datetime,
    settings: Settings | None = None,
    relay_timeout: float = 5.0,
) -> list[Check]:
    """Every check, in order. `resolver` None = the system's (security.nameservers)."""
    from gateway.settings import ConfigError, load_settings

    if settings is None:
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            return [Check("config", "fail", str(exc), "correct the keys named")]
    checks = [_ok("config", settings.config_path or "built-in defaults (no config file)")]
    if resolver is None:
        from gateway.security.dns import SystemResolver

        sec = settings.security
        resolver = SystemResolver(timeout=sec.dns_timeout, nameservers=sec.nameservers or None)
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_database(settings),
        lambda: check_database_upkeep(settings),
        lambda: check_spool(settings),
        lambda: check_relay(settings, relay_timeout),
    ]
    steps += [
        (lambda d=d: check_mx(settings, resolver, d))  # type: ignore[misc]
        for d in _public_domains(settings.smtp.domains)
    ]
    steps += [lambda: check_spf(settings, resolver), lambda: check_dkim(settings, resolver)]
    outbound = settings.outbound.from_address.rsplit("@", 1)[-1].lower()
    steps += [
        (lambda d=d: check_dmarc(resolver, d))  # type: ignore[misc]
        for d in _public_domains([*settings.smtp.domains, outbound])
    ]
    steps += [lambda: check_brands(settings, resolver)]
    steps += [lambda: check_tls(settings, now), lambda: check_rules(settings)]
    for step in steps:
        try:
            result = step()
        except Exception as exc:  # one broken check must not hide the others
            result = Check("doctor", "fail", f"check crashed: {exc!r}", "report this as a bug")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def format_text(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<5} {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"      fix: {c.fix}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    return "\n".join(lines)
