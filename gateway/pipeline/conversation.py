"""One customer, one conversation (docs/decisions.md D12): a known customer writing again, bundled
acknowledgements and owner notifications, merges that redirect, and customer merges that
surface duplicate tickets.

Anxious customers do not reply, they write again ("Refund???"). Without this module every
such mail opened a ticket, got its own acknowledgement and paged its owner (8 mails in one
night: 8 tickets, 5 acks, 8 notifications), and the customer was never told what was
already open. The decisions here, each written to the audit trail (docs/threading.md
"Known customer writing again"):

- :func:`match_known_customer` (pure): a NEW mail (threading found no ticket) from a
  verified sender whose customer has open tickets joins the open ticket with the same
  normalised subject, or the one the mail names (``ACME-1042`` anywhere in the subject or
  text, only among the customer's own tickets), when the policy is ``same-subject``
  (``tickets.known_customer``, a route's ``known_customer`` overrides it); otherwise the
  mail opens a new ticket linked ``same-customer`` to the others, and its acknowledgement
  lists them with their owners and deadlines;
- bundling (:func:`bundle_ack`, :func:`bundle_notification`): the first new mail is
  acknowledged and notified at once; further new mails within ``outbound.ack_window`` after
  the last acknowledgement (notification) wait in ``bundle_item`` until the window closes,
  when the bundle worker (``gateway.pipeline.bundle``) sends ONE message listing each mail
  and where it went (peer anchor: osTicket's over-limit notice). The acknowledgement that
  reaches ``outbound.daily_ack_cap`` says so: further mails are filed without confirmation,
  and where they go;
- every deadline and person stated comes from the stored ticket (never recomputed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import bindparam
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from gateway.letters import facts, requests
from gateway.letters import templates as letters
from gateway.letters.facts import isoz, owner_or_default
from gateway.letters.templates import Letter
from gateway.pipeline.context import Context
from gateway.pipeline.subject import format_ref, normalise_subject
from gateway.pipeline.thread import Disposition, ThreadDecision, TicketView
from gateway.routing.model import Person, Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.durations import parse as parse_duration
from gateway.store import core, fresh
from gateway.store.models import BundleItem, Customer, Outbox, Ticket, TicketLink
from gateway.store.queries import (
    add_event,
    customer_memo,
    customer_of,
    link,
    resolve_customer,
)

__all__ = [
    "Candidate",
    "announce_customer_merge",
    "bundle_ack",
    "bundle_notification",
    "cap_notice",
    "customer_ids",
    "deadline_phrase",
    "known_customer_stage",
    "match_known_customer",
    "open_requests",
    "request_line",
]

#: Outbox kinds that count as an acknowledgement to the customer (the bundled one too).
ACK_KIND = "ack"


# ------------------------------------------------------------------------- pure decision


@dataclass(frozen=True)
class Candidate:
    """One open ticket of the customer, as the policy sees it."""

    id: int
    ref: str
    normalized_subject: str


def match_known_customer(
    subject: str, text: str, candidates: Sequence[Candidate], ref_prefix: str
) -> tuple[Candidate, str] | None:
    """The customer's open ticket this new mail continues, and why (pure), or None.

    An explicit reference to one of the customer's own tickets (subject first, then the
    first lines of the text: "about ACME-1003 again") wins; then the same normalised
    subject (prefixes, tags and refs removed, casefolded: ``normalise_subject``), the
    newest such ticket first. An empty subject matches nothing (every "(no subject)" mail
    is not one conversation).
    """
    by_ref = {c.ref.upper(): c for c in candidates}
    head = "\n".join(text.splitlines()[:20])
    for where, source in (("subject", subject), ("text", head)):
        for ref in _bare_refs(source, ref_prefix):
            hit = by_ref.get(ref.upper())
            if hit is not None:
                return hit, f"its {where} names {hit.ref}, an open request of this customer"
    norm = _loose(normalise_subject(subject, ref_prefix))
    if not norm:
        return None
    for c in sorted(candidates, key=lambda c: -c.id):
        if _loose(c.normalized_subject) == norm:
            return c, f'same subject as the open request {c.ref} ("{norm}")'
    return None


def _bare_refs(text: str, prefix: str) -> list[str]:
    """``ACME-1042`` with or without brackets: customers write "about ACME-1042 again".
    Safe without the brackets here because only the customer's OWN tickets are matched."""
    out: list[str] = []
    pattern = re.compile(r"(?<![\w-])" + re.escape(prefix) + r"-([0-9]{1,18})(?![\w-])", re.I)
    for m in pattern.finditer(text or ""):
        ref = format_ref(prefix, int(m.group(1)))
        if ref not in out:
            out.append(ref)
    return out


def _loose(normalised: str) -> str:
    """Punctuation and spacing do not make a new subject: "My refund is still missing!!"
    is the same request as "my refund is still missing" (anxious customers add "!" and
    "???")."""
    return re.sub(r"[\W_]+", " ", normalised).strip()


# ------------------------------------------------------------------------------- queries


# Prebuilt Core reads (gateway.store.core: a Core statement built once costs a fifth of an
# ORM query; these run several times per new ticket). Each returns plain values: nothing
# read here is changed through the ORM.
_CUSTOMER = core.table(Customer)
_TICKET = core.table(Ticket)
_OUTBOX = core.table(Outbox)
_BUNDLE = core.table(BundleItem)

#: Customers merged directly into any of ``:level``.
_MERGED_INTO = core_select(_CUSTOMER.c.id).where(
    _CUSTOMER.c.merged_into_id.in_(bindparam("level", expanding=True))
)
#: The customers' open tickets, oldest first (only the ids: `open_requests` loads objects
#: only when there are some).
_OPEN_IDS = (
    core_select(_TICKET.c.id)
    .where(
        _TICKET.c.customer_id.in_(bindparam("ids", expanding=True)),
        _TICKET.c.status != "closed",
    )
    .order_by(_TICKET.c.id)
)
#: Every ticket of the customers.
_TICKET_IDS = core_select(_TICKET.c.id).where(
    _TICKET.c.customer_id.in_(bindparam("ids", expanding=True))
)
#: The mail of some tickets (`_last_sent` filters kind and recipients itself).
_SENT_BY_TICKET = core_select(_OUTBOX.c.created_at, _OUTBOX.c.kind, _OUTBOX.c.rcpt_tos).where(
    _OUTBOX.c.ticket_id.in_(bindparam("tickets", expanding=True))
)
#: The latest mail of a kind to these recipients.
_SENT_TO = (
    core_select(_OUTBOX.c.created_at)
    .where(_OUTBOX.c.kind == bindparam("kind"), _OUTBOX.c.rcpt_tos == bindparam("rcpt_tos"))
    .order_by(_OUTBOX.c.created_at.desc())
    .limit(1)
)


def _waiting_stmt(customer: bool) -> Any:
    """The open bundle's due time for a recipient about a customer (``customer`` False:
    about no customer, ``IS NULL``), oldest bundle first."""
    about = (
        _BUNDLE.c.customer_id == bindparam("customer")
        if customer
        else _BUNDLE.c.customer_id.is_(None)
    )
    return (
        core_select(_BUNDLE.c.due_at)
        .where(
            _BUNDLE.c.purpose == bindparam("purpose"),
            _BUNDLE.c.recipient == bindparam("recipient"),
            about,
            _BUNDLE.c.state == "waiting",
        )
        .order_by(_BUNDLE.c.id)
        .limit(1)
    )


_WAITING_FOR_CUSTOMER = _waiting_stmt(customer=True)
_WAITING_FOR_NOBODY = _waiting_stmt(customer=False)


def customer_ids(session: Session, customer_id: int) -> set[int]:
    """The customer and every customer merged into it (their tickets are one person's).

    Merges form chains towards the surviving customer, so those merged into it are found
    by following `merged_into_id` backwards from it, one indexed query per level (one for
    a customer nobody was merged into); reading every merged customer of the installation,
    twice per message, grew with the number of merges ever made.

    Memoised for the transaction (asked twice per new ticket): `merge_customers`, the only
    change to the answer, drops the memo, so a merge in this session is seen at once."""
    root = resolve_customer(session, customer_id)
    memo: dict[int, frozenset[int]] = customer_memo(session, "ids")
    known = memo.get(root)
    if known is not None:
        return set(known)
    if fresh.is_new_customer(session, root):
        return {root}  # nobody else can see it yet, let alone have merged into it
    ids = {root}
    level = {root}
    while level:
        found = core.read(session, _MERGED_INTO, {"level": sorted(level)}).scalars().all()
        level = {c for c in found if c is not None and c not in ids}
        ids |= level
    memo[root] = frozenset(ids)
    return ids


def open_requests(session: Session, customer_id: int, exclude: Sequence[int] = ()) -> list[Ticket]:
    """The customer's open (not closed) tickets, oldest first.

    Their ids are read first (Core): most new tickets are a new customer's, whose only open
    ticket is the one being acknowledged (excluded), and then no ORM query runs at all."""
    ids = customer_ids(session, customer_id)
    # A new customer's tickets are those made here (closed or not: the query below filters).
    found: Sequence[int] | None = fresh.tickets_of(session, ids)
    if found is None:
        found = core.read(session, _OPEN_IDS, {"ids": sorted(ids)}).scalars().all()
    wanted = [t for t in found if t not in exclude]
    if not wanted:
        return []
    rows = session.exec(
        select(Ticket)
        .where(col(Ticket.id).in_(wanted), Ticket.status != "closed")
        .order_by(col(Ticket.id))
    ).all()
    return list(rows)


def deadline_phrase(ticket: Ticket, rules: Rules) -> str:
    """The next promise of a ticket, from its STORED deadlines, in English (events and
    staff letters; customers get it in their language, gateway.letters.facts)."""
    return facts.deadline_phrase(ticket, rules, letters.load("common"))


def request_line(ticket: Ticket, rules: Rules) -> str:
    """``ACME-1003 "subject": Alice Martin, first answer by ...`` (stored values only)."""
    return requests.request_line(ticket, rules, letters.load("common"))


def others_text(session: Session, rules: Rules, ticket: Ticket, letter: Letter) -> str:
    """The acknowledgement's paragraph about the customer's OTHER open requests ("" if
    none), in ``letter``'s language."""
    if ticket.customer_id is None or ticket.id is None:
        return ""
    others = open_requests(session, ticket.customer_id, exclude=[ticket.id])
    return requests.open_paragraph(others, rules, letter)


def cap_notice(
    session: Session, rules: Rules, customer_id: int | None, cap: int, letter: Letter
) -> str:
    """The honest last paragraph of the acknowledgement that reaches the daily cap, in the
    language of ``letter`` (the ``cap`` template)."""
    reqs = open_requests(session, customer_id) if customer_id is not None else []
    return requests.cap_paragraph(reqs, rules, cap, letter)


def window(settings: Settings) -> timedelta:
    """``outbound.ack_window`` as clock time (``ack_window_delta``, read once per text:
    parsing it cost 0.1 ms, twice per new ticket)."""
    return _window_of(settings.outbound.ack_window)


@cache
def _window_of(text: str) -> timedelta:
    """The clock time of an ``ack_window`` text, as ``OutboundSettings.ack_window_delta``."""
    return parse_duration(text).business()


# ------------------------------------------------------------- known customer: the stage


def _is_fresh_human(ctx: Context) -> bool:
    if ctx.kind != "customer" or (ctx.verdict is not None and not ctx.verdict.is_human):
        return False
    if not ctx.sender_verified or not ctx.sender:
        return False
    staff = {p.email.lower() for p in ctx.services.rules.people.values()}
    return ctx.sender.lower() not in staff


def known_customer_stage(ctx: Context) -> None:
    """After ``route``: a new mail from a customer with open tickets (module docstring)."""
    th = ctx.thread
    assert th is not None
    assert ctx.parsed is not None
    assert ctx.decision is not None
    if not _is_fresh_human(ctx):
        return
    ctx.fresh = "new"
    s = ctx.session
    cust = customer_of(s, ctx.sender)
    if cust is None:
        return
    reqs = open_requests(s, cust)
    if not reqs:
        return
    settings = ctx.services.settings
    policy = ctx.decision.known_customer or settings.tickets.known_customer
    source = f"route {ctx.decision.route}" if ctx.decision.known_customer else "tickets"
    hit = None
    if policy == "same-subject" and not th.links:
        # A mail that named tickets it could not join (docs/decisions.md D10) stays a linked new
        # ticket.
        cands = [Candidate(t.id, t.ref, t.normalized_subject) for t in reqs if t.id is not None]
        hit = match_known_customer(
            ctx.parsed.subject, ctx.parsed.text, cands, settings.tickets.ref_prefix
        )
    if hit is not None:
        cand, why = hit
        target = s.get(Ticket, cand.id)
        assert target is not None
        assert target.id is not None
        ctx.thread = ThreadDecision(
            Disposition.KNOWN_CUSTOMER,
            TicketView(target.id, target.ref, target.status),
            f"{ctx.sender} wrote a new mail (not a reply): {why} "
            f"({source}.known_customer = {policy})",
            notes=th.notes,
        )
        ctx.decision = None  # the ticket keeps its owner, queue and deadlines
        ctx.fresh = "joined"
        return
    refs = ", ".join(t.ref for t in reqs)
    reason = (
        f"no open request of {ctx.sender} has this subject or is named by it"
        if policy == "same-subject"
        else f"{source}.known_customer = separate"
    )
    ctx.event(
        "known-customer",
        f"{ctx.sender} has {len(reqs)} other open request(s): {refs}; {reason}: new ticket, "
        f"linked same-customer, its acknowledgement lists them",
        {"others": [t.ref for t in reqs], "policy": policy},
    )
    for t in reqs:
        assert t.id is not None
        th.links.append((t.id, "same-customer", f"another open request of {ctx.sender}"))


# ------------------------------------------------------------------------------ bundling


def _waiting(
    session: Session, purpose: str, recipient: str, customer: int | None
) -> datetime | None:
    """When the open bundle for this recipient about this customer closes (None: no open
    bundle): an owner's bundle is per customer, so another customer's first mail is still
    notified at once."""
    # Only this transaction can have filed one for a customer it inserted.
    if (
        customer is not None
        and fresh.is_new_customer(session, customer)
        and not fresh.bundled_for(session, customer)
    ):
        return None
    params: dict[str, Any] = {"purpose": purpose, "recipient": recipient}
    if customer is None:
        stmt = _WAITING_FOR_NOBODY
    else:
        stmt = _WAITING_FOR_CUSTOMER
        params["customer"] = customer
    due: datetime | None = core.read(session, stmt, params).scalar()
    return due


def _customer(ctx: Context) -> int | None:
    assert ctx.ticket is not None
    cid = ctx.ticket.customer_id
    return resolve_customer(ctx.session, cid) if cid is not None else None


def _last_sent(session: Session, kind: str, rcpt: str, ticket_ids: set[int]) -> datetime | None:
    rcpt_tos = json.dumps([rcpt])
    value: datetime | None
    if ticket_ids:
        # A customer has few tickets and little mail, an owner thousands of notifications:
        # read the tickets' mail by ticket and filter here, so that no planner walks all of
        # the owner's notifications by `outbox_rcpt_kind` instead.
        result = core.read(session, _SENT_BY_TICKET, {"tickets": sorted(ticket_ids)})
        rows = cast("Sequence[tuple[datetime, str, str]]", result.all())
        value = max((at for at, k, to in rows if k == kind and to == rcpt_tos), default=None)
    else:
        value = core.read(session, _SENT_TO, {"kind": kind, "rcpt_tos": rcpt_tos}).scalar()
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _defer(ctx: Context, purpose: str, recipient: str, anchor: datetime | None) -> datetime | None:
    """Put this mail into the bundle for ``recipient``; its close, or None to send at once."""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    assert ctx.message is not None
    s = ctx.session
    span = window(ctx.services.settings)
    if span <= timedelta(0):
        return None
    pending = _waiting(s, purpose, recipient, _customer(ctx))
    if pending is not None:
        due = pending if pending.tzinfo else pending.replace(tzinfo=ctx.now.tzinfo)
    elif anchor is not None and ctx.now < anchor + span:
        due = anchor + span
    else:
        return None
    s.add(
        BundleItem(
            purpose=purpose,
            recipient=recipient,
            customer_id=_customer(ctx),
            ticket_id=ctx.ticket.id,
            message_id=ctx.message.id or 0,
            how=ctx.fresh or "new",
            created_at=ctx.now,
            due_at=due,
        )
    )
    return due


def bundle_ack(ctx: Context, to: str) -> bool:
    """Respond's helper: is this fresh mail's acknowledgement bundled? (records why)"""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    if not ctx.fresh or not to:
        return False
    anchor = _last_sent(ctx.session, ACK_KIND, to, set())
    due = _defer(ctx, "ack", to, anchor)
    if due is None:
        return False
    add_event(
        ctx.session,
        ctx.ticket.id,
        "ack-bundled",
        f"{to} was acknowledged less than {ctx.services.settings.outbound.ack_window} ago: "
        f"this mail is confirmed together with the others in one acknowledgement at "
        f"{isoz(due)} (outbound.ack_window)",
        ctx.now,
        message_id=ctx.message.id if ctx.message is not None else None,
    )
    return True


def bundle_notification(ctx: Context, owner: Person) -> bool:
    """Notify's helper: is this fresh mail's owner notification bundled? (records why)"""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    if ctx.ticket.customer_id is None or ctx.kind != "customer":
        return False
    if not ctx.fresh:
        # A reply joins a burst already being bundled for this owner (one notification per
        # burst); on its own a reply is notified at once, as before.
        if _waiting(ctx.session, "notify", owner.id, _customer(ctx)) is None:
            return False
        ctx.fresh = "reply"
    ids = customer_ids(ctx.session, ctx.ticket.customer_id)
    made_here = fresh.tickets_of(ctx.session, ids)
    if made_here is not None and not fresh.queued_about(ctx.session, made_here, "notification"):
        anchor = None  # a new customer's tickets: no notification about them before this one
    else:
        found = made_here or core.read(ctx.session, _TICKET_IDS, {"ids": sorted(ids)}).scalars()
        tickets = {t for t in found if t is not None}
        anchor = _last_sent(ctx.session, "notification", owner.email, tickets)
    due = _defer(ctx, "notify", owner.id, anchor)
    if due is None:
        return False
    add_event(
        ctx.session,
        ctx.ticket.id,
        "owner-notify-bundled",
        f"{owner.name} was notified about {ctx.sender} less than "
        f"{ctx.services.settings.outbound.ack_window} ago: this mail's full text goes in one "
        f"notification at {isoz(due)}",
        ctx.now,
        message_id=ctx.message.id if ctx.message is not None else None,
    )
    return True


# ----------------------------------------------------------------- customer merge: dupes


def announce_customer_merge(
    session: Session,
    *,
    customer_id: int,
    rules: Rules | None,
    settings: Settings,
    signer: Signer,
    now: datetime,
) -> list[str]:
    """After ``customers merge``: the customer's open tickets are possible duplicates.

    Each pair is linked ``possible-duplicate``; each ticket's owner gets one notification
    naming the others (owner, stored deadlines) and how to close the loop: reply with
    ``#merge <REF>`` (the reply token is this ticket's). Returns what was said, per ticket.
    """
    from gateway.outbound.worker import notify_owner

    reqs = open_requests(session, customer_id)
    if len(reqs) < 2:
        return []
    said: list[str] = []
    for t in reqs:
        assert t.id is not None
        for other in reqs:
            assert other.id is not None
            if other.id < t.id and link(session, t.id, other.id, "possible-duplicate", now):
                add_event(session, t.id, "possible-duplicate",
                          f"same customer as {other.ref} after customers merge", now)  # fmt: skip
                add_event(session, other.id, "possible-duplicate",
                          f"same customer as {t.ref} after customers merge", now)  # fmt: skip
    for t in reqs:
        others = [o for o in reqs if o.id != t.id]
        if rules is None:
            continue
        owner = owner_or_default(rules, t.owner)
        if owner is None:
            continue
        staff = letters.load("staff", "en", settings.templates_path)
        body = (
            staff.phrase(
                "duplicate_body",
                requester=t.requester,
                ref=t.ref,
                subject=t.subject,
                deadline=deadline_phrase(t, rules),
                lines="\n".join(f"  - {request_line(o, rules)}" for o in others),
                first=others[0].ref,
            )
            + "\n"
        )
        notify_owner(
            session,
            settings,
            signer,
            ticket=t,
            email=owner.email,
            name=owner.name,
            person=owner.id,
            subject=staff.phrase(
                "duplicate_subject", ref=t.ref, others=", ".join(o.ref for o in others)
            ),
            body=body,
            now=now,
        )
        add_event(session, t.id, "duplicates-notified",
                  f"{owner.name} told that {t.ref} may duplicate "
                  + ", ".join(o.ref for o in others), now)  # fmt: skip
        said.append(f"{t.ref}: {owner.name} told (possible duplicate of "
                    + ", ".join(o.ref for o in others) + ")")  # fmt: skip
    return said


def merged_sources(session: Session, ticket_id: int) -> list[tuple[int, str]]:
    """Tickets merged into this one (recursively): (id, ref), for its history."""
    out: list[tuple[int, str]] = []
    todo = [ticket_id]
    seen = {ticket_id}
    while todo:
        current = todo.pop()
        for lk in session.exec(
            select(TicketLink).where(
                TicketLink.other_id == current, TicketLink.relation == "merged-into"
            )
        ).all():
            if lk.ticket_id in seen:
                continue
            seen.add(lk.ticket_id)
            src = session.get(Ticket, lk.ticket_id)
            out.append((lk.ticket_id, src.ref if src is not None else str(lk.ticket_id)))
            todo.append(lk.ticket_id)
    return out
