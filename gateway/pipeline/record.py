"""Record stage: write the ticket, the message (raw kept), participants, links and the
audit trail, all in the transaction that also releases nothing until it commits.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from functools import lru_cache, partial

from sqlalchemy import String, bindparam, func, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql import Executable

from gateway.pipeline.context import Context
from gateway.pipeline.subject import normalise_subject
from gateway.routing.model import SlaPolicy
from gateway.sla.business_time import BusinessCalendar
from gateway.sla.clocks import on_customer_message, on_reopen, utc
from gateway.sla.deadlines import initial_deadlines, isoz
from gateway.store import core, fresh
from gateway.store.models import Event, Message, MessageRef, Ticket
from gateway.store.queries import (
    add_event,
    add_participant,
    ensure_customer,
    link,
    mark_deliverable,
    mark_undeliverable,
    set_cursor,
)

_ticket = core.table(Ticket)
#: The ref of a ticket just inserted (it derives from the id the database assigned).
_SET_REF = update(_ticket).where(_ticket.c.id == bindparam("tid")).values(ref=bindparam("ref"))


@lru_cache(maxsize=16)
def _numbered_insert(prefix: str, offset: int, keys: tuple[str, ...]) -> Executable:
    """PostgreSQL: the ticket's INSERT that takes its id from the sequence itself and writes
    the ref made of it, ``prefix-(id + offset)``, in the same statement: one round trip where
    the INSERT and an UPDATE of the ref were two. The placeholder ref given is not written."""
    n = core_select(func.nextval(func.pg_get_serial_sequence("ticket", "id")).label("n")).subquery()
    ref = func.concat(bindparam("ref_prefix", prefix, String), "-", n.c.n + offset)
    columns = [k for k in keys if k not in ("id", "ref")]
    row = [bindparam(k, type_=_ticket.c[k].type) for k in columns]
    values = core_select(n.c.n, ref, *row)
    return insert(_ticket).from_select(["id", "ref", *columns], values).returning(_ticket.c.id)


def _recipients(ctx: Context) -> list[str]:
    assert ctx.parsed is not None
    out: list[str] = []
    for raw in [*ctx.parsed.to, *ctx.parsed.cc, *ctx.entry.envelope.rcpt_tos]:
        a = raw.lower()
        if a and a not in out:
            out.append(a)
    return out


def _is_ours(ctx: Context, address: str) -> bool:
    domain = address.rpartition("@")[2].lower()
    settings = ctx.services.settings
    return domain in settings.smtp.domains or address == settings.outbound.from_address.lower()


def _audience(ctx: Context) -> list[str]:
    """Who else may reply into the ticket: the To/Cc people, but not our own addresses and
    not for list mail (the list address would otherwise be a participant of every ticket
    and let anything sent through the list join it)."""
    if ctx.verdict is not None and ctx.verdict.kind in ("list", "bulk"):
        return []
    return [a for a in _recipients(ctx) if not _is_ours(ctx, a)]


def _create_ticket(ctx: Context) -> Ticket:
    assert ctx.parsed is not None
    assert ctx.decision is not None
    s = ctx.session
    d = ctx.decision
    settings = ctx.services.settings
    rules = ctx.services.rules
    policy = rules.sla[d.sla]
    calendar = rules.calendar_for_policy(d.sla)
    deadlines = initial_deadlines(policy, calendar, ctx.received_at)
    customer_id = ensure_customer(s, ctx.sender, ctx.parsed.from_name, ctx.now)
    subject = ctx.parsed.subject or "(no subject)"
    placeholder = f"new-{uuid.uuid4().hex}"
    offset = settings.tickets.first_number - 1
    numbered = s.get_bind().dialect.name == "postgresql"
    # Written by Core and attached as the persistent instance later stages change
    # (gateway/store/core.py): the unit of work's INSERT and UPDATE cost several times more.
    ticket = core.insert_new(
        s,
        Ticket,
        partial(_numbered_insert, settings.tickets.ref_prefix, offset) if numbered else None,
        ref=placeholder,
        status="open",
        subject=subject,
        # Known before the INSERT: written with it, not by an UPDATE after.
        normalized_subject=normalise_subject(subject)[:500],
        requester=ctx.sender,
        customer_id=customer_id,
        owner=d.owner.id,
        queue=d.queue,
        priority=d.priority,
        tags=json.dumps(list(d.tags)),
        sla=d.sla,
        route=d.route,
        created_at=ctx.received_at,
        updated_at=ctx.now,
        first_response_due=deadlines.first_response,
        next_response_due=deadlines.next_response,
        resolution_due=deadlines.resolution,
        last_customer_at=ctx.received_at,
    )
    assert ticket.id is not None
    fresh.ticket_created(s, customer_id, ticket.id)
    # Human-readable, unique and increasing, never secret (security rests on signed tokens
    # only). Not gapless: a rolled-back transaction burns its sequence number (docs/decisions.md
    # D13).
    ref = f"{settings.tickets.ref_prefix}-{ticket.id + offset}"
    if not numbered:
        core.write(s, _SET_REF, {"tid": ticket.id, "ref": ref})
    # What the row now holds, with no change pending: the placeholder is in no other row.
    set_committed_value(ticket, "ref", ref)
    assert placeholder != ticket.ref
    add_participant(s, ticket.id, ctx.sender, "requester", ctx.now)
    # The requester's own To/Cc become participants: how a customer brings a colleague in.
    # Not on the strength of an unverified From (docs/decisions.md D10): anyone can write those
    # headers.
    for a in _audience(ctx) if ctx.sender_verified else []:
        if a != ctx.sender:
            add_participant(s, ticket.id, a, "cc", ctx.now)
    if d.assigned_by == "round-robin" and d.route:
        set_cursor(s, d.route, d.owner.id, ctx.now)
    assert ctx.thread is not None
    ctx.event("created", f"new ticket {ticket.ref}: {ctx.thread.detail}")
    ctx.event(
        "routed",
        f"route {d.route or '(defaults)'}: queue {d.queue}, owner {d.owner.name} "
        f"({d.assigned_by}), sla {d.sla}, priority {d.priority}",
        {"trace": [t.__dict__ for t in d.trace], "notify": list(d.notify), "tags": list(d.tags)},
    )
    ctx.event(
        "deadlines",
        f"first response due {isoz(deadlines.first_response)}, resolution due "
        f"{isoz(deadlines.resolution)} ({calendar.describe_hours()})",
        deadlines.to_json(),
    )
    for other, relation, why in ctx.thread.links:
        if link(s, ticket.id, other, relation, ctx.now):
            other_t = s.get(Ticket, other)
            ref = other_t.ref if other_t else str(other)
            ctx.event("linked", f"{relation} of {ref}: {why}")
            add_event(
                s,
                other,
                "follow-up-linked",
                f"{ticket.ref} from {ctx.sender} may be a follow-up ({why}); owner please check",
                ctx.now,
            )
    return ticket


def record_duplicate(ctx: Context) -> None:
    """A message stored before: one event on its ticket, nothing else (docs/design.md §4)."""
    assert ctx.thread is not None
    th = ctx.thread
    tid = th.ticket.id if th.ticket else None
    add_event(
        ctx.session, tid, "duplicate", f"{th.detail}; spool entry {ctx.entry.id} ignored", ctx.now
    )


def record(ctx: Context) -> None:
    assert ctx.parsed is not None
    assert ctx.thread is not None
    th = ctx.thread

    ticket: Ticket | None = None
    if th.ticket is not None:
        ticket = ctx.session.get(Ticket, th.ticket.id)
    elif ctx.decision is not None:
        ticket = _create_ticket(ctx)
    ctx.ticket = ticket

    if ticket is not None and ctx.decision is None:
        _threaded(ctx, ticket)
    elif ticket is None:
        ctx.event("unthreaded", f"{th.disposition}: {th.detail}")
    _record_bounce(ctx, ticket)
    msg = _store_message(ctx, ticket)
    ctx.message = msg
    _store_events(ctx, ticket.id if ticket else None, msg)


def _threaded(ctx: Context, ticket: Ticket) -> None:
    """Mail joining an existing ticket: reopen, participants and clocks."""
    assert ctx.thread is not None
    assert ticket.id is not None
    th = ctx.thread
    ctx.event("threaded", f"{th.disposition}: {th.detail}")
    staff_token = th.claim is not None and bool(th.claim.person)
    rules = ctx.services.rules
    policy = rules.sla.get(ticket.sla)
    calendar = rules.calendar_for_policy(ticket.sla) if policy is not None else None
    if th.reopen and ctx.kind == "customer" and not staff_token:
        if calendar is not None:
            # Resolution resumes, moved by the business time it was closed (clocks.py).
            on_reopen(ticket, ctx.received_at, calendar)
        ticket.status = "open"
        ticket.closed_at = None
        ctx.event("reopened", f"{ticket.ref} reopened by {ctx.sender}")
    if ctx.kind == "customer":
        if th.claim is not None and th.claim.person:
            ctx.kind = "note"
            ctx.event("staff-token", f"staff reply token of {th.claim.person} used by {ctx.sender}")
        else:
            _customer_wrote(ctx, ticket, policy, calendar)
    ticket.updated_at = ctx.now
    ctx.session.add(ticket)


def _customer_wrote(
    ctx: Context, ticket: Ticket, policy: SlaPolicy | None, calendar: BusinessCalendar | None
) -> None:
    """Customer mail on an existing ticket: participants, then the clocks it moves."""
    assert ticket.id is not None
    s = ctx.session
    # thread.decide let customer mail in only from a verified participant (or the
    # same customer under another address, who is added here); the guard keeps
    # an unverified From from adding anybody whatever the key (docs/decisions.md D10).
    if ctx.sender_verified:
        add_participant(s, ticket.id, ctx.sender, "cc", ctx.now)
        if mark_deliverable(s, ctx.sender):
            ctx.event("deliverable", f"{ctx.sender} wrote again: no longer undeliverable")
        for a in _audience(ctx):
            add_participant(s, ticket.id, a, "cc", ctx.now)
    was_waiting = ticket.status == "waiting"
    armed = ticket.next_response_due
    if policy is not None and calendar is not None:
        # docs/design.md §7: resumes a waiting ticket (deadlines moved by the business
        # time spent waiting) and re-arms next response after a human reply,
        # counted from the oldest unanswered message. Only human customer mail
        # gets here: out-of-office replies have kind auto_reply.
        on_customer_message(ticket, ctx.received_at, policy, calendar)
    else:  # the ticket's SLA policy is gone from the rules: no clocks to run
        ticket.last_customer_at = ctx.received_at
        if was_waiting:
            ticket.status = "open"
            ticket.waiting_since = None
    if was_waiting:
        ctx.event(
            "resumed",
            "the customer wrote: clocks run again (first response due "
            f"{isoz(utc(ticket.first_response_due))}, resolution due "
            f"{isoz(utc(ticket.resolution_due))})",
        )
    if ticket.next_response_due is not None and ticket.next_response_due != armed:
        ctx.event(
            "deadlines",
            f"next response due {isoz(utc(ticket.next_response_due))}"
            + (f" ({calendar.describe_hours()})" if calendar is not None else ""),
            {"next_response": isoz(utc(ticket.next_response_due))},
        )


def _record_bounce(ctx: Context, ticket: Ticket | None) -> None:
    """A bounce on a ticket: its failed addresses (when permanent) and one bounce event."""
    if ctx.bounce is None or ticket is None:
        return
    failed = ", ".join(ctx.bounce.failed_recipients) or "unknown address"
    if ctx.bounce.permanent:
        for address in ctx.bounce.failed_recipients:
            mark_undeliverable(
                ctx.session,
                address,
                f"{ctx.bounce.status or ''} {ctx.bounce.diagnostic or ''}",
                ctx.now,
            )
            ctx.event("undeliverable", f"{address} marked undeliverable")
    ctx.event(
        "bounce",
        f"delivery to {failed} failed ({ctx.bounce.status or '?'}"
        f"{', permanent' if ctx.bounce.permanent else ''}): {ctx.bounce.diagnostic or ''}",
        {"failed": list(ctx.bounce.failed_recipients), "status": ctx.bounce.status},
    )


def _store_message(ctx: Context, ticket: Ticket | None) -> Message:
    """The inbound message row and its references, flushed so it has an id."""
    assert ctx.parsed is not None
    s = ctx.session
    p = ctx.parsed
    robot = ""
    if ctx.verdict is not None and not ctx.verdict.is_human:
        robot = f"{ctx.verdict.kind}: " + "; ".join(ctx.verdict.reasons)
    # The persistent instance later stages change (a staff reply's kind), written by Core.
    msg = core.insert_new(
        s,
        Message,
        ticket_id=ticket.id if ticket else None,
        direction="in",
        kind=ctx.kind,
        message_id=p.message_id,
        dedupe_key=ctx.entry.dedupe_key,
        raw_sha256=hashlib.sha256(ctx.entry.raw).hexdigest(),
        mail_from=ctx.entry.envelope.mail_from,
        from_address=p.from_address,
        to=json.dumps(_recipients(ctx)),
        subject=p.subject,
        at=ctx.received_at,
        size=len(ctx.entry.raw),
        raw=p.raw,
        text=p.text,
        in_reply_to=p.in_reply_to[0] if p.in_reply_to else None,
        references=" ".join(p.references),
        robot=robot,
        auth=json.dumps(ctx.auth.to_json() if ctx.auth else {}),
        sender_unverified=not ctx.sender_verified,
        not_kept=json.dumps(p.not_kept),
        spool_id=ctx.entry.id,
        spam=json.dumps(ctx.spam.to_json() if ctx.spam is not None and ctx.spam.present else {}),
    )
    assert msg.id is not None
    core.insert_many(
        s, MessageRef, [{"message_id": msg.id, "ref": r[:900]} for r in p.referenced_ids[:50]]
    )
    return msg


def _store_events(ctx: Context, tid: int | None, msg: Message) -> None:
    """The audit trail gathered for this message, written in one statement."""
    if ctx.events:
        # One executemany for the message's audit trail (a new ticket writes four or more
        # events), without building an ORM object per row (docs/decisions.md D16;
        # docs/performance.md).
        core.insert_many(
            ctx.session,
            Event,
            [
                {
                    "ticket_id": tid,
                    "message_id": msg.id,
                    "at": ctx.now,
                    "type": type_,
                    "detail": detail,
                    "data": json.dumps(data if data is not None else {}, default=str),
                }
                for type_, detail, data in ctx.events
            ],
        )
    ctx.events.clear()
