"""`support-gateway doctor` on a correct installation and on a broken one (docs/decisions.md D14).

DNS answers come from a StaticResolver (the zone an admin would publish); the database,
spool, relay (a CaptureRelay answering EHLO) and TLS files are real.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

from gateway.doctor import Check, format_text, run_checks
from gateway.outbound.dkim import keygen, load_key, public_txt_record
from gateway.security.dns import StaticResolver
from gateway.settings import Settings
from gateway.store.db import open_database
from tests.conftest import make_settings
from tests.support.cli import run as run_cli
from tests.support.relay import CaptureRelay

NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
HOST = "mx.example.com"
HOST_IP = "192.0.2.25"


def certificate(directory: Path, name: str, days: int) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    c, k = directory / "cert.pem", directory / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


def installation(tmp_path: Path, relay_port: int, *, cert_days: int = 90) -> Settings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    key_file = tmp_path / "dkim.key"
    keygen(key_file, domain="example.com", selector="gw1", bits=1024)
    cert, key = certificate(tmp_path / "tls", HOST, cert_days)
    settings = make_settings(
        tmp_path,
        smtp={
            "hostname": HOST,
            "domains": ["example.com"],
            "tls_cert": str(cert),
            "tls_key": str(key),
        },
        outbound={
            "relay": f"127.0.0.1:{relay_port}",
            "from_address": "support@example.com",
            "dkim": {"domain": "example.com", "selector": "gw1", "key_file": str(key_file)},
        },
    )
    settings.spool_path.mkdir(parents=True)
    open_database(settings.storage.database_url).dispose()
    return settings


def zone(settings: Settings) -> StaticResolver:
    """What the admin publishes, as docs/admin.md says."""
    d = settings.outbound.dkim
    key = load_key(Path(d.key_file), d.domain, d.selector)
    return StaticResolver(
        {
            ("example.com", "MX"): [f"10 {HOST}"],
            (HOST, "A"): [HOST_IP],
            ("example.com", "TXT"): [f"v=spf1 ip4:{HOST_IP} -all"],
            ("gw1._domainkey.example.com", "TXT"): [public_txt_record(key)],
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=quarantine; rua=mailto:dmarc@example.com"],
        }
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


async def test_a_correct_installation_is_all_ok(tmp_path: Path) -> None:
    async with CaptureRelay() as relay:
        settings = installation(tmp_path, relay.port)
        checks = await asyncio.to_thread(
            run_checks, None, settings=settings, resolver=zone(settings), now=NOW
        )
    print(format_text(checks))  # the figure for the closing note: pytest -n 0 -s -k correct
    got = by_name(checks)
    assert [c for c in checks if c.status != "ok"] == []
    assert set(got) == {
        "config",
        "database",
        "spool",
        "relay",
        "mx:example.com",
        "spf:example.com",
        "dkim:gw1._domainkey.example.com",
        "dmarc:example.com",
        "tls",
        "rules",
    }
    assert "250" in got["relay"].detail
    assert HOST_IP in got["spf:example.com"].detail


async def test_a_broken_installation_names_each_fix(tmp_path: Path) -> None:
    settings = installation(tmp_path / "good", 9, cert_days=5)  # relay port 9: nothing answers
    dns = zone(settings)
    dns.remove("example.com", "MX")
    dns.add("example.com", "MX", "10 old-mx.example.net")
    dns.remove("example.com", "TXT")
    dns.add("example.com", "TXT", "v=spf1 ip4:198.51.100.1 -all")  # not our address
    dns.remove("_dmarc.example.com", "TXT")
    dns.remove("gw1._domainkey.example.com", "TXT")
    other = tmp_path / "other.key"
    keygen(other, domain="example.com", selector="gw1", bits=1024)
    dns.add(
        "gw1._domainkey.example.com",
        "TXT",
        public_txt_record(load_key(other, "example.com", "gw1")),
    )
    Path(settings.storage.database_url.split("///")[1]).unlink()  # never migrated
    checks = await asyncio.to_thread(run_checks, None, settings=settings, resolver=dns, now=NOW)
    got = by_name(checks)

    assert got["database"].status == "fail"
    assert "db upgrade" in got["database"].fix
    assert got["relay"].status == "fail"
    assert got["mx:example.com"].status == "fail"
    assert got["mx:example.com"].fix == f"example.com. IN MX 10 {HOST}."
    spf = got["spf:example.com"]
    assert spf.status == "fail"
    assert spf.fix.endswith(f'"v=spf1 ip4:198.51.100.1 ip4:{HOST_IP} -all"')
    dkim = got["dkim:gw1._domainkey.example.com"]
    assert dkim.status == "fail"
    assert "does not match" in dkim.detail
    mine = public_txt_record(load_key(Path(settings.outbound.dkim.key_file), "example.com", "gw1"))
    assert mine[-40:] in dkim.fix.replace('" "', "")
    assert got["dmarc:example.com"].status == "warn"
    assert got["dmarc:example.com"].fix.startswith('_dmarc.example.com. IN TXT "v=DMARC1;')
    assert got["tls"].status == "warn"
    assert "expires in 5 days" in got["tls"].detail
    assert got["rules"].status == "ok"  # the rules are fine: only what is broken is reported


def test_dns_trouble_is_never_ok(tmp_path: Path) -> None:
    settings = installation(tmp_path, 9)
    dead = StaticResolver({}, temp_errors=[("example.com", "MX"), ("example.com", "TXT")])
    dead.add(HOST, "A", HOST_IP)
    got = by_name(run_checks(None, settings=settings, resolver=dead, now=NOW, relay_timeout=1))
    assert got["mx:example.com"].status == "warn"
    assert "could not check" in got["mx:example.com"].detail
    assert got["spf:example.com"].status == "warn"


def test_doctor_cli_json_and_exit_status(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'rules_dir = "{Path(__file__).parents[1] / "support" / "rules"}"\n'
        f'[smtp]\nhostname = "{HOST}"\ndomains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/gw.db"\nspool_dir = "{tmp_path}/spool"\n'
        '[outbound]\nrelay = "127.0.0.1:9"\n'
        # DNS pointed at an address where nothing listens: the DNS checks cannot pass.
        '[security]\nsecret_key = "doctor-secret-0123456789abcdefghijk"\n'
        'nameservers = ["127.0.0.1"]\n'
        "dns_timeout = 0.5\n"
    )
    r = run_cli(["--config", str(cfg), "doctor", "--json"])
    assert r.returncode == 1, r.stderr
    checks = json.loads(r.stdout)["checks"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    status = {c["name"]: c["status"] for c in checks}
    assert status["config"] == "ok"
    assert status["database"] == "fail"
    assert status["relay"] == "fail"
    assert status["rules"] == "ok"
    assert status["mx:example.com"] == "warn"  # DNS unreachable: not known, not ok
    assert not (tmp_path / "gw.db").exists()  # the doctor creates nothing


@pytest.mark.parametrize("bad", ['[smtp]\nlisten = "x:99999"\n'])
def test_doctor_reports_a_bad_config(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(bad)
    r = run_cli(["--config", str(cfg), "doctor"])
    assert r.returncode == 1
    assert "FAIL  config" in r.stdout
    assert "smtp.listen" in r.stdout


async def test_each_brand_is_checked_like_the_main_identity(tmp_path: Path) -> None:
    """docs/decisions.md D17: `doctor` checks every `[brands.X]`: MX of its reply domain, SPF of its
    From domain, its own DKIM record, DMARC; a brand whose key is not published fails by name."""
    import shutil

    from tests.conftest import RULES

    async with CaptureRelay() as relay:
        settings = installation(tmp_path, relay.port)
        b2_key = tmp_path / "b2.key"
        keygen(b2_key, domain="b2.example", selector="gw1", bits=1024)
        rules = tmp_path / "rules"
        rules.mkdir()
        shutil.copy(RULES / "rules.toml", rules / "rules.toml")
        (rules / "00-brands.toml").write_text(
            '[brands.b2]\nfrom_address = "help@b2.example"\nfrom_name = "B2 Support"\n'
            f'dkim = {{ domain = "b2.example", selector = "gw1", key_file = "{b2_key}" }}\n'
        )
        settings.rules_dir = str(rules)
        dns = zone(settings)
        dns.add("b2.example", "MX", f"10 {HOST}")
        dns.add("b2.example", "TXT", f"v=spf1 ip4:{HOST_IP} -all")
        dns.add("_dmarc.b2.example", "TXT", "v=DMARC1; p=reject")
        b2_record = public_txt_record(load_key(b2_key, "b2.example", "gw1"))
        dns.add("gw1._domainkey.b2.example", "TXT", b2_record)
        good = by_name(
            await asyncio.to_thread(run_checks, None, settings=settings, resolver=dns, now=NOW)
        )
        dns.remove("gw1._domainkey.b2.example", "TXT")
        bad = by_name(
            await asyncio.to_thread(run_checks, None, settings=settings, resolver=dns, now=NOW)
        )
    for name in ("mx:b2.example", "spf:b2.example", "dkim:gw1._domainkey.b2.example"):
        assert good[name].status == "ok", good[name]
    assert good["dmarc:b2.example"].status == "ok"
    broken = bad["dkim:gw1._domainkey.b2.example"]
    assert broken.status == "fail"
    assert "v=DKIM1" in broken.fix
    assert bad["dkim:gw1._domainkey.example.com"].status == "ok"  # the main key is untouched
