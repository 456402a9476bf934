"""Infrastructure settings: `config.toml` plus `GATEWAY_<SECTION>__<KEY>` environment overrides.

The key names are the public contract (docs/interface.md); more keys may be added,
none renamed. Business rules (people, routes, SLAs) live in `rules/`, never here.

Precedence, highest first: environment variables, the TOML file, the embedded defaults.
An invalid value stops start-up with a message naming the key, the value and what is
expected (`ConfigError`).
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B|[KMGT])?\s*$", re.IGNORECASE)
# A host name, an IPv4 address or (inside brackets) an IPv6 address: letters, digits, dots,
# hyphens, colons, "*" never. `garbage` is a valid host name, which is why `smtp.listen`
# additionally requires an explicit port (docs/decisions.md D14: "garbage" was read as ("garbage",
# 25)).
_HOST_RE = re.compile(r"[A-Za-z0-9_.\-:%]+")
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
    host, port_text = _split_hostport(value)
    if not host:
        raise ValueError("expected host:port with a host")
    if not _HOST_RE.fullmatch(host):
        raise ValueError("expected host:port, e.g. 127.0.0.1:25, [::1]:25 or mx.example.com:25")
    if port_text == "" and not value.endswith(":"):
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return host, int(port_text)


def _split_hostport(value: str) -> tuple[str, str]:
    """(host, port text) of a non-empty `host:port`, `[ipv6]:port` or `host`."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError("expected [ipv6]:port")
        if rest and not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        if rest == ":":
            raise ValueError("expected a port number from 0 to 65535 after the colon")
        return host, rest[1:]
    if value.count(":") == 1:
        host, _, port_text = value.partition(":")
        return host, port_text
    return value, ""


def _listen_value(v: str, *, required: bool) -> str:
    """A listen address must say its port: `host:port` or `[ipv6]:port` (0 = any free port)."""
    v = v.strip()
    if not v and not required:
        return v
    _host, port = parse_hostport(v, default_port=-1)
    if port < 0:
        raise ValueError("expected host:port with an explicit port, e.g. 127.0.0.1:25 or [::1]:25")
    return v


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
    # Bytes of message data all sessions together may hold in memory. A message that does
    # not fit (or is larger than 1 MiB) is streamed to a file in <spool_dir>/tmp and from
    # there into the spool, so memory stays bounded whatever clients send (docs/decisions.md D10.7).
    inflight_budget: int = parse_size("256MiB")
    # A session ends with "421 4.4.2" after this many seconds, however busy it keeps
    # itself (NOOP/RSET reset the idle timer, RFC 5321 §4.5.3.2 only bounds idleness).
    max_session_time: float = Field(default=1800.0, gt=0)
    # NOOP, RSET, HELP, VRFY, EXPN, HELO/EHLO allowed between two accepted messages.
    max_idle_commands: int = Field(default=50, ge=1)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _listen_value(v, required=True)

    @field_validator(
        "max_message_size", "max_receive_size", "min_free_disk", "inflight_budget", mode="before"
    )
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
    # docs/decisions.md D12: further new mails from one customer within this long after an
    # acknowledgement share ONE acknowledgement (and the owner one notification), sent when
    # the window closes. A duration (gateway.sla.durations, clock time); "0s" = no bundling.
    ack_window: str = "2m"
    # The language of letters when neither the route, the customer's earlier choice, the
    # message's Content-Language nor a confident detection of its text says one (docs/decisions.md
    # D17).
    default_language: Literal["en", "de", "fr", "es", "ru"] = "en"
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

    @field_validator("ack_window")
    @classmethod
    def _ack_window(cls, v: str) -> str:
        if v.strip() in ("0", ""):
            return "0s"
        from gateway.sla.durations import parse as parse_duration

        parse_duration(v)  # ValueError names the grammar
        return v

    @property
    def ack_window_delta(self) -> timedelta:
        """``ack_window`` as clock time (a day is 24 hours here: no calendar applies)."""
        from gateway.sla.durations import parse as parse_duration

        return parse_duration(self.ack_window).business()


MIN_SECRET_LENGTH = 32


def secret_problem(secret: str) -> str | None:
    """Why `secret` is unfit to key an HMAC, or None.

    Reply tokens and Message-IDs are HMAC-signed with it (gateway/security/tokens.py): a
    short or repetitive key can be guessed offline from one token and then forges staff
    replies. 32 bytes is the HMAC-SHA256 output size (RFC 2104 §3: keys shorter than it
    weaken the function). A length check alone would pass "aaaa…", so very few distinct
    characters is refused too; `secrets.token_hex(32)` (what we generate) has 16.
    """
    if len(secret.encode()) < MIN_SECRET_LENGTH:
        return (
            f"too short ({len(secret.encode())} bytes; at least {MIN_SECRET_LENGTH} random bytes,"
            " e.g. the output of `openssl rand -hex 32`)"
        )
    if len(set(secret)) < 8:
        return "too little variety (a repeated pattern); use `openssl rand -hex 32`"
    return None


class SecuritySettings(_Section):
    secret_key: str = ""
    secret_key_file: str = ""
    # authserv-ids whose Authentication-Results headers we trust (our front MTA). With
    # trusted_relays set, honoured only on mail that came through one of those relays.
    trusted_authserv_ids: list[str] = Field(default_factory=list)
    # Front MTAs (addresses or networks, e.g. ["127.0.0.1/32", "::1"]) whose Received header
    # and Authentication-Results we trust: sender checks (SPF) use the client address and
    # HELO the relay saw (gateway/security/relay.py, docs/postfix.md).
    trusted_relays: list[str] = Field(default_factory=list)
    # Verify senders (DKIM, SPF, DMARC) on arrival; off = no DNS lookups at all.
    verify_senders: bool = True
    # DNS servers for those checks; empty = the system's /etc/resolv.conf.
    nameservers: list[str] = Field(default_factory=list)
    dns_timeout: float = 5.0
    # All DNS questions of one message share this many seconds (docs/decisions.md D10: DNS trouble
    # must not stall the pipeline); what does not answer in time is "temperror", decided later.
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

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, v: str) -> str:
        problem = secret_problem(v) if v else None  # "" = generated and stored for you
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("trusted_relays")
    @classmethod
    def _relays(cls, v: list[str]) -> list[str]:
        from gateway.security.relay import parse_networks

        parse_networks(v)  # raises ValueError naming the bad entry
        return [x.strip() for x in v]


class TicketSettings(_Section):
    ref_prefix: str = "ACME"
    first_number: int = 1000
    # A customer writing to a closed ticket: "reopen" it, or open a "new" linked ticket.
    closed_followup: Literal["reopen", "new"] = "reopen"
    # docs/decisions.md D12, a known customer writing a NEW mail (not a reply) while they have open
    # tickets (docs/threading.md "Known customer writing again"): "same-subject" joins the
    # open ticket with the same normalised subject, or the one the mail names (ACME-1042 in
    # the text); otherwise, and always with "separate", a new ticket whose acknowledgement
    # lists the customer's other open requests. Routes override it (`known_customer`).
    known_customer: Literal["same-subject", "separate"] = "same-subject"

    @field_validator("ref_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,15}", v):
            raise ValueError("expected 1-16 letters or digits starting with a letter")
        return v.upper()


class JunkSettings(_Section):
    """The junk folder (docs/decisions.md D18): what a route with ``disposition = "junk"``, a
    blocked sender or a staff ``#junk`` keeps out of the ticket queue."""

    # Junk older than this many days is expired: its raw message is dropped, the record of
    # what it was and why it was junk stays.
    expire_days: int = Field(default=30, ge=1)
    # More than alert_threshold items junked within alert_window (a duration: 30m, 1h, 1d
    # in clock time) raise one alert to [alerts] admins per window.
    alert_threshold: int = Field(default=500, ge=1)
    alert_window: str = "1h"

    @field_validator("alert_window")
    @classmethod
    def _window(cls, v: str) -> str:
        from gateway.sla.durations import parse

        if parse(v).is_zero():
            raise ValueError("expected a duration such as 30m, 1h or 1d")
        return v

    @property
    def alert_window_seconds(self) -> float:
        from gateway.sla.durations import parse

        return parse(self.alert_window).business().total_seconds()


#: Most pipeline processes one node may run (`pipeline.workers`).
MAX_PIPELINE_WORKERS = 16


class PipelineSettings(_Section):
    # Run the pipeline in a child process (its own core): SMTP ingest keeps full speed
    # during a burst. false = a thread in the daemon's process.
    process: bool = True
    # How many pipeline processes this node runs. More than one needs PostgreSQL with the
    # shared spool: each takes its own messages (claims with row locks) and their statements
    # overlap their round trips to the server; SQLite takes one writer at a time, so a
    # second process there would only wait (docs/scaling.md).
    workers: int = Field(default=1, ge=1, le=MAX_PIPELINE_WORKERS)
    # Supervision of that child (docs/operations.md): the first restart waits this many
    # seconds, doubling each time (at most 60 s); more than `max_restarts` restarts within
    # `restart_window` seconds and it stays down (SMTP keeps spooling) and the admins are
    # alerted. A child that is busy without progress for `hang_timeout` seconds is killed.
    restart_backoff: float = Field(default=1.0, gt=0)
    max_restarts: int = Field(default=5, ge=1)
    restart_window: float = Field(default=300.0, gt=0)
    hang_timeout: float = Field(default=300.0, gt=0)


class AlertsSettings(_Section):
    # Who is told about infrastructure trouble (database, disk, DNS, quarantine), a
    # pipeline that stays down and a junk folder growing fast; empty = the rules' default
    # owner.
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


class HttpSettings(_Section):
    # /metrics (Prometheus text format), /healthz, /readyz. "" = off. Off in the embedded
    # defaults so that tests and a second instance on one host never fight over a port;
    # config.example.toml turns it on at 127.0.0.1:9025 (docs/interface.md). Port 0 = any free
    # port (tests read the bound one from Gateway.http_port).
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _listen_value(v, required=False)


class LoggingSettings(_Section):
    # "text": one readable line per event; "json": one JSON object per line (for journald
    # forwarding, Loki, Elasticsearch). The global `--log-format` option overrides it.
    format: Literal["text", "json"] = "text"
    # Our own loggers' level; libraries stay at WARNING unless -v is given.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Settings(BaseSettings):
    """Every infrastructure key of the gateway. Build with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    rules_dir: str = "rules"
    # Admin overrides of the shipped letter templates (docs/templates.md); relative to the
    # folder that holds rules_dir ("templates" beside "rules").
    templates_dir: str = "templates"
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    tickets: TicketSettings = Field(default_factory=TicketSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    # Shorthand for [logging] format (the brief's `log_format`); "" = use [logging] format.
    log_format: Literal["", "text", "json"] = ""
    junk: JunkSettings = Field(default_factory=JunkSettings)

    # Where the TOML came from (None: embedded defaults); relative paths resolve from cwd.
    config_path: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _workers_need_shared_spool(self) -> Settings:
        if self.pipeline.workers > 1 and not self.shared_spool:
            raise ValueError(
                f"pipeline.workers = {self.pipeline.workers} needs PostgreSQL with"
                " storage.shared_spool = true: SQLite and a node's own spool take one"
                " pipeline process at a time"
            )
        return self

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
    def http_listen(self) -> tuple[str, int] | None:
        if not self.http.listen:
            return None
        return parse_hostport(self.http.listen, default_port=9025)

    @property
    def effective_log_format(self) -> str:
        return self.log_format or self.logging.format

    @property
    def relay(self) -> tuple[str, int] | None:
        if not self.outbound.relay:
            return None
        return parse_hostport(self.outbound.relay, default_port=25)

    @property
    def shared_spool(self) -> bool:
        """Is the spool the database's `spool_entry` table (PostgreSQL, shared_spool)?"""
        url = self.storage.database_url
        return url.startswith("postgresql") and self.storage.shared_spool

    @property
    def spool_path(self) -> Path:
        return Path(self.storage.spool_dir)

    @property
    def rules_path(self) -> Path:
        return Path(self.rules_dir)

    @property
    def templates_path(self) -> Path:
        """The override folder: absolute as given, else beside the rules folder; a
        ``templates`` folder *inside* the rules folder (the first layout) still counts."""
        given = Path(self.templates_dir)
        if given.is_absolute():
            return given
        beside = self.rules_path.absolute().parent / given
        inside = self.rules_path / given
        return inside if not beside.is_dir() and inside.is_dir() else beside

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
            problem = secret_problem(key)
            if problem:
                raise ConfigError(f"security.secret_key_file = {str(path)!r}: key is {problem}")
            return key.encode()
        if self.security.secret_key_file:
            raise ConfigError(f"security.secret_key_file = {str(path)!r}: file does not exist")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    # A bad value may come from the file or from a GATEWAY_* variable; name both sources.
    where = f"configuration ({path} and GATEWAY_* environment)" if path else "configuration"
    lines = [f"invalid {where}:"]
    errors = exc.errors()
    for err in errors:
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (see config.example.toml for the valid keys)")
        elif key.endswith("secret_key"):  # never echo a secret into a log
            lines.append(f"  {key} = <hidden>: {msg}")
        else:
            lines.append(f"  {key} = {err.get('input')!r}: {msg}")
    # one problem, one line (docs/decisions.md D14: an admin greps the journal)
    if len(errors) == 1:
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)
