"""Read models: the JSON shapes of docs/interface.md (`tickets list/show --json`, `sla
upcoming`)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from gateway.pipeline.conversation import merged_sources
from gateway.routing.model import Rules
from gateway.sla.business_time import BusinessCalendar, format_duration
from gateway.sla.clocks import utc
from gateway.sla.deadlines import isoz
from gateway.sla.durations import Duration
from gateway.store.models import (
    Customer,
    CustomerAddress,
    CustomerMerge,
    Event,
    Message,
    Participant,
    Ticket,
    TicketLink,
)
from gateway.store.promises import promises_json
from gateway.store.queries import customer_of, undeliverable


def owner_json(rules: Rules | None, person_id: str) -> dict[str, str]:
    person = rules.people.get(person_id) if rules is not None else None
    if person is None:
        return {"id": person_id, "name": person_id, "email": ""}
    return {"id": person.id, "name": person.name, "email": person.email}


def deadlines_json(t: Ticket) -> dict[str, str | None]:
    return {
        "first_response": isoz(t.first_response_due) if t.first_responded_at is None else None,
        "next_response": isoz(t.next_response_due),
        "resolution": isoz(t.resolution_due) if t.status != "closed" else None,
    }


def ticket_summary(t: Ticket, rules: Rules | None) -> dict[str, Any]:
    return {
        "ref": t.ref,
        "status": t.status,
        "subject": t.subject,
        "requester": t.requester,
        "owner": owner_json(rules, t.owner),
        "queue": t.queue,
        "priority": t.priority,
        "tags": json.loads(t.tags),
        "created_at": isoz(t.created_at),
        "updated_at": isoz(t.updated_at),
        "deadlines": deadlines_json(t),
    }


def ticket_detail(s: Session, t: Ticket, rules: Rules | None) -> dict[str, Any]:
    out = ticket_summary(t, rules)
    out["sla"] = t.sla
    out["route"] = t.route
    out["participants"] = [
        p.address
        for p in s.exec(
            select(Participant).where(Participant.ticket_id == t.id).order_by(col(Participant.id))
        ).all()
    ]
    out["undeliverable"] = undeliverable(s, out["participants"])
    # docs/decisions.md D12: a ticket merged into this one shows its messages here ("merged_from").
    merged = dict(merged_sources(s, t.id)) if t.id is not None else {}
    out["messages"] = [
        {
            "merged_from": merged.get(m.ticket_id or 0) if m.ticket_id != t.id else None,
            "id": m.id,
            "message_id": m.message_id,
            "direction": m.direction,
            "kind": m.kind,
            "from": m.from_address or m.mail_from,
            "to": json.loads(m.to),
            "subject": m.subject,
            "at": isoz(m.at),
            "size": m.size,
            "robot": m.robot or None,
            "not_kept": json.loads(m.not_kept),
            "auth": json.loads(m.auth),
            "sender_unverified": m.sender_unverified,
            # The front filter's verdict and whether it was trusted (docs/decisions.md D18); {} =
            # none.
            "spam": json.loads(m.spam or "{}"),
        }
        for m in s.exec(
            select(Message)
            .where(col(Message.ticket_id).in_([t.id, *merged]))
            .order_by(col(Message.at), col(Message.id))
        ).all()
    ]
    out["events"] = [
        {"at": isoz(e.at), "type": e.type, "detail": e.detail}
        for e in s.exec(select(Event).where(Event.ticket_id == t.id).order_by(col(Event.id))).all()
    ]
    links = []
    for lk in s.exec(select(TicketLink).where(TicketLink.ticket_id == t.id)).all():
        other = s.get(Ticket, lk.other_id)
        links.append({"ref": other.ref if other else str(lk.other_id), "relation": lk.relation})
    for lk in s.exec(select(TicketLink).where(TicketLink.other_id == t.id)).all():
        other = s.get(Ticket, lk.ticket_id)
        links.append(
            {"ref": other.ref if other else str(lk.ticket_id), "relation": f"{lk.relation} (from)"}
        )
    out["links"] = links
    out["promises"] = promises_json(s, t.id)
    return out


def customer_tickets(s: Session, address: str) -> list[Ticket] | None:
    """All tickets of the customer of ``address``, whatever address they wrote from (merged
    customers included), newest first; None when the address is unknown (docs/decisions.md D12)."""
    from gateway.pipeline.conversation import customer_ids

    cust = customer_of(s, address)
    if cust is None:
        return None
    ids = customer_ids(s, cust)
    return list(
        s.exec(
            select(Ticket)
            .where(col(Ticket.customer_id).in_(ids))
            .order_by(col(Ticket.created_at).desc(), col(Ticket.id).desc())
        ).all()
    )


def customer_detail(s: Session, address: str, rules: Rules | None) -> dict[str, Any] | None:
    """``customers show ADDRESS --json``: addresses, tickets, merges (docs/decisions.md D12)."""
    from gateway.pipeline.conversation import customer_ids

    cust = customer_of(s, address)
    if cust is None:
        return None
    ids = customer_ids(s, cust)
    c = s.get(Customer, cust)
    addresses = s.exec(
        select(CustomerAddress)
        .where(col(CustomerAddress.customer_id).in_(ids))
        .order_by(col(CustomerAddress.id))
    ).all()
    merges = s.exec(
        select(CustomerMerge)
        .where(col(CustomerMerge.target_id).in_(ids) | col(CustomerMerge.source_id).in_(ids))
        .order_by(col(CustomerMerge.id))
    ).all()
    tickets = customer_tickets(s, address) or []
    return {
        "id": cust,
        "name": c.name if c is not None else "",
        "created_at": isoz(c.created_at) if c is not None else None,
        "addresses": [
            {
                "address": a.address,
                "since": isoz(a.created_at),
                "undeliverable": a.undeliverable_since is not None,
                "undeliverable_reason": a.undeliverable_reason or None,
            }
            for a in addresses
        ],
        "open_tickets": sum(1 for t in tickets if t.status != "closed"),
        "tickets": [ticket_summary(t, rules) for t in tickets],
        "merges": [
            {
                "source": m.source_id,
                "target": m.target_id,
                "addresses": json.loads(m.addresses),
                "tickets": json.loads(m.tickets),
                "at": isoz(m.at),
                "by": m.by,
            }
            for m in merges
        ],
    }


def upcoming(
    s: Session, rules: Rules | None, now: datetime, within: timedelta | Duration
) -> list[dict[str, Any]]:
    """Deadlines due before now + within (including those already missed), soonest first.

    `within` is a `Duration` read with the rules' grammar (``gateway.sla.durations``): business
    time in each ticket's SLA calendar, so ``--within 1d`` is "by the end of one working day"
    for every ticket. A plain timedelta is clock time.

    A paused clock is marked, not listed as due (docs/decisions.md D11, item 9): ``paused`` true,
    ``state`` "paused", ``paused_reason`` "waiting on customer" (the deadline moves by the business
    time spent waiting; ``remaining`` is the budget left at the pause) or "snoozed until ..."
    (no escalation before then; the deadline itself stands). ``state`` is otherwise "due" or
    "missed" (``overdue``); a clock missed before the ticket went waiting stays missed.
    """
    rows: list[dict[str, Any]] = []
    for t in s.exec(select(Ticket).where(Ticket.status != "closed")).all():
        calendar: BusinessCalendar | None = None
        if rules is not None and t.sla in rules.sla:
            calendar = rules.calendar_for_policy(t.sla)
        horizon = within.after(now, calendar) if isinstance(within, Duration) else now + within
        clocks = {
            "first_response": t.first_response_due if t.first_responded_at is None else None,
            "next_response": t.next_response_due,
            "resolution": t.resolution_due,
        }
        waiting_since = utc(t.waiting_since) if t.status == "waiting" else None
        snoozed_until = utc(t.snoozed_until)
        if snoozed_until is not None and snoozed_until <= now:
            snoozed_until = None
        for clock, stored in clocks.items():
            due = utc(stored)
            if due is None or due > horizon:
                continue
            paused, reason, remaining = False, None, None
            overdue = due <= now
            if t.status == "waiting":
                # Paused on the customer (gateway.sla.clocks): only a clock missed before
                # the pause is missed; the others resume with what was left.
                paused_at = waiting_since or now
                overdue = due <= paused_at
                paused = not overdue
                reason = "waiting on customer"
                if paused and calendar is not None:
                    remaining = format_duration(calendar.elapsed(paused_at, due))
            elif snoozed_until is not None:
                paused, reason = True, f"snoozed until {isoz(snoozed_until)}"
            rows.append(
                {
                    "ref": t.ref,
                    "clock": clock,
                    "due": isoz(due),
                    "overdue": overdue,
                    "state": "paused" if paused else ("missed" if overdue else "due"),
                    "paused": paused,
                    "paused_reason": reason if paused else None,
                    "paused_since": isoz(waiting_since) if paused and waiting_since else None,
                    "remaining": remaining,
                    "owner": owner_json(rules, t.owner),
                    "subject": t.subject,
                    "priority": t.priority,
                }
            )
    rows.sort(key=lambda r: (r["owner"]["id"], r["due"]))
    return rows
