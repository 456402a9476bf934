"""Alerts to the admins (`[alerts] admins`): infrastructure trouble and quarantined mail.

An alert is an ordinary outbox row (kind `alert`, no ticket), so it is DKIM-signed, retried
and survives a restart like any other mail. When the database itself is what is broken the
row cannot be written; `send_alert` then hands the message straight to the relay (one SMTP
attempt, short timeout) and, failing that too, leaves it to the log at ERROR. The pipeline's
database-outage alert is queued when the database is back ("unreachable from T1 to T2, N
messages waited"), so it is not lost to the outage it reports.

With no admins configured the default owner of the rules is told instead: someone must be.
"""

from __future__ import annotations

import json
import logging
import smtplib
from collections.abc import Sequence
from datetime import datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.letters import templates as letters
from gateway.letters.notification import compose_notification
from gateway.outbound.worker import enqueue
from gateway.routing.model import Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.store.db import session_scope
from gateway.store.models import Event
from gateway.store.queries import add_event

log = logging.getLogger("gateway.alerts")

KIND = "alert"


def recipients(settings: Settings, rules: Rules | None, *, owner: bool = False) -> list[str]:
    """The admins; plus the default owner when `owner` (or when no admin is configured)."""
    out = [a.strip() for a in settings.alerts.admins if a.strip()]
    if (owner or not out) and rules is not None:
        person = rules.people.get(rules.defaults.owner)
        if (
            person is not None
            and person.email
            and person.email.lower() not in {a.lower() for a in out}
        ):
            out.append(person.email)
    return out


def compose_alert(
    settings: Settings,
    signer: Signer,
    *,
    to: Sequence[str],
    subject: str,
    body: str,
    now: datetime,
    attachment: tuple[str, bytes] | None = None,
) -> tuple[bytes, str]:
    """The alert's bytes (unsigned) and Message-ID; `attachment` is (filename, bytes)."""
    # The words: alert.en.txt (the details in a frame an admin may change) and the
    # subject phrase of staff.en.txt (docs/templates.md).
    letter = letters.load("alert", "en", settings.templates_path)
    text = letters.render(letter, {"details": body, "subject": subject}, verbatim=("details",))
    raw, message_id = compose_notification(
        to_address=", ".join(to),
        to_name="",
        subject=letters.load("staff", "en", settings.templates_path).phrase(
            "alert_subject", subject=subject
        ),
        body=text,
        from_address=settings.outbound.from_address,
        from_name=settings.outbound.from_name,
        signer=signer,
        hostname=settings.smtp.hostname,
        now=now,
        ticket_id=None,
    )
    if attachment is not None:
        msg = message_from_bytes(raw, _class=EmailMessage, policy=SMTP)
        assert isinstance(msg, EmailMessage)
        name, data = attachment
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
        raw = msg.as_bytes(policy=SMTP)
    return raw, message_id


def queue_alert(
    session: object,
    settings: Settings,
    signer: Signer,
    *,
    to: Sequence[str],
    subject: str,
    body: str,
    now: datetime,
    attachment: tuple[str, bytes] | None = None,
) -> None:
    """Write the alert as an outbox row in `session` (the caller's transaction)."""
    raw, message_id = compose_alert(
        settings, signer, to=to, subject=subject, body=body, now=now, attachment=attachment
    )
    enqueue(
        session,  # type: ignore[arg-type]
        ticket_id=None,
        kind=KIND,
        raw=raw,
        message_id=message_id,
        rcpt_tos=list(to),
        now=now,
        from_address=settings.outbound.from_address,
        subject=subject,
        text=body,
    )


def send_alert(
    engine: Engine,
    settings: Settings,
    signer: Signer,
    *,
    to: Sequence[str],
    subject: str,
    body: str,
    now: datetime,
    attachment: tuple[str, bytes] | None = None,
) -> str:
    """Queue the alert; if the database refuses, send it directly. Returns how it went:
    "queued", "sent" (directly to the relay) or "logged" (both failed). Never raises."""
    log.error("ALERT %s: %s", subject, body.replace("\n", " | "))
    if not to:
        return "logged"
    try:
        with session_scope(engine) as session:
            queue_alert(
                session,
                settings,
                signer,
                to=to,
                subject=subject,
                body=body,
                now=now,
                attachment=attachment,
            )
        return "queued"
    except Exception as exc:
        log.error("alert could not be queued (%r); sending it directly to the relay", exc)
    relay = settings.relay
    if relay is None:
        return "logged"
    try:
        raw, _ = compose_alert(
            settings, signer, to=to, subject=subject, body=body, now=now, attachment=attachment
        )
        with smtplib.SMTP(relay[0], relay[1], timeout=10) as smtp:
            smtp.sendmail(settings.outbound.from_address, list(to), raw)
        return "sent"
    except Exception as exc:
        log.error("alert could not be sent to the relay either (%r); it is only in this log", exc)
        return "logged"


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
    signer: Signer,
    subject: str,
    body: str,
    now: datetime,
    key: str,
    window: timedelta = DEFAULT_WINDOW,
) -> int:
    """Queue one alert to `[alerts] admins` in the caller's transaction, unless an alert with
    `key` went out within `window` (a flood raises one alert, not one per message). An
    `alert` event records it either way, with the key. Returns how many were queued."""
    if _recently_alerted(session, key, now - window):
        return 0
    admins = [a.strip() for a in settings.alerts.admins if a.strip()]
    if admins:
        queue_alert(session, settings, signer, to=admins, subject=subject, body=body, now=now)
    add_event(
        session,
        None,
        "alert",
        f"{subject} (to {', '.join(admins) or 'nobody: [alerts] admins is empty'})",
        now,
        data={"key": key, "admins": admins},
    )
    return 1 if admins else 0
