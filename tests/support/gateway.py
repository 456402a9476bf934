"""Run the real gateway in-process on a free loopback port, and talk SMTP to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
from sqlmodel import Session, select

from gateway.app import Gateway
from gateway.clock import Clock
from gateway.security.dns import StaticResolver
from gateway.settings import Settings
from gateway.store.models import Ticket
from gateway.store.queries import find_ticket
from gateway.views import ticket_detail


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, clock: Clock, *, workers: bool = False
) -> AsyncIterator[Gateway]:
    """The gateway, listening. With workers=False the test drives `pipeline.run_once()`."""
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
    assert recipients and sender is not None and gw.port is not None
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
