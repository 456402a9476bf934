"""The junk folder: junk never costs a human (docs/decisions.md D18).

A message goes to the junk folder instead of the ticket queue when

- a route says ``disposition = "junk"`` (typically ``match = { spam = true }``: the verdict of
  a *trusted* front filter, :mod:`gateway.security.spam`), or
- its sender was blocked by a staff ``#junk sender`` (:data:`BlockedSender`), or
- staff said ``#junk`` on its ticket (the ticket's messages move here; :func:`junk_ticket`).

Junk opens no ticket, gets no acknowledgement, notifies nobody and starts no clock; nothing
junk-related ever sends mail to the sender (an answer to spam is backscatter). What is kept:
the raw message, its envelope and its audit trail (the route trace and the spam verdict), so
``junk show`` says why and ``junk release`` can process it *as if it had just arrived* (a
blocked customer is never silently lost). Junk older than ``junk.expire_days`` expires: the
raw bytes are dropped, the record stays. A folder that grows fast (``junk.alert_threshold``
items within ``junk.alert_window``) raises one alert to ``[alerts] admins``.

Stages here: :func:`spam_stage` (after authenticate: read the verdict, trusted or not),
:func:`released_stage` (after thread), :func:`blocked_stage` and :func:`after_route` (which
may set ``ctx.junk``), and :func:`file_junk_stage`: once ``ctx.junk`` is set, the driver ends
the message's chain and runs this instead (``stages.JUNK``), so nothing else happens.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, bindparam
from sqlalchemy import select as core_select
from sqlmodel import Session, col, func, select, update

from gateway.alerts import alert_admins
from gateway.pipeline.context import Context
from gateway.security.spam import client_is_trusted_relay, read_spam_verdict, relay_client
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.deadlines import isoz
from gateway.spool import Envelope, Spool
from gateway.store import core
from gateway.store.models import AuthRecheck, BlockedSender, Junk, Message, Outbox, Ticket

__all__ = [
    "block_sender",
    "blocked_stage",
    "expire_junk",
    "file_junk",
    "file_junk_stage",
    "is_blocked",
    "junk_summary",
    "release_junk",
    "released_stage",
    "spam_stage",
    "unblock_sender",
    "withdraw_customer_mail",
]


# ------------------------------------------------------------------------------ stages


def spam_stage(ctx: Context) -> None:
    """Read the front filter's verdict; trusted only from a ``security.trusted_relays`` host."""
    assert ctx.parsed is not None
    env = ctx.entry.envelope
    client = relay_client(env.peer, env.source)
    trusted = client_is_trusted_relay(ctx.services.settings.security.trusted_relays, client)
    ctx.spam = read_spam_verdict(ctx.parsed.headers, client_ip=client, trusted=trusted)
    if ctx.spam.present:
        ctx.event("spam-verdict", ctx.spam.describe(), ctx.spam.to_json())


def released_stage(ctx: Context) -> None:
    """Mail an admin released from the junk folder says so on its audit trail."""
    released = ctx.entry.envelope.released_from
    if released:
        ctx.event("released-from-junk", _release_detail(ctx.session, released))


def blocked_stage(ctx: Context) -> None:
    """A blocked sender's human mail goes to junk, new or reply (staff mail never)."""
    assert ctx.thread is not None
    if ctx.entry.envelope.released_from:
        return  # an admin took it out of the junk folder: it stays out
    if ctx.kind != "customer" or (ctx.verdict is not None and not ctx.verdict.is_human):
        return
    if ctx.thread.claim is not None and ctx.thread.claim.person:
        return
    row = _block_entry(ctx.session, ctx.sender)
    if row is not None:
        ctx.junk = (
            "blocked",
            "blocked sender",
            f"{ctx.sender} was blocked by {row.by or 'an admin'}"
            + (f" on {row.ticket_ref}" if row.ticket_ref else "")
            + f" ({isoz(row.blocked_at)}); undo with `customers unblock {ctx.sender}`",
        )


def after_route(ctx: Context) -> None:
    """The route said junk: file it there (unless an admin released it from there)."""
    d = ctx.decision
    if d is None or d.disposition != "junk":
        return
    if ctx.entry.envelope.released_from:
        ctx.event(
            "junk-overridden",
            f'route {d.disposition_route} says disposition = "junk", but this message was '
            "released from the junk folder: it is processed as a normal message",
        )
        return
    why = next((t.why for t in d.trace if t.route == d.disposition_route and t.matched), "")
    ctx.junk = ("route", d.disposition_route or "", f"route {d.disposition_route}: {why}")


def _release_detail(session: Session, junk_id: int) -> str:
    row = session.get(Junk, junk_id)
    if row is None:
        return f"released from the junk folder (junk {junk_id})"
    return (
        f"released from the junk folder (junk {junk_id}, junked as: {row.reason}) by "
        f"{row.released_by or 'an admin'}: {row.released_reason or 'no reason given'}"
    )


# ------------------------------------------------------------------------------ storing


def _events_json(ctx: Context, extra: list[dict[str, Any]]) -> str:
    items = [
        {"at": isoz(ctx.now), "type": t, "detail": d, "data": data} for t, d, data in ctx.events
    ]
    return json.dumps([*items, *extra], default=str)


def file_junk_stage(ctx: Context) -> None:
    """The junk chain: the message goes to the junk folder instead of the ticket queue."""
    file_junk(ctx)


def file_junk(ctx: Context) -> Junk | None:
    """Store the message in the junk folder (idempotent for a re-processed spool entry)."""
    assert ctx.parsed is not None
    assert ctx.junk is not None
    s = ctx.session
    source, rule, reason = ctx.junk
    existing = s.exec(
        select(Junk).where(Junk.dedupe_key == ctx.entry.dedupe_key, Junk.state == "junk")
    ).first()
    if existing is None and ctx.parsed.message_id:
        # The same message sent to two of our addresses is one item (docs/design.md §4).
        existing = s.exec(
            select(Junk).where(Junk.message_id == ctx.parsed.message_id, Junk.state == "junk")
        ).first()
    if existing is not None:
        ctx.events.clear()
        return None
    env = ctx.entry.envelope
    trace: list[dict[str, Any]] = []
    if ctx.decision is not None:
        trace.append(
            {
                "at": isoz(ctx.now),
                "type": "routed",
                "detail": reason,
                "data": {"trace": [t.to_json() for t in ctx.decision.trace]},
            }
        )
    trace.append(
        {
            "at": isoz(ctx.now),
            "type": "junked",
            "detail": f"kept in the junk folder: {reason}; no ticket, no acknowledgement, "
            "no notification, no clock",
            "data": {"source": source, "rule": rule},
        }
    )
    row = Junk(
        state="junk",
        source=source,
        reason=reason,
        rule=rule,
        received_at=ctx.received_at,
        junked_at=ctx.now,
        mail_from=env.mail_from,
        rcpt_tos=json.dumps(env.rcpt_tos),
        peer=env.peer,
        helo=env.helo,
        from_address=ctx.sender,
        subject=(ctx.parsed.subject or "")[:500],
        message_id=ctx.parsed.message_id,
        dedupe_key=ctx.entry.dedupe_key,
        size=len(ctx.entry.raw),
        raw=ctx.entry.raw,
        spam=json.dumps(ctx.spam.to_json() if ctx.spam is not None else {}),
        events=_events_json(ctx, trace),
    )
    s.add(row)
    s.flush()
    ctx.events.clear()
    _growth_alert(s, ctx.services.settings, ctx.services.signer, ctx.now)
    expire_junk(s, ctx.now, ctx.services.settings.junk.expire_days)
    return row


def _growth_alert(session: Session, settings: Settings, signer: Signer, now: datetime) -> None:
    """One alert when the folder grows by more than the threshold within the window."""
    cfg = settings.junk
    window = timedelta(seconds=cfg.alert_window_seconds)
    n = int(
        session.exec(
            select(func.count()).select_from(Junk).where(col(Junk.junked_at) >= now - window)
        ).one()
    )
    if n < cfg.alert_threshold:
        return
    alert_admins(
        session,
        settings,
        signer,
        f"junk folder grew by {n} messages in {cfg.alert_window}",
        f"{n} messages were filed in the junk folder within {cfg.alert_window} (threshold "
        f"{cfg.alert_threshold}, junk.alert_threshold). Nobody was paged and no "
        "acknowledgement went out for them.\n\nA spam run, or a rule sending real mail to "
        "junk? Look with `support-gateway junk list`, release with `junk release ID`.\n",
        now,
        key="junk-growth",
        window=window,
    )


def expire_junk(session: Session, now: datetime, days: int) -> int:
    """Junk older than ``days``: drop the raw bytes, keep the record. Returns how many."""
    cutoff = now - timedelta(days=days)
    ids = session.exec(
        select(Junk.id).where(Junk.state == "junk", col(Junk.junked_at) < cutoff)
    ).all()
    if not ids:
        return 0
    session.exec(
        update(Junk).where(col(Junk.id).in_(ids)).values(state="expired", raw=b"", expired_at=now)
    )
    return len(ids)


# ------------------------------------------------------------------------------ staff #junk


def junk_ticket(
    session: Session, ticket: Ticket, *, by: str, now: datetime, events: list[dict[str, Any]]
) -> int:
    """Move the ticket's inbound customer messages to the junk folder. Their Message rows
    become kind ``junk`` (so a release is not taken for a duplicate of them). Returns how
    many were moved."""
    assert ticket.id is not None
    rows = session.exec(
        select(Message)
        .where(
            Message.ticket_id == ticket.id,
            Message.direction == "in",
            Message.kind == "customer",
        )
        .order_by(col(Message.id))
    ).all()
    reason = f"#junk by {by} on {ticket.ref}"
    for m in rows:
        session.add(
            Junk(
                state="junk",
                source="staff",
                reason=reason,
                rule="#junk",
                received_at=m.at,
                junked_at=now,
                mail_from=m.mail_from,
                rcpt_tos=m.to or "[]",
                from_address=m.from_address,
                subject=(m.subject or "")[:500],
                message_id=m.message_id,
                dedupe_key=m.dedupe_key,
                size=m.size,
                raw=m.raw,
                spam=m.spam or "{}",
                events=json.dumps(events, default=str),
                ticket_id=ticket.id,
                message_row_id=m.id,
            )
        )
        m.kind = "junk"
        # The dedupe key is unique: the released copy will need it (docs/decisions.md D18).
        m.dedupe_key = f"junked:{m.dedupe_key}"
        session.add(m)
    return len(rows)


def withdraw_customer_mail(session: Session, ticket_id: int, now: datetime) -> int:
    """Cancel what is still to go out to the customer of a junk ticket: queued
    acknowledgements and notices, and acknowledgements waiting for a sender re-check."""
    rows = session.exec(
        select(Outbox).where(
            Outbox.ticket_id == ticket_id,
            Outbox.state == "queued",
            col(Outbox.kind).in_(("ack", "customer_notice", "staff_reply")),
        )
    ).all()
    for row in rows:
        row.state = "cancelled"
        row.last_error = f"withdrawn at {isoz(now)}: the ticket is junk"
        session.add(row)
    held = session.exec(
        select(AuthRecheck).where(
            AuthRecheck.ticket_id == ticket_id,
            AuthRecheck.purpose == "ack",
            AuthRecheck.state == "waiting",
        )
    ).all()
    for h in held:
        h.state = "done"
        h.outcome = "withdrawn: the ticket is junk"
        session.add(h)
    return len(rows) + len(held)


# ------------------------------------------------------------------------------ block list


def blocked(session: Session, address: str) -> BlockedSender | None:
    if not address:
        return None
    return session.exec(
        select(BlockedSender).where(BlockedSender.address == address.lower())
    ).first()


_blocked = core.table(BlockedSender)
#: What `blocked_stage` says of a block (prebuilt: every customer message asks).
_BLOCK_ENTRY = core_select(_blocked.c.by, _blocked.c.ticket_ref, _blocked.c.blocked_at).where(
    _blocked.c.address == bindparam("address")
)


def _block_entry(session: Session, address: str) -> Row[Any] | None:
    """(by, ticket_ref, blocked_at) of the block on `address`, if any: the read of every
    customer message, by Core (gateway/store/core.py); `blocked` gives the row to change."""
    if not address:
        return None
    return core.read(session, _BLOCK_ENTRY, {"address": address.lower()}).first()


def is_blocked(session: Session, address: str) -> bool:
    return _block_entry(session, address) is not None


def block_sender(
    session: Session, address: str, *, by: str, ticket_ref: str, reason: str, now: datetime
) -> bool:
    """Block ``address``; False when it already was."""
    if blocked(session, address) is not None:
        return False
    session.add(
        BlockedSender(
            address=address.lower(), blocked_at=now, by=by, ticket_ref=ticket_ref, reason=reason
        )
    )
    session.flush()
    return True


def unblock_sender(session: Session, address: str) -> bool:
    row = blocked(session, address)
    if row is None:
        return False
    session.delete(row)
    return True


# ------------------------------------------------------------------------------ release


def release_junk(
    session: Session, spool: Spool, junk_id: int, *, reason: str, by: str, now: datetime
) -> tuple[Junk | None, str]:
    """Put a junk item back in line as if it had just arrived. The spool write is durable
    before the row is marked released (a crash in between leaves it in the folder and the
    message processed once: the database dedupes a second release)."""
    row = session.get(Junk, junk_id)
    if row is None:
        return None, f"no junk item {junk_id}"
    if row.state != "junk":
        return None, f"junk item {junk_id} is {row.state}, not in the junk folder"
    envelope = Envelope(
        mail_from=row.mail_from,
        rcpt_tos=json.loads(row.rcpt_tos or "[]"),
        peer=row.peer,
        helo=row.helo,
        received_at=now.replace(microsecond=0).isoformat(),
        source="junk-release",
        released_from=junk_id,
    )
    row.state = "released"
    row.released_at = now
    row.released_by = by
    row.released_reason = reason
    events = json.loads(row.events or "[]")
    events.append(
        {
            "at": isoz(now),
            "type": "released",
            "detail": f"released by {by}: {reason}; processed as if it had just arrived",
            "data": {},
        }
    )
    row.events = json.dumps(events, default=str)
    session.add(row)
    session.flush()
    spool.submit_sync(envelope, row.raw)  # durable before the caller commits the release
    return row, "released"


def junk_summary(row: Junk) -> dict[str, Any]:
    """One item of ``junk list --json`` (docs/interface.md: at least id, from, subject,
    received_at, reason)."""
    spam = json.loads(row.spam or "{}")
    return {
        "id": row.id,
        "state": row.state,
        "from": row.from_address,
        "mail_from": row.mail_from,
        "to": json.loads(row.rcpt_tos or "[]"),
        "subject": row.subject,
        "received_at": isoz(row.received_at),
        "junked_at": isoz(row.junked_at),
        "reason": row.reason,
        "source": row.source,
        "rule": row.rule,
        "spam": spam,
        "size": row.size,
        "message_id": row.message_id,
        "released_at": isoz(row.released_at) if row.released_at else None,
        "released_reason": row.released_reason or None,
    }
