"""Respond stage: decide whether a new ticket is acknowledged, and say why (docs/design.md §3).

Runs after ``record`` in the same transaction: the acknowledgement is written to the outbox
(transactional outbox, docs/design.md §6) together with the ticket, never sent from here. Every
decision leaves one event on the ticket, ``ack-sent`` or ``ack-suppressed`` with the reason,
so ``tickets show`` explains why a customer did or did not get a reply.

No acknowledgement (each a rule of docs/design.md §3, RFC 3834 §2):
- the route says ``acknowledge = false``;
- the classifier found a robot (rules 1-7: null sender, Auto-Submitted, Precedence, List-*,
  X-Auto-Response-Suppress, system local parts, our loop header, reports);
- the sender is likely forged (rule 8): an ack would be backscatter to an innocent party;
  when the sender check could not complete (DNS trouble) the ack is DEFERRED, not sent and
  not dropped: ``ack-deferred``, then the re-check worker (``gateway.pipeline.recheck``)
  calls :func:`send_ack_now` or suppresses it (``gateway.security.verdict.ack_decision``,
  docs/decisions.md D10). The ticket and the owner's notification never wait for that;
- the ticket already has one, or the per-sender daily cap is reached (rule 9); when the cap
  trips, the owner is told once per sender per day and the mail is still recorded;
- the recipient would be empty or one of our own addresses (rule 6).

The deadline in the ack is ``ticket.first_response_due``, the stored value the escalator
enforces, never recomputed (docs/design.md §0: one computation for the promise and the
escalation). The owner it names is the route's owner checked against the plan
(gateway.pipeline.route ``cover_window``: on duty before the deadline), and the promise is recorded
(``_record_promise``) so it is enforced and shown (docs/decisions.md D11).

A ticket processed after its own deadlines passed (it waited in a stopped node's spool) gets
ONE message instead (``_late``): when it arrived, that it was processed late, who holds it now
and the plan's real next commitment; the steps whose moments had already passed are
collapsed into the plan's current state, never fired in one burst (docs/decisions.md D11.8).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam
from sqlalchemy import select as core_select
from sqlmodel import col, func, select

from gateway.letters import templates as letters
from gateway.letters.ack import AckContent, ResponseStats, compose_ack, response_stats
from gateway.letters.brands import brand_domains, identity
from gateway.letters.headers import tagged_subject
from gateway.notices.late import Late, collapse, send_late
from gateway.outbound.worker import enqueue, notify_owner
from gateway.pipeline.context import Context
from gateway.pipeline.conversation import bundle_ack, cap_notice, others_text
from gateway.pipeline.holds import hold
from gateway.pipeline.lettering import choose_letters
from gateway.routing.model import Person
from gateway.security.sender_auth import AuthResult
from gateway.security.verdict import ack_decision
from gateway.sla.deadlines import isoz
from gateway.store import core, promises
from gateway.store.models import BundleItem, Event, Outbox, Ticket
from gateway.store.queries import add_event, resolve_customer, xact_lock

#: Window for the "recent performance" line of the acknowledgement.
STATS_DAYS = 30


def _cap(ctx: Context) -> int:
    return ctx.services.settings.outbound.daily_ack_cap


def ack_recipient(auth: AuthResult | None, from_address: str, mail_from: str) -> str:
    """The envelope sender, or the From when it is authenticated; never Reply-To (§3)."""
    if auth is not None and auth.authenticated and from_address:
        return from_address.lower()
    return mail_from.strip().strip("<>").lower()


def _recipient(ctx: Context) -> str:
    assert ctx.parsed is not None
    return ack_recipient(ctx.auth, ctx.parsed.from_address, ctx.entry.envelope.mail_from)


def _is_ours(ctx: Context, address: str) -> bool:
    settings = ctx.services.settings
    domain = address.rpartition("@")[2].lower()
    return address == settings.outbound.from_address.lower() or domain in {
        d.lower() for d in settings.smtp.domains
    } | brand_domains(ctx.services.rules)


def _suppression(ctx: Context, to: str) -> str | None:
    """Why no acknowledgement goes out, or None when one should."""
    assert ctx.decision is not None
    assert ctx.ticket is not None
    if ctx.decision.acknowledge is False:
        route = ctx.decision.route or "(defaults)"
        return f"route {route} says acknowledge = false"
    if ctx.verdict is not None and not ctx.verdict.may_acknowledge:
        return f"{ctx.verdict.kind}: " + "; ".join(ctx.verdict.reasons)
    # (A likely-forged sender is judged by gateway.security.verdict.ack_decision, in respond.)
    if ctx.ticket.acknowledged:
        return "the ticket was already acknowledged"
    if not to or "@" not in to:
        return "no envelope sender to answer (null reverse-path)"
    if _is_ours(ctx, to):
        return f"{to} is one of our own addresses (RFC 3834 §2: never answer ourselves)"
    return None


_OUTBOX = core.table(Outbox)
#: Acknowledgements to ``:rcpt_tos`` since ``:since`` (prebuilt Core: once per new ticket,
#: a fifth of the ORM query's cost; gateway.store.core).
_ACKS_SINCE = (
    core_select(func.count())
    .select_from(_OUTBOX)
    .where(
        _OUTBOX.c.kind == "ack",
        _OUTBOX.c.rcpt_tos == bindparam("rcpt_tos"),
        _OUTBOX.c.created_at >= bindparam("since"),
    )
)


def _acks_today(ctx: Context, to: str) -> int:
    # The cap is exact across nodes: the count and the new outbox row are one critical
    # section per recipient until commit (docs/decisions.md D13.5).
    xact_lock(ctx.session, f"ack-cap:{to}")
    since = ctx.now - timedelta(hours=24)
    n = core.read(ctx.session, _ACKS_SINCE, {"rcpt_tos": json.dumps([to]), "since": since})
    return int(n.scalar_one())


def _cap_tripped(ctx: Context, to: str, owner: Person) -> None:
    """Tell the owner ONCE per sender per day; the mail itself is recorded regardless."""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    since = ctx.now - timedelta(hours=24)
    marker = f"<{to}>"
    already = ctx.session.exec(
        select(Event.id).where(
            Event.type == "ack-cap-reached",
            col(Event.at) >= since,
            col(Event.detail).contains(marker, autoescape=True),
        )
    ).first()
    if already is not None:
        return
    detail = (
        f"{_cap(ctx)} acknowledgements sent to {marker} in 24 hours; no more today. "
        f"{owner.name} ({owner.email}) told once."
    )
    add_event(
        ctx.session,
        ctx.ticket.id,
        "ack-cap-reached",
        detail,
        ctx.now,
        data={"sender": to, "cap": _cap(ctx)},
    )
    staff = letters.load("staff", "en", ctx.services.settings.templates_path)
    facts = {"ref": ctx.ticket.ref, "sender": to, "cap": _cap(ctx), "subject": ctx.ticket.subject}
    body = staff.phrase("ack_limit_body", **facts) + "\n"
    notify_owner(
        ctx.session,
        ctx.services.settings,
        ctx.services.signer,
        ticket=ctx.ticket,
        email=owner.email,
        name=owner.name,
        person=owner.id,
        subject=staff.phrase("ack_limit_subject", **facts),
        body=body,
        now=ctx.now,
    )


#: (database, queue) -> (when computed, statistics): the statistics are over 30 days, so a
#: minute-old figure is as good; one query per queue per minute instead of one per new
#: ticket (docs/decisions.md D16.2), cached in the pipeline process. The median and 90th
#: percentile are kept too: computed from the same durations, they are the same figures,
#: without sorting a month of tickets for every acknowledgement.
_STATS_CACHE: dict[tuple[str, str], tuple[datetime, ResponseStats | None]] = {}
STATS_TTL = timedelta(minutes=1)


def _stats(ctx: Context, queue: str) -> ResponseStats | None:
    key = (str(ctx.session.get_bind().engine.url), queue)
    cached = _STATS_CACHE.get(key)
    if cached is not None and abs(ctx.now - cached[0]) < STATS_TTL:
        return cached[1]
    out = response_stats(_stats_query(ctx, queue), STATS_DAYS)
    _STATS_CACHE[key] = (ctx.now, out)
    return out


def _stats_query(ctx: Context, queue: str) -> list[timedelta]:
    since = ctx.now - timedelta(days=STATS_DAYS)
    rows = ctx.session.exec(
        select(Ticket.created_at, Ticket.first_responded_at).where(
            Ticket.queue == queue,
            col(Ticket.created_at) >= since,
            col(Ticket.first_responded_at).is_not(None),
        )
    ).all()
    return [answered - created for created, answered in rows if answered is not None]


def note_unanswered(ctx: Context) -> None:
    """A robot's mail that opened no ticket (an unmatched auto-reply or bounce) is recorded
    ticketless; say on its message why nobody answered it."""
    assert ctx.message is not None
    assert ctx.verdict is not None
    if ctx.verdict.is_human:
        return  # human wording with the null reverse-path: the disposition says enough
    reason = f"{ctx.verdict.kind}: " + "; ".join(ctx.verdict.reasons)
    add_event(
        ctx.session,
        None,
        "ack-suppressed",
        f"no ticket opened; {reason}",
        ctx.now,
        message_id=ctx.message.id,
    )


def respond(ctx: Context) -> None:
    """Queue the acknowledgement of a new ticket, or record why there is none."""
    if ctx.fresh == "joined":
        # docs/decisions.md D12: a new mail that went into the customer's ticket
        _ack_joined_mail(ctx)
        return
    assert ctx.ticket is not None
    assert ctx.decision is not None
    assert ctx.parsed is not None
    ticket = ctx.ticket
    assert ticket.id is not None
    msg_id = ctx.message.id if ctx.message is not None else None
    # the language and brand of every letter of this ticket (docs/decisions.md D17)
    choose_letters(ctx)
    late = _collapse_late(ctx)
    to = _recipient(ctx)
    why = _suppression(ctx, to)
    template_name = ctx.decision.acknowledge if isinstance(ctx.decision.acknowledge, str) else "ack"
    if why is None:
        # Unknown is not verified (docs/decisions.md D10): a sender check that could not complete
        # defers the ack; only the ack waits, the ticket and the owner's notification do not.
        verdict = ack_decision(
            ctx.auth, if_unverified=ctx.services.settings.security.ack_if_unverified
        )
        if verdict.action == "suppress":
            why = verdict.reason
        elif verdict.action == "defer" and ctx.message is not None:
            row = hold(
                ctx,
                "ack",
                {
                    "template": template_name,
                    "truncated_bytes": ctx.entry.envelope.truncated_bytes,
                    "received_at": ctx.received_at.isoformat(),
                },
            )
            add_event(
                ctx.session,
                ticket.id,
                "ack-deferred",
                f"{verdict.reason}; re-checked until {row.deadline.isoformat()}",
                ctx.now,
                message_id=msg_id,
            )
            return
    if why is not None:
        add_event(ctx.session, ticket.id, "ack-suppressed", why, ctx.now, message_id=msg_id)
        return
    if late is None and bundle_ack(ctx, to):
        # docs/decisions.md D12: covered by one acknowledgement when outbound.ack_window closes
        return
    send_ack_now(ctx, to, owner=ctx.decision.owner, template_name=template_name, late=late)


# -- docs/decisions.md D12 (one customer, one conversation): helpers kept apart for easy merging
# -------


def _ack_joined_mail(ctx: Context) -> None:
    """A customer's NEW mail that the known-customer policy put into their open ticket is
    confirmed too (they did not reply, so they cannot know where it went): through the
    bundle (gateway.pipeline.bundle), at once when no acknowledgement went out within
    ``outbound.ack_window``, else with the others when the window closes."""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    assert ctx.message is not None
    to = _recipient(ctx)
    why: str | None = None
    if ctx.verdict is not None and not ctx.verdict.may_acknowledge:
        why = f"{ctx.verdict.kind}: " + "; ".join(ctx.verdict.reasons)
    elif not to or "@" not in to or _is_ours(ctx, to):
        why = f"no address to confirm to ({to or 'null reverse-path'})"
    else:
        verdict = ack_decision(
            ctx.auth, if_unverified=ctx.services.settings.security.ack_if_unverified
        )
        if verdict.action != "send":
            why = verdict.reason
    if why is not None:
        add_event(ctx.session, ctx.ticket.id, "ack-suppressed", why, ctx.now,
                  message_id=ctx.message.id)  # fmt: skip
        return
    if bundle_ack(ctx, to):
        return
    ctx.session.add(
        BundleItem(
            purpose="ack", recipient=to, customer_id=_customer_of_ticket(ctx),
            ticket_id=ctx.ticket.id, message_id=ctx.message.id or 0, how="joined",
            created_at=ctx.now, due_at=ctx.now,
        )
    )  # fmt: skip
    add_event(ctx.session, ctx.ticket.id, "ack-queued",
              f"added to {ctx.ticket.ref}: {to} is told so in an acknowledgement at once",
              ctx.now, message_id=ctx.message.id)  # fmt: skip


def _customer_of_ticket(ctx: Context) -> int | None:
    assert ctx.ticket is not None
    cid = ctx.ticket.customer_id
    return resolve_customer(ctx.session, cid) if cid is not None else None


def _conversation_texts(
    ctx: Context, to: str, lang: str, sent_today: int, templates: Path
) -> tuple[str, str]:
    """(other open requests, cap notice) for the acknowledgement of ``ctx.ticket``: the
    customer always sees where everything stands, and the ack that reaches the daily cap
    says that confirmations stop (docs/decisions.md D12)."""
    assert ctx.ticket is not None
    rules = ctx.services.rules
    settings = ctx.services.settings
    default = settings.outbound.default_language
    # In the letter's language (common.<lang>.txt and cap.<lang>.txt, docs/templates.md).
    common = letters.load("common", lang, templates, default_language=default)
    others = others_text(ctx.session, rules, ctx.ticket, common)
    notice = ""
    if sent_today + 1 >= _cap(ctx):
        capl = letters.load("cap", lang, templates, default_language=default)
        notice = cap_notice(ctx.session, rules, ctx.ticket.customer_id, _cap(ctx), capl)
    return others, notice


def send_ack_now(
    ctx: Context,
    to: str,
    *,
    owner: Person,
    template_name: str,
    because: str = "",
    late: Late | None = None,
) -> bool:
    """Queue the acknowledgement of ``ctx.ticket`` to ``to`` now, or record why not.

    The pipeline's ``respond`` calls it for a new ticket; the re-check worker calls it for
    an ack that waited for the sender's verdict (same composition, same stored deadline).
    ``because`` is added to the ``ack-sent`` event. A ticket processed after its own
    deadlines (``late``) gets the one honest late message instead. Returns whether a letter
    was queued.
    """
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    assert ctx.parsed is not None
    ticket = ctx.ticket
    assert ticket.id is not None
    s = ctx.session
    msg_id = ctx.message.id if ctx.message is not None else None
    why: str | None = None
    if ticket.acknowledged:
        why = "the ticket was already acknowledged"
    sent_today = _acks_today(ctx, to) if why is None else 0
    if why is None and sent_today >= _cap(ctx):
        why = f"daily cap of {_cap(ctx)} acknowledgements to {to} reached"
        _cap_tripped(ctx, to, owner)
    if why is None and ticket.first_response_due is None:
        why = "the ticket has no first-response deadline to promise"
    if why is not None:
        add_event(s, ticket.id, "ack-suppressed", why, ctx.now, message_id=msg_id)
        return False
    due = ticket.first_response_due
    assert due is not None  # checked above
    if late is not None:
        _late(ctx, to, late)
        return True

    settings = ctx.services.settings
    rules = ctx.services.rules
    calendar = rules.calendar_for_policy(ticket.sla)
    p = ctx.parsed
    content = AckContent(
        ref=ticket.ref,
        owner_name=owner.name,
        subject=p.subject,
        first_response_due=due,  # THE stored value, never recomputed
        calendar=calendar,
        received_at=ctx.received_at,
        customer_date=p.date,
        attachments=list(p.attachments),
        not_kept=list(p.not_kept),
        stats=_stats(ctx, ticket.queue),
    )
    # The override folder: Settings.templates_path looks at the disk, once for this letter.
    templates = settings.templates_path
    # docs/decisions.md D12: the customer's other open requests, and the honest cap notice.
    others, notice = _conversation_texts(
        ctx, to, ticket.language or settings.outbound.default_language, sent_today, templates
    )
    content = AckContent(**{**content.__dict__, "others": others, "notice": notice})
    # The ticket's language and brand (gateway.pipeline.lettering); an admin's override in
    # templates_dir wins over the shipped template (docs/templates.md).
    me = identity(settings, rules, ticket.brand)
    letter = letters.load(
        template_name,
        ticket.language or settings.outbound.default_language,
        templates,
        default_language=settings.outbound.default_language,
    )
    raw, message_id = compose_ack(
        content=content,
        ticket_id=ticket.id,
        to_address=to,
        customer_message_id=p.message_id,
        customer_references=p.references,
        from_address=me.from_address,
        from_name=me.from_name,
        signer=ctx.services.signer,
        hostname=settings.smtp.hostname,
        now=ctx.now,
        template=letter,
        signature=me.signature,
        business_name=me.business_name,
        message_id_domain=me.message_id_domain,
        reply_domain=me.reply_domain,
    )
    subject = tagged_subject(ticket.ref, p.subject)
    enqueue(
        s,
        ticket_id=ticket.id,
        kind="ack",
        raw=raw,
        message_id=message_id,
        rcpt_tos=[to],
        now=ctx.now,
        mail_from="",  # null reverse-path for automatic mail (RFC 3834 §3.3)
        from_address=me.from_address,
        subject=subject,
        in_reply_to=p.message_id,
        references=" ".join([*p.references, *([p.message_id] if p.message_id else [])]),
    )
    ticket.acknowledged = True
    s.add(ticket)
    _record_promise(ctx, to, message_id, f"first answer from {content.owner_name}", due)
    add_event(
        s,
        ticket.id,
        "ack-sent",
        f"acknowledgement {message_id} queued to {to}; first response promised "
        f"by {content.first_response_due.isoformat()}"
        + f"; in {letter.lang} from {letter.source}"
        + (f" ({because})" if because else ""),
        ctx.now,
        message_id=msg_id,
    )
    return True


def _record_promise(
    ctx: Context, to: str, message_id: str, what: str, due: datetime | None, clock: str = ""
) -> None:
    """The acknowledgement (or the late message) promised the customer a first answer from
    the named owner by `due`: record it so the escalator enforces it and `tickets show`
    lists it (docs/decisions.md D11, "One plan, said and done")."""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    promises.record(
        ctx.session,
        ticket_id=ctx.ticket.id,
        made_at=ctx.now,
        to=to,
        person=ctx.ticket.owner,
        message_id=message_id,
        what=f"{what} by {isoz(due)}" if due is not None else what,
        clock=clock or "first_response",
        due=due,
    )


def _collapse_late(ctx: Context) -> Late | None:
    """A ticket processed after moments of its own plan: collapse them (gateway.notices.late)."""
    assert ctx.ticket is not None
    return collapse(ctx.session, ctx.ticket, ctx.services.rules, ctx.received_at, ctx.now)


def _late(ctx: Context, to: str, late: Late) -> None:
    """The one message of a late-processed ticket (instead of an acknowledgement)."""
    assert ctx.ticket is not None
    send_late(
        ctx.session,
        ctx.services.settings,
        ctx.services.signer,
        ctx.ticket,
        ctx.services.rules,
        late,
        to=to,
        last=ctx.message,
        message_row=ctx.message.id if ctx.message is not None else None,
    )
