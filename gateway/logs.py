"""Logging an admin can read: one line per message event, libraries quiet, text or JSON lines.

Our own lines that describe a message (accepted, processed, delivered, delivery failed)
carry their facts twice: as `key=value` words in the text (for a person reading the
journal) and as fields in the `extra={"fields": ...}` dict, which the JSON formatter puts
at the top level of the object (for Loki, Elasticsearch, `jq`). `--log-format json` or
config `log_format = "json"` / `[logging] format = "json"` selects JSON lines.

Library noise (docs/decisions.md D14.6) is off unless `-v`: alembic's INFO lines at every
migration check, aiosmtpd's "Connection lost during _handle_client()" on every clean QUIT
(logger `mail.log`), dkimpy's per-signature errors (the result is stored on the message).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

#: Loggers that stay at WARNING unless -v (debug) is given.
QUIET = ("alembic", "mail.log", "aiosmtplib", "sqlalchemy", "asyncio")


def kv(fields: dict[str, Any]) -> str:
    """`key=value` words; values with spaces or quotes are JSON-quoted."""
    out = []
    for k, raw in fields.items():
        v = ",".join(str(x) for x in raw) if isinstance(raw, list | tuple) else raw
        s = "-" if v is None or v == "" else str(v)
        if any(c.isspace() for c in s) or '"' in s or "=" in s:
            s = json.dumps(s, ensure_ascii=False)
        out.append(f"{k}={s}")
    return " ".join(out)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                obj.setdefault(k, v)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    *,
    fmt: str = "text",
    verbose: bool = False,
    level: str = "INFO",
    stream: TextIO | None = None,
    tag: str = "",
) -> None:
    """Configure the root logger (replacing earlier handlers: the CLI may call it twice)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        name = "%(name)s" + (f"[{tag}]" if tag else "")
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", name)))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO))
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        # dkimpy logs every failing signature at ERROR; the result is stored on the message.
        logging.getLogger("gateway.security.sender_auth.dkimpy").setLevel(logging.CRITICAL)
