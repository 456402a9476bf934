"""Infrastructure settings: `config.toml` plus `GATEWAY_<SECTION>__<KEY>` environment overrides.

The key names are the public contract (../shared/docs/CONTRACT.md); more keys may be added,
none renamed. Business rules (people, routes, SLAs) live in `rules/`, never here.

Precedence, highest first: environment variables, the TOML file, the embedded defaults.
An invalid value stops start-up with a message naming the key, the value and what is
expected (`ConfigError`).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B|[KMGT])?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


class ConfigError(Exception):
    """The configuration is unusable; the message names every bad key and value."""


def parse_size(value: int | str) -> int:
    """Parse `50MiB`, `10MB`, `512K` or a plain byte count into bytes."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError("expected a size such as 50MiB, 10MB or 1048576")
    unit = m.group(2).lower() if m.group(2) else None
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_hostport(value: str, *, default_port: int) -> tuple[str, int]:
    """Split `host:port`, `[::1]:25` or `host` (default port) into its parts."""
    value = value.strip()
    if not value:
        raise ValueError("expected host:port")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError("expected [ipv6]:port")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not host:
        raise ValueError("expected host:port with a host")
    if port_text == "":
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return host, int(port_text)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SmtpSettings(_Section):
    listen: str = "127.0.0.1:2525"
    hostname: str = "localhost"
    domains: list[str] = Field(default_factory=lambda: ["example.com", "localhost"])
    max_message_size: int = parse_size("50MiB")
    # What we read from the wire at most; beyond it the rest of DATA is read and discarded
    # but the message is still accepted (never bounce a customer) and marked truncated.
    max_receive_size: int = 0  # 0 = 2 x max_message_size
    tls_cert: str = ""
    tls_key: str = ""
    timeout: float = 300.0
    max_connections: int = 500
    max_connections_per_ip: int = 50
    max_recipients: int = 100
    max_messages_per_connection: int = 1000
    min_free_disk: int = parse_size("200MiB")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v, default_port=25)
        return v

    @field_validator("max_message_size", "max_receive_size", "min_free_disk", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = [d.strip().lower().rstrip(".") for d in v if d.strip()]
        if not out:
            raise ValueError("expected at least one support domain")
        return out

    @property
    def receive_limit(self) -> int:
        return self.max_receive_size or 2 * self.max_message_size


class StorageSettings(_Section):
    database_url: str = "sqlite:///var/gateway.db"
    spool_dir: str = "var/spool"
    # A message whose processing fails this many times moves to the quarantine.
    max_attempts: int = 5
    # With PostgreSQL: the spool is the database's spool_entry table (any node processes any
    # message; spool_dir only holds mail while the database is unreachable). False: each
    # node spools to its own disk as with SQLite (docs/scaling.md).
    shared_spool: bool = True

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected sqlite:///path or postgresql+psycopg://user@host/db")
        return v


class DkimSettings(_Section):
    domain: str = "example.com"
    selector: str = "gw1"
    key_file: str = ""
    # Optional second key (e.g. ed25519 next to rsa): both signatures are added.
    extra_key_files: list[str] = Field(default_factory=list)


class OutboundSettings(_Section):
    relay: str = "127.0.0.1:1025"
    from_address: str = "support@example.com"
    from_name: str = "Example Support"
    # Acknowledgements to one sender per 24 h at most (Znuny: 40/day, Mailman: 10/day);
    # past it the mail is still recorded and the owner is told once.
    daily_ack_cap: int = Field(default=5, ge=1)
    # Owner notifications attach the customer's files up to this total; above it, they
    # list names and sizes instead.
    notify_attachment_limit: int = Field(default=10 * 1024 * 1024, ge=0)
    dkim: DkimSettings = Field(default_factory=DkimSettings)

    @field_validator("relay")
    @classmethod
    def _relay(cls, v: str) -> str:
        if v:
            parse_hostport(v, default_port=25)
        return v

    @field_validator("from_address")
    @classmethod
    def _from(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("expected an email address such as support@example.com")
        return v


class SecuritySettings(_Section):
    secret_key: str = ""
    secret_key_file: str = ""
    # authserv-ids whose Authentication-Results headers we trust (our front MTA).
    trusted_authserv_ids: list[str] = Field(default_factory=list)
    # Verify senders (DKIM, SPF, DMARC) on arrival; off = no DNS lookups at all.
    verify_senders: bool = True
    # DNS servers for those checks; empty = the system's /etc/resolv.conf.
    nameservers: list[str] = Field(default_factory=list)
    dns_timeout: float = 5.0
    # All DNS questions of one message share this many seconds (issue 10: DNS trouble must
    # not stall the pipeline); what does not answer in time is "temperror", decided later.
    dns_budget: float = Field(default=2.0, gt=0)
    # How long an inconclusive sender check (DNS timeout, SERVFAIL) is re-tried, with
    # backoff, before the policy below decides. Staff replies wait as long, then are refused.
    recheck_window: float = Field(default=1800.0, gt=0)
    # An acknowledgement whose sender is still unverified after recheck_window: "suppress"
    # (default: it could be backscatter) or "send". A sender that FAILED is never answered.
    ack_if_unverified: Literal["suppress", "send"] = "suppress"
    # Opt-in, empty by default: staff domains that publish neither DKIM nor SPF, whose staff
    # replies are accepted on the signed reply token alone when the checks completed and
    # nothing failed. A token travels in forwards and reply-all: prefer DKIM.
    staff_token_only_domains: list[str] = Field(default_factory=list)


class TicketSettings(_Section):
    ref_prefix: str = "ACME"
    first_number: int = 1000
    # A customer writing to a closed ticket: "reopen" it, or open a "new" linked ticket.
    closed_followup: Literal["reopen", "new"] = "reopen"

    @field_validator("ref_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,15}", v):
            raise ValueError("expected 1-16 letters or digits starting with a letter")
        return v.upper()


class PipelineSettings(_Section):
    # Run the pipeline in a child process (its own core): SMTP ingest keeps full speed
    # during a burst. false = a thread in the daemon's process.
    process: bool = True
    # Supervision of that child (docs/operations.md): the first restart waits this many
    # seconds, doubling each time (at most 60 s); more than `max_restarts` restarts within
    # `restart_window` seconds and it stays down (SMTP keeps spooling) and the admins are
    # alerted. A child that is busy without progress for `hang_timeout` seconds is killed.
    restart_backoff: float = Field(default=1.0, gt=0)
    max_restarts: int = Field(default=5, ge=1)
    restart_window: float = Field(default=300.0, gt=0)
    hang_timeout: float = Field(default=300.0, gt=0)


class AlertsSettings(_Section):
    # Who is told about infrastructure trouble (database, disk, DNS, quarantine) and a
    # pipeline that stays down; empty = the rules' default owner.
    admins: list[str] = Field(default_factory=list)

    @field_validator("admins")
    @classmethod
    def _admins(cls, v: list[str]) -> list[str]:
        for a in v:
            if "@" not in a:
                raise ValueError(f"expected email addresses, got {a!r}")
        return v


class NodeSettings(_Section):
    # This node's name in outbox claims (gateway/node.py); "" = host name + hash of the
    # spool folder. Must be unique per running daemon and stable across its restarts.
    id: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError("expected 1-64 letters, digits, '.', '_' or '-'")
        return v


class Settings(BaseSettings):
    """Every infrastructure key of the gateway. Build with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    rules_dir: str = "rules"
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    tickets: TicketSettings = Field(default_factory=TicketSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)

    # Where the TOML came from (None: embedded defaults); relative paths resolve from cwd.
    config_path: str | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _TOML_PATH.get("path")
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # Derived values -------------------------------------------------------------------

    @property
    def listen(self) -> tuple[str, int]:
        return parse_hostport(self.smtp.listen, default_port=25)

    @property
    def relay(self) -> tuple[str, int] | None:
        if not self.outbound.relay:
            return None
        return parse_hostport(self.outbound.relay, default_port=25)

    @property
    def spool_path(self) -> Path:
        return Path(self.storage.spool_dir)

    @property
    def rules_path(self) -> Path:
        return Path(self.rules_dir)

    def secret(self) -> bytes:
        """The HMAC secret for reply tokens and Message-IDs.

        With neither `secret_key` nor `secret_key_file` set, a random key is created once
        beside the spool (mode 0600) so tokens stay valid across restarts.
        """
        if self.security.secret_key:
            return self.security.secret_key.encode()
        path = Path(self.security.secret_key_file or self.spool_path.parent / "secret_key")
        if path.exists():
            key = path.read_text().strip()
            if len(key) < 16:
                raise ConfigError(f"security.secret_key_file = {str(path)!r}: key is too short")
            return key.encode()
        if self.security.secret_key_file:
            raise ConfigError(f"security.secret_key_file = {str(path)!r}: file does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return path.read_text().strip().encode()


# pydantic-settings builds its sources from the class, so the chosen TOML path is handed
# over here for the duration of one `load_settings()` call.
_TOML_PATH: dict[str, Path | None] = {}


def resolve_config_path(explicit: str | None) -> Path | None:
    """`--config`, else `$GATEWAY_CONFIG`, else `./config.toml` if present, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GATEWAY_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.exists() else None


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Load settings; raise `ConfigError` naming every bad key, its value and the expectation."""
    path = resolve_config_path(config)
    if path is not None and not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    _TOML_PATH["path"] = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        _TOML_PATH.pop("path", None)
    settings.config_path = str(path) if path else None
    return settings


def _format_errors(exc: ValidationError, path: Path | None) -> str:
    where = str(path) if path else "configuration"
    lines = [f"invalid {where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (see config.example.toml for the valid keys)")
        else:
            lines.append(f"  {key} = {err.get('input')!r}: {msg}")
    return "\n".join(lines)
