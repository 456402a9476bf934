"""Pipe mode: `support-gateway ingest`, run by an MTA once per message, importing little.

Postfix's pipe(8) starts one process per message (or per batch of recipients), so start-up
time is delivery latency: the full command line imports SQLAlchemy, pydantic and the whole
pipeline (~0.9 s, docs/decisions.md D14.2). This module imports only the standard library and the
spool, reads the few settings it needs straight from the TOML file and the environment, and
makes the message durable. Processing happens later, in the running daemon (it polls the spool
every 2 s) or in `support-gateway process`, which also delivers the outbox once.

Arguments (both Postfix forms work, see docs/postfix.md)::

    ingest [--config C] [--sender S] [--recipient R [R ...]] [--file PATH|-] [ADDRESS ... | FILE]

* ``--recipient=${recipient}``: pipe(8) repeats an argument that contains ``${recipient}``
  once per recipient; ``--recipient ${recipient}`` (several words after one flag) works too.
* A positional word containing ``@`` is a recipient, never the message file; ``-`` is stdin;
  any other single word is FILE (docs/interface.md: ``ingest [FILE]``).
* ``MAILER-DAEMON`` as sender is Postfix's spelling of the null sender unless
  ``null_sender=`` is set on the transport; both mean ``<>``.

Exit status (sysexits.h, which pipe(8) understands): 0 only once the message is durable; 75
(EX_TEMPFAIL: the MTA keeps the message and retries) for *every* failure, usage mistakes in
master.cf included, since a bounce would lose a customer's mail.

Settings read here, with the same lookup (``--config``, ``$GATEWAY_CONFIG``,
``./config.toml``) and the same ``GATEWAY_<SECTION>__<KEY>`` overrides as the full loader:
``storage.spool_dir``, ``storage.max_attempts``, ``smtp.min_free_disk``, ``smtp.domains``.
The other keys are validated by the daemon, which must run anyway to process the mail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EX_OK = 0
EX_TEMPFAIL = 75  # sysexits.h: the MTA keeps the message and retries

_SIZE_UNITS = {
    "": 1,
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


class PipeError(Exception):
    """Anything that stops ingest; always a temporary failure for the MTA (exit 75)."""


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on a usage error, which pipe(8) turns into a bounce: keep the mail.
    def error(self, message: str) -> Any:
        raise PipeError(f"usage: {message}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ingest arguments (shared by the full command line and the fast path)."""
    p.add_argument(
        "words",
        nargs="*",
        metavar="ADDRESS|FILE",
        help="recipient addresses (anything with @), or one message FILE; '-' = stdin",
    )
    p.add_argument(
        "--sender", "-f", default=None, help="envelope sender (Postfix --sender=${sender})"
    )
    p.add_argument(
        "--recipient",
        "-r",
        action="extend",
        nargs="+",
        default=[],
        help="envelope recipient(s) (Postfix --recipient=${recipient}); repeatable",
    )
    p.add_argument("--file", help="the message file ('-' or absent: stdin)")


@dataclass
class IngestConfig:
    spool_dir: str = "var/spool"
    max_attempts: int = 5
    min_free_disk: int = 200 * 1024**2
    domains: list[str] = field(default_factory=lambda: ["example.com", "localhost"])


def parse_size(value: Any) -> int:
    """Sizes as in settings.py (`50MiB`, `10MB`, `512K`, bytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("kmgtib")
    unit = text[len(num) :]
    try:
        return int(float(num) * _SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise PipeError(f"{value!r}: expected a size such as 50MiB, 10MB or 1048576") from None


def _env(section: str, key: str) -> str | None:
    want = f"GATEWAY_{section}__{key}".upper()
    for k, v in os.environ.items():
        if k.upper() == want:
            return v
    return None


def load_config(explicit: str | None) -> IngestConfig:
    """The settings ingest needs (see module docstring); PipeError names a bad one."""
    path = (
        Path(explicit)
        if explicit
        else Path(os.environ["GATEWAY_CONFIG"])
        if os.environ.get("GATEWAY_CONFIG")
        else Path("config.toml")
        if Path("config.toml").exists()
        else None
    )
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PipeError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PipeError(f"{path}: {exc}") from None
    cfg = IngestConfig()
    storage, smtp = data.get("storage", {}), data.get("smtp", {})
    cfg.spool_dir = str(_env("storage", "spool_dir") or storage.get("spool_dir", cfg.spool_dir))
    try:
        cfg.max_attempts = int(
            _env("storage", "max_attempts") or storage.get("max_attempts", cfg.max_attempts)
        )
    except ValueError:
        raise PipeError("storage.max_attempts: expected a number") from None
    cfg.min_free_disk = parse_size(
        _env("smtp", "min_free_disk") or smtp.get("min_free_disk", cfg.min_free_disk)
    )
    env_domains = _env("smtp", "domains")
    domains = json.loads(env_domains) if env_domains else smtp.get("domains", cfg.domains)
    cfg.domains = [str(d).strip().lower().rstrip(".") for d in domains if str(d).strip()]
    return cfg


def split_words(words: list[str], file: str | None) -> tuple[list[str], str | None]:
    """Positional words -> (recipients, message file or None for stdin). See module doc."""
    recipients: list[str] = []
    for w in words:
        if "@" in w:
            recipients.append(w)
        elif w == "-":
            file = file or "-"
        elif file is None:
            file = w
        else:
            raise PipeError(f"{w!r} is neither an address nor the only FILE")
    return recipients, (None if file in (None, "-") else file)


def ingest(args: argparse.Namespace, stdin: Any = None) -> str:
    """Make one message durable; return the spool id. Raises on any failure."""
    from gateway.spool import Envelope, Spool

    cfg = load_config(args.config)
    extra, file = split_words(list(args.words), args.file)
    raw = Path(file).read_bytes() if file else (stdin or sys.stdin.buffer).read()
    sender = args.sender
    recipients = [*args.recipient, *extra]
    if sender is None or not recipients:
        # Only without an envelope from the MTA: read it from the headers (the email
        # package is the largest import left, so the Postfix recipes never pay for it).
        from email.parser import BytesHeaderParser
        from email.utils import getaddresses

        headers = BytesHeaderParser().parsebytes(raw)
        if sender is None:
            rp = getaddresses([str(headers.get("Return-Path", ""))])
            sender = rp[0][1] if rp else ""
        recipients = recipients or [
            a for _, a in getaddresses([str(v) for v in headers.get_all("To", []) or []]) if a
        ]
    recipients = recipients or [f"postmaster@{cfg.domains[0]}"]
    if sender.upper() == "MAILER-DAEMON":  # pipe(8)'s default spelling of <>
        sender = ""
    # Normalise CRLF so pipe mode and SMTP store the same bytes for the same message.
    if b"\r\n" not in raw:
        raw = raw.replace(b"\n", b"\r\n")
    spool = Spool(
        Path(cfg.spool_dir), max_attempts=cfg.max_attempts, min_free_disk=cfg.min_free_disk
    )
    spool.open()
    try:
        entry_id = spool.submit_sync(
            Envelope(
                mail_from=sender,
                rcpt_tos=recipients,
                source="pipe",
                received_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
            ),
            raw,
        )
    finally:
        spool.close()
    return str(entry_id)


def run(args: argparse.Namespace) -> int:
    """Exit 0 only when the message is durable; 75 on any failure (the MTA retries)."""
    os.umask(0o077)  # the spool it may create holds customers' mail (as `serve` does)
    try:
        entry_id = ingest(args)
    except PipeError as exc:
        print(f"support-gateway ingest: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except Exception as exc:  # anything else is temporary too: the MTA keeps the mail
        print(f"support-gateway ingest: temporary failure: {exc!r}", file=sys.stderr)
        return EX_TEMPFAIL
    print(f"queued as {entry_id}")
    return EX_OK


def fast_main(argv: list[str]) -> int | None:
    """`ingest` without importing the rest of the application; None if argv is not ingest.

    Global options before the command (`--config C`, `--config=C`, `-v`) are understood;
    `--help` and anything unexpected fall through to the full command line.
    """
    config: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
        elif a in ("-v", "--verbose"):
            i += 1
        else:
            break
    if i >= len(argv) or argv[i] != "ingest" or any(w in ("-h", "--help") for w in argv[i:]):
        return None
    p = _Parser(prog="support-gateway ingest", add_help=False)
    add_arguments(p)
    try:
        args = p.parse_args(argv[i + 1 :])
    except PipeError as exc:
        print(f"support-gateway ingest: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    args.config = config
    return run(args)
