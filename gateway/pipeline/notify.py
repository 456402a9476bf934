"""Owner notifications: the owner gets the customer's whole message by email (docs/decisions.md D7).

"The ticket was updated: log in to read it", and nothing was there (docs/design.md §0). So the
notification carries everything the owner needs to answer from a mail client:

- the customer's **full text** (never "log in to read"), and their attachments, attached
  when together they are under ``outbound.notify_attachment_limit`` (above it: names and
  sizes);
- the ticket summary: reference, subject, requester, owner, queue, priority, and the running
  deadlines as *stored* on the ticket (what the escalator enforces), in the SLA calendar's
  time zone with the zone spelled out, plus UTC;
- ``Reply-To`` = the signed per-person, per-ticket address
  (``Signer.reply_address(..., person=owner)``): the owner answers by replying, and the staff
  stage (``gateway.pipeline.staff``) checks that the reply really comes from that person
  (docs/design.md §5: staff identity is never proven by ``From:`` alone);
- ``Auto-Submitted: auto-generated`` (RFC 3834 §5.1), a signed Message-ID (kind ``notify``),
  our loop header; written to the transactional outbox with the null sender
  (docs/design.md §6), never sent from here.

The letter is composed by :mod:`gateway.letters.notification` (``notify.en.txt``); this
stage decides who gets it and queues it. Runs after ``respond`` in the same transaction, for
a new ticket and for every further message from a human customer. For a new ticket, every
person a matching route lists in ``notify`` gets the same notification with a reply token of
their own (docs/decisions.md D11: the list used to be stored in the ``routed`` event and nobody was
told). All of them go at once: notifications are never held for a person's working hours
(docs/rules.md "People"). Never for robots (auto-replies, bounces, lists: their mail is
recorded, the owner is not paged for it) and never for staff mail (``kind`` note or
staff_reply, set by ``record`` and the staff stage). A mail whose From is one of our staff
but that came without a staff token (a possible forgery, docs/design.md §5) is still
notified, with a warning line, so the impersonated person sees it.
"""

from __future__ import annotations

import contextlib
from email.message import Message

from gateway.letters import templates as letters
from gateway.letters.facts import owner_or_default
from gateway.letters.i18n import describe_size
from gateway.letters.notification import Part, compose_owner_notification
from gateway.outbound.worker import enqueue
from gateway.pipeline.commands import help_text
from gateway.pipeline.context import Context
from gateway.pipeline.conversation import bundle_notification
from gateway.pipeline.parse import leaf_parts
from gateway.routing.model import Person
from gateway.sla.business_time import BusinessCalendar
from gateway.store.models import Ticket
from gateway.store.queries import add_event

__all__ = ["attachment_parts", "notify_owner_stage"]


def attachment_parts(msg: Message) -> list[Part]:
    """The attachments of ``msg`` (decoded bytes), chosen the way ``parse._walk`` does: every
    leaf part that is not an inline text/plain or text/html body. Never raises."""
    out: list[Part] = []
    for leaf in leaf_parts(msg):
        if leaf.body_kind is not None:
            continue
        ctype, filename = leaf.content_type, leaf.filename
        try:
            payload = leaf.part.get_payload(decode=True)
        except Exception:
            payload = None
        if not isinstance(payload, bytes):
            continue
        out.append(Part(filename or f"unnamed.{ctype.split('/')[-1]}", ctype, payload))
    return out


def _recipients(
    ctx: Context, owner: Person, notify_letter: letters.Letter
) -> list[tuple[Person, str]]:
    """The owner, then (new ticket only) each known person of the routes' ``notify``
    lists, once each, with the line saying why they are told."""
    assert ctx.thread is not None
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    recipients: list[tuple[Person, str]] = [(owner, "")]
    if ctx.thread.is_new and ctx.decision is not None:
        routes = ", ".join(ctx.decision.matched_routes) or "the rules"
        for who in ctx.decision.notify:
            person = ctx.services.rules.people.get(who)
            if person is None:
                add_event(
                    ctx.session,
                    ctx.ticket.id,
                    "notify-skipped",
                    f"route notify {who!r}: unknown",
                    ctx.now,
                )
                continue
            if any(person.id == r.id for r, _ in recipients):
                continue  # the owner (or a repeat) gets one notification, not two
            recipients.append((person, notify_letter.phrase("why_route", routes=routes)))
    return recipients


def _owner(ctx: Context, ticket: Ticket) -> Person | None:
    # Always a named human (docs/design.md §7): fall back to the default owner.
    return owner_or_default(ctx.services.rules, ticket.owner)


def _warnings(ctx: Context) -> list[str]:
    out: list[str] = []
    rules = ctx.services.rules
    staff = {p.email.lower(): p for p in rules.people.values()}
    if ctx.sender.lower() in staff:
        out.append(
            f"the From address {ctx.sender} is {staff[ctx.sender.lower()].name}'s, but this "
            f"mail did not come through a staff reply address; it was treated as a customer "
            f"message and NOT relayed (docs/design.md §5: From alone proves nothing)"
        )
    if ctx.auth is not None and ctx.auth.likely_forged:
        out.append(
            f"the sender looks forged (spf {ctx.auth.spf}, dmarc {ctx.auth.dmarc}); "
            f"no acknowledgement was sent to it"
        )
    return out


def _references(ctx: Context) -> list[str]:
    """What the owner must know about tickets this new ticket was linked to instead of
    joining them: the sender named them but is not (or not provably) a participant."""
    if ctx.thread is None or not ctx.thread.is_new:
        return []
    out: list[str] = []
    for other, relation, why in ctx.thread.links:
        if relation != "possible-follow-up":
            continue
        t = ctx.session.get(Ticket, other)
        ref = t.ref if t is not None else str(other)
        if ctx.sender_verified:
            who = f"{ctx.sender} is not a participant of {ref}"
            bring = (
                f"; to bring {ctx.sender} in, the requester of {ref} can Cc them, or reply "
                f"to this notification with #merge {ref}"
            )
        else:
            who = f"an unverified From counts as no participant of {ref}"
            bring = ""
        out.append(
            f"References {ref} ({why}), but {who}: opened as a new ticket linked to {ref} "
            f"as a possible follow-up. Nobody was added to {ref} or copied on its "
            f"replies{bring}."
        )
    return out


def notify_owner_stage(ctx: Context) -> None:
    """Queue the owner's notification for a new ticket or a new customer message, and for a
    new ticket the same notification to each person in the route's ``notify`` list."""
    assert ctx.thread is not None
    assert ctx.parsed is not None
    assert ctx.message is not None
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    if ctx.kind != "customer":
        return  # staff mail, notes, robots, bounces: recorded, nobody paged
    if ctx.verdict is not None and not ctx.verdict.is_human:
        return
    if ctx.thread.claim is not None and ctx.thread.claim.person:
        return  # a staff token: the staff stage handles it
    ticket = ctx.ticket
    s = ctx.session
    owner = _owner(ctx, ticket)
    if owner is None:
        add_event(
            s,
            ticket.id,
            "notify-skipped",
            f"no owner notification: {ticket.owner!r} is not a person in rules/",
            ctx.now,
            message_id=ctx.message.id,
        )
        return
    if bundle_notification(ctx, owner):
        return  # docs/decisions.md D12: one notification per burst, each mail's full text in it
    settings = ctx.services.settings
    calendar: BusinessCalendar | None = None
    with contextlib.suppress(KeyError):
        calendar = ctx.services.rules.calendar_for_policy(ticket.sla)
    limit = settings.outbound.notify_attachment_limit
    p = ctx.parsed
    # parse() found the attachments of this very message (the same leaves, chosen the same
    # way): without one, walking its parts again would find none.
    parts = attachment_parts(p.msg) if p.attachments else []
    total = sum(len(x.data) for x in parts)
    files = (
        f"; {len(parts)} attachment(s), {describe_size(total)}"
        + (" attached" if parts and total <= limit else " listed, not attached")
        if parts
        else ""
    )
    # The owner first, then (new ticket only) each person a matching route lists in
    # `notify`: the same full notification, each with a reply token of their own. They go
    # at once, whatever the person's calendar says (docs/rules.md "People"): holding them
    # for working hours would need a delayed outbox, and an outage route that "wakes up the
    # lead" must wake her (docs/decisions.md D11, items 4 and 5).
    templates = settings.templates_path  # looks at the disk: once, not once per recipient
    notify_letter = letters.load("notify", "en", templates)
    for person, why in _recipients(ctx, owner, notify_letter):
        raw, message_id, subject, text = compose_owner_notification(
            ticket=ticket,
            owner=owner,
            new_ticket=ctx.thread.is_new,
            sender=ctx.sender,
            sender_name=p.from_name,
            customer_subject=p.subject,
            customer_text=p.text,
            received_at=ctx.received_at,
            parts=parts,
            calendar=calendar,
            warnings=_warnings(ctx),
            from_address=settings.outbound.from_address,
            from_name=settings.outbound.from_name,
            signer=ctx.services.signer,
            hostname=settings.smtp.hostname,
            now=ctx.now,
            attachment_limit=limit,
            recipient=person,
            commands=help_text(),  # generated from the command registry
            why=why,
            unverified="" if ctx.sender_verified else ctx.unverified_reason,
            references=_references(ctx),
            letter=notify_letter,
            staff=letters.load("staff", "en", templates),
        )
        enqueue(
            s,
            ticket_id=ticket.id,
            kind="notification",
            raw=raw,
            message_id=message_id,
            rcpt_tos=[person.email],
            now=ctx.now,
            mail_from="",  # automatic mail: null reverse-path (RFC 3834 §3.3)
            from_address=settings.outbound.from_address,
            subject=subject,
            text=text,
        )
        add_event(
            s,
            ticket.id,
            "owner-notified" if person is owner else "route-notified",
            f"notification {message_id} queued to {person.name} <{person.email}> with the "
            f"full text{files}" + ("" if person is owner else " (route notify)"),
            ctx.now,
            message_id=ctx.message.id,
        )
