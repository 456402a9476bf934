"""Alerts to the operators (``[alerts] admins``): one mail per admin, at most once per key
and window.

Kept deliberately small (issue 18 needs one alert: "the junk folder grows fast"); another
part of the gateway may grow a richer alerting module, and this one is meant to fold into
it. An alert is written to the transactional outbox in the caller's transaction (FIELD-NOTES
§6), as automatic mail with the null sender (RFC 3834 §3.3, ``Auto-Submitted:
auto-generated``), and leaves an ``alert`` event whose data carries the key: the same key
inside the window is not sent again, so a flood raises one alert, not one per message.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

from sqlmodel import Session, col, select

from gateway.outbound.compose import _base_headers
from gateway.outbound.worker import enqueue
from gateway.settings import Settings
from gateway.store.models import Event
from gateway.store.queries import add_event

__all__ = ["alert_admins"]

#: Default: the same alert key is not raised twice within this window.
DEFAULT_WINDOW = timedelta(hours=1)


def _recently_alerted(session: Session, key: str, since: datetime) -> bool:
    rows = session.exec(
        select(Event.data).where(Event.type == "alert", col(Event.at) >= since)
    ).all()
    for data in rows:
        try:
            if json.loads(data or "{}").get("key") == key:
                return True
        except ValueError:
            continue
    return False


def alert_admins(
    session: Session,
    settings: Settings,
    subject: str,
    body: str,
    now: datetime,
    key: str,
    window: timedelta = DEFAULT_WINDOW,
) -> int:
    """Queue ``subject``/``body`` to every ``[alerts] admins`` address unless an alert with
    ``key`` went out within ``window``; returns how many mails were queued (0 when deduped
    or nobody is configured: the event is still written so ``tickets``-less audits see it)."""
    if _recently_alerted(session, key, now - window):
        return 0
    admins = [a.strip() for a in settings.alerts.admins if a.strip()]
    out = settings.outbound
    queued = 0
    for admin in admins:
        mid = make_msgid(idstring="alert", domain=settings.smtp.hostname)
        msg = EmailMessage(policy=SMTP)
        _base_headers(
            msg,
            from_address=out.from_address,
            from_name=out.from_name,
            to=admin,
            subject=f"[support-gateway alert] {subject}",
            message_id=mid,
            now=now,
            hostname=settings.smtp.hostname,
            auto_submitted="auto-generated",
        )
        msg.set_content(body.rstrip("\n") + "\n")
        enqueue(
            session,
            ticket_id=None,
            kind="alert",
            raw=msg.as_bytes(policy=SMTP),
            message_id=mid,
            rcpt_tos=[admin],
            now=now,
            mail_from="",
            from_address=out.from_address,
            subject=str(msg["Subject"]),
            text=body,
        )
        queued += 1
    add_event(
        session,
        None,
        "alert",
        f"{subject} (to {', '.join(admins) or 'nobody: [alerts] admins is empty'})",
        now,
        data={"key": key, "admins": admins},
    )
    return queued
