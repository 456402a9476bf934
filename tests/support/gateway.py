"""Run the real gateway in-process on a free loopback port, and talk SMTP to it."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
from sqlalchemy.engine import make_url
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import Clock
from gateway.security.dns import StaticResolver
from gateway.settings import Settings
from gateway.store.db import open_database
from gateway.store.models import Ticket
from gateway.store.queries import find_ticket
from gateway.views import ticket_detail

_template: list[Path] = []  # this process's migrated SQLite database (made once)


def _migrated_template() -> Path:
    if not _template:
        folder = Path(tempfile.mkdtemp(prefix="gw-migrated-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "gateway.db"
        open_database(f"sqlite:///{path}").dispose()
        with contextlib.closing(sqlite3.connect(path)) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
        _template.append(path)
    return _template[0]


def seed_migrated_database(settings: Settings) -> None:
    """Start a new SQLite database as a copy of one migrated to the head revision, which is
    what `open_database()` makes of a missing file (it then finds nothing to migrate): the
    migrations cost about 0.15 s of CPU per gateway started, hundreds of times a run. The
    migrations themselves still run from an empty file wherever a test opens a database
    otherwise (the `db` fixture, every `serve` and CLI child process, PostgreSQL)."""
    url = make_url(settings.storage.database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    target = Path(url.database)
    if target.exists():
        return
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(_migrated_template(), target)
    target.chmod(0o600)  # as make_engine creates it (customers' mail)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, clock: Clock, *, workers: bool = False
) -> AsyncIterator[Gateway]:
    """The gateway, listening. With workers=False the test drives `pipeline.run_once()`."""
    seed_migrated_database(settings)
    gw = Gateway(settings, clock=clock, resolver=StaticResolver({}))
    await gw.start(workers=workers)
    try:
        yield gw
    finally:
        await gw.stop()


def make_mail(
    *,
    sender: str = "pat@customer.example",
    to: str = "support@example.com",
    subject: str = "Printer on fire",
    body: str = "Hello,\nthe printer is on fire.\nPat\n",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    cc: str | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    if cc:
        m["Cc"] = cc
    m["Subject"] = subject
    m["Date"] = "Mon, 23 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = message_id or make_msgid(domain="customer.example")
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
    if references:
        m["References"] = " ".join(references)
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return m


async def send(
    gw: Gateway,
    message: EmailMessage | bytes,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
) -> tuple[int, str]:
    """Send over real SMTP; return the final reply (code, text)."""
    if isinstance(message, EmailMessage):
        raw = message.as_bytes()
        sender = sender if sender is not None else str(message["From"]).split("<")[-1].strip(">")
        recipients = recipients or [str(message["To"])]
    else:
        raw = message
    assert recipients
    assert sender is not None
    assert gw.port is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=30) as smtp:
        errors, text = await smtp.sendmail(sender, list(recipients), raw)
        assert not errors, errors
        return 250, text


def ticket_json(gw: Gateway, ref: str) -> dict:  # type: ignore[type-arg]
    with Session(gw.engine) as s:
        t = find_ticket(s, ref)
        assert t is not None, f"no ticket {ref}"
        return ticket_detail(s, t, gw.rules.current)


def inbound(ticket: dict) -> list[dict]:  # type: ignore[type-arg]
    """The messages that came in (acknowledgements and notifications are outbound)."""
    return [m for m in ticket["messages"] if m["direction"] == "in"]


def all_tickets(gw: Gateway) -> list[Ticket]:
    with Session(gw.engine) as s:
        return list(s.exec(select(Ticket).order_by(Ticket.id)).all())  # type: ignore[arg-type]


def rules_check(root: Path) -> subprocess.CompletedProcess[str]:
    """`support-gateway rules check` on ``root/rules`` (and ``root/templates``), as an admin
    runs it (tests/support/cli.py: no GATEWAY_* variables of the test run)."""
    cfg = root / "check.toml"
    cfg.write_text(f'rules_dir = "{root / "rules"}"\n')
    from tests.support.cli import run as run_cli  # it imports gateway.entry, as a CLI would

    return run_cli(["--config", str(cfg), "rules", "check"])
