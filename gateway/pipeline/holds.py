"""Scheduling a re-check of a sender whose check could not complete (docs/decisions.md D10).

``respond`` (a deferred acknowledgement) and ``staff`` (a held staff reply) call
:func:`hold` in the pipeline's transaction; :mod:`gateway.pipeline.recheck` picks the rows
up.  Kept apart from the worker so the stages do not import it (the worker imports them).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from gateway.pipeline.context import Context
from gateway.security.relay import effective_client_of
from gateway.store.models import AuthRecheck

__all__ = ["FIRST_RECHECK", "MAX_RECHECK_INTERVAL", "hold", "next_check"]

#: First re-check this long after the message (a DNS blip is usually over by then).
FIRST_RECHECK = timedelta(minutes=1)
#: Backoff doubles up to this interval (RFC 5321 §4.5.4.1 retry spirit: not too eager).
MAX_RECHECK_INTERVAL = timedelta(minutes=10)


def next_check(now: datetime, attempts: int, deadline: datetime) -> datetime:
    """When to look again after ``attempts`` re-checks: 1, 2, 4, 8, 10, 10 … minutes,
    never after the deadline (the deadline itself is the last look)."""
    step = min(FIRST_RECHECK * (1 << max(0, attempts)), MAX_RECHECK_INTERVAL)
    return min(now + step, deadline)


def hold(ctx: Context, purpose: str, data: dict[str, Any] | None = None) -> AuthRecheck:
    """Record that ``purpose`` (``ack`` or ``staff``) waits for this message's sender check."""
    assert ctx.message is not None
    assert ctx.message.id is not None
    window = timedelta(seconds=ctx.services.settings.security.recheck_window)
    # The client the sender is judged by: behind a trusted front MTA, the one it saw, and
    # only then its Authentication-Results (security/relay.py), exactly as the first check.
    client = effective_client_of(ctx.entry.raw, ctx.entry.envelope, ctx.services.settings)
    row = AuthRecheck(
        message_id=ctx.message.id,
        ticket_id=ctx.ticket.id if ctx.ticket is not None else None,
        purpose=purpose,
        client_ip=client.client_ip or "",
        helo=client.helo or "",
        created_at=ctx.now,
        deadline=ctx.now + window,
        next_check_at=next_check(ctx.now, 0, ctx.now + window),
        data=json.dumps(
            {**(data or {}), "trusted_authserv_ids": list(client.trusted_authserv_ids)}
        ),
    )
    _add(ctx.session, row)
    return row


def _add(session: Session, row: AuthRecheck) -> None:
    session.add(row)
    session.flush()
