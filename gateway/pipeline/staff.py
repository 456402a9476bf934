"""Staff stage: staff answer by replying to email; verified replies are relayed (docs/decisions.md
D7).

Runs after ``record`` (which stores mail to a *staff* reply token, one carrying a person id,
as an internal ``note`` and never lets it touch the customer clocks) and before ``respond``,
in the same transaction. It decides what that mail may do.

**Who is it?** (docs/design.md §5: "staff identity is never proven by From: alone".) RT and
FreeScout accept an agent's reply on the strength of the ``From:`` header, so anyone can write
to the customer as an agent. Here a reply acts as staff only when all of these hold:

1. it came to a valid signed staff reply address (``support+<token>@``; ``thread`` checked
   the HMAC, or the message would not have matched by token);
2. ``ctx.sender`` is, case-insensitively, the email of ``rules.people[claim.person]``: the
   person the token was issued to;
3. the From domain is POSITIVELY proven (docs/decisions.md D10, ``gateway.security.verdict``): DKIM
   pass aligned with it, DMARC pass, aligned SPF pass, or the same from a trusted front MTA's
   Authentication-Results. The token is not proof on its own: it travels in every forward
   and reply-all (the only exception is the opt-in ``security.staff_token_only_domains``).
   When a check could not complete (DNS timeout, SERVFAIL: ``temperror``) the reply is
   HELD: stored as an internal note, nothing relayed or applied, event
   ``staff-reply-held``; the re-check worker (``gateway.pipeline.recheck``) re-runs the
   checks on the stored message and calls :func:`judge` again, until
   ``security.recheck_window`` is over, when an unproven reply is refused.

Anything else is never relayed and changes nothing: the mail stays an internal note, the
event ``unverified-staff-reply`` says why, and the ticket's owner gets one notification. The
sender is not answered (it may be forged: an answer would be backscatter).

**Colleagues** (docs/decisions.md D7, item 5). A reply on P's token from *another* known staff
member Q (P forwarded or CC'd the notification) passes checks 1 and 3 but not 2. It is kept simple
and safe: stored as an internal note *from Q*, Q becomes a ``staff`` participant, the owner is
told and Q gets a confirmation; it is **not** relayed to the customer and its commands are
not applied (a token is a capability for the person it names, not for whoever holds it).
Q answers the customer from Q's own notification once Q owns or is told about the ticket.

**Commands** (the registry ``gateway.pipeline.commands.COMMANDS``) on the first lines:
``#note``, ``#close``, ``#assign``, ``#waiting``, ``#snooze``, ``#priority``, ``#merge``,
``#junk``. All or nothing: with any
error (unknown command, unknown person, unknown ticket) nothing is applied and nothing is
relayed; the sender gets the error. Otherwise each command leaves an event and the sender
gets one short confirmation; a command-only mail sends nothing to the customer.

**Relay.** Unless ``#note``, the reply text without the quoted notification
(mail-parser-reply) goes to the requester and the other customer participants, from the
support address as ``"<Person> via <from_name>"``, threaded to the customer's last message,
``[REF] subject``, Reply-To the signed customer address, signed Message-ID, attachments kept;
an Outbox row (kind ``staff_reply``, envelope sender = the support address: a human reply,
not automatic mail) that the delivery worker DKIM-signs last (docs/design.md §6). It is the
human response for the SLA clocks (``on_staff_reply``: first response stops, next response
is cleared, ``last_staff_at`` set).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import col, select

from gateway.letters.brands import brand_domains, identity
from gateway.letters.facts import isoz, owner_or_default
from gateway.letters.staff_reply import compose_staff_reply
from gateway.notices.customer import ticket_letter
from gateway.outbound.worker import enqueue, notify_owner
from gateway.pipeline.commands import COMMANDS, Command, help_lines, parse_commands
from gateway.pipeline.context import Context
from gateway.pipeline.handover import compose_handover
from gateway.pipeline.holds import hold
from gateway.pipeline.notify import attachment_parts
from gateway.pipeline.quoting import strip_quoted
from gateway.routing.model import Person, Rules
from gateway.security.verdict import auth_summary, staff_decision
from gateway.sla.clocks import on_staff_reply
from gateway.store.models import Message, Participant, Ticket, TicketLink
from gateway.store.queries import (
    add_event,
    add_participant,
    last_customer_message,
    undeliverable,
)

__all__ = ["judge", "staff_stage"]

# -------------------------------------------------------------------------------- helpers


def _event(ctx: Context, type_: str, detail: str, data: object = None) -> None:
    # `record` has already written and cleared ctx.events: add ours directly.
    assert ctx.ticket is not None
    assert ctx.message is not None
    add_event(
        ctx.session,
        ctx.ticket.id,
        type_,
        detail,
        ctx.now,
        message_id=ctx.message.id,
        data=data,
    )


def _person_by_email(rules: Rules, address: str) -> Person | None:
    address = address.lower()
    for person in rules.people.values():
        if person.email.lower() == address:
            return person
    return None


def _owner(ctx: Context) -> Person | None:
    assert ctx.ticket is not None
    rules = ctx.services.rules
    return owner_or_default(rules, ctx.ticket.owner)


def _tell(ctx: Context, person: Person, subject: str, body: str) -> None:
    """One notification (Outbox kind ``notification``, null sender) to a staff person."""
    assert ctx.ticket is not None
    assert ctx.parsed is not None
    notify_owner(
        ctx.session,
        ctx.services.settings,
        ctx.services.signer,
        ticket=ctx.ticket,
        email=person.email,
        name=person.name,
        person=person.id,
        subject=subject,
        body=body,
        now=ctx.now,
        in_reply_to=ctx.parsed.message_id,
    )


def _auth_text(ctx: Context) -> str:
    return auth_summary(ctx.auth)


def _unverified_reason(ctx: Context, issued_to: Person | None, person_id: str) -> str | None:
    """Why this staff-token mail may not act as staff (every reason), or None when it may."""
    sender = ctx.sender.lower()
    reasons: list[str] = []
    if issued_to is None:
        reasons.append(f"the reply token was issued to {person_id!r}, who is not in rules/")
    elif sender != issued_to.email.lower() and (
        _person_by_email(ctx.services.rules, sender) is None
    ):
        # (A known colleague is handled as an internal note, see the module docstring.)
        reasons.append(
            f"the reply token was issued to {issued_to.name} <{issued_to.email}> "
            f"but the mail comes from {sender or '(no sender)'}"
        )
    # The From domain's proof is judged by gateway.security.verdict (see `judge`).
    return "; ".join(reasons) or None


# --------------------------------------------------------------------------- the outcomes


def _unverified(ctx: Context, why: str) -> None:
    assert ctx.ticket is not None
    assert ctx.message is not None
    assert ctx.parsed is not None
    ctx.message.kind = "note"
    ctx.session.add(ctx.message)
    _event(ctx, "unverified-staff-reply", f"not relayed, nothing applied: {why}")
    owner = _owner(ctx)
    if owner is None:
        return
    t = ctx.ticket
    body = (
        f"A mail to a staff reply address of ticket {t.ref} was NOT relayed to the "
        f"customer and none of its commands were applied:\n\n  {why}\n\n"
        f"It is stored in the ticket as an internal note. If it was you, reply from your "
        f"own address to your own notification. If not, someone may be impersonating staff.\n\n"
        f"----- The unverified mail (from {ctx.sender or '(no sender)'}, subject "
        f"{ctx.parsed.subject!r}) -----\n{ctx.parsed.text.strip()}\n----- end -----\n"
    )
    _tell(ctx, owner, f"[{t.ref}] Unverified staff reply NOT relayed", body)
    _event(ctx, "owner-alerted", f"{owner.name} <{owner.email}> told about the unverified reply")


def _colleague(ctx: Context, issued_to: Person, colleague: Person) -> None:
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    assert ctx.parsed is not None
    t = ctx.ticket
    assert t.id is not None
    add_participant(ctx.session, t.id, colleague.email, "staff", ctx.now)
    _event(
        ctx,
        "staff-joined",
        f"{colleague.name} replied on {issued_to.name}'s notification: stored as an internal "
        f"note, not relayed, commands not applied; {colleague.email} added as staff participant",
    )
    owner = _owner(ctx)
    if owner is not None and owner.id != colleague.id:
        _tell(
            ctx,
            owner,
            f"[{t.ref}] {colleague.name} added a note",
            f"{colleague.name} replied to a notification of {t.ref} issued to "
            f"{issued_to.name}. It was stored as an internal note and NOT sent to the "
            f"customer.\n\n----- Note from {colleague.name} -----\n"
            f"{strip_quoted(ctx.parsed.text) or '(empty)'}\n----- end -----\n",
        )
    _tell(
        ctx,
        colleague,
        f"[{t.ref}] Stored as an internal note",
        f"Your reply to {t.ref} was stored as an internal note and NOT sent to the customer: "
        f"the notification you answered was issued to {issued_to.name}. The owner has been "
        f"told. Commands in it were not applied.\n",
    )


def _customer_recipients(ctx: Context, ticket: Ticket) -> list[str]:
    """The requester first, then the other customer participants; never staff, never us."""
    settings = ctx.services.settings
    ours = {d.lower() for d in settings.smtp.domains}
    staff = {p.email.lower() for p in ctx.services.rules.people.values()}
    own = settings.outbound.from_address.lower()
    ours |= brand_domains(ctx.services.rules)
    rows = ctx.session.exec(
        select(Participant)
        .where(Participant.ticket_id == ticket.id, Participant.role != "staff")
        .order_by(col(Participant.id))
    ).all()
    out: list[str] = []
    for address in [ticket.requester, *(p.address for p in rows)]:
        a = (address or "").lower()
        if not a or "@" not in a or a in out or a in staff or a == own:
            continue
        if a.rpartition("@")[2] in ours:
            continue
        out.append(a)
    dead = set(undeliverable(ctx.session, out))
    if dead:
        _event(ctx, "relay-skipped-undeliverable", "not sent to " + ", ".join(sorted(dead)))
    return [a for a in out if a not in dead]


def _relay(ctx: Context, person: Person, text: str) -> str:
    """Queue the reply to the customer; returns what the confirmation says about it."""
    assert ctx.ticket is not None
    assert ctx.ticket.id is not None
    assert ctx.parsed is not None
    assert ctx.message is not None
    t = ctx.ticket
    assert t.id is not None
    settings = ctx.services.settings
    to = _customer_recipients(ctx, t)
    if not to:
        _event(ctx, "relay-skipped", "no customer address to send the reply to; kept as a note")
        return "NOT sent: the ticket has no customer address (kept as an internal note)"
    last = last_customer_message(ctx.session, t.id)
    in_reply_to = last.message_id if last is not None else None
    references = last.references.split() if last is not None and last.references else []
    parts = attachment_parts(ctx.parsed.msg)
    # the ticket's brand (docs/decisions.md D17)
    me = identity(settings, ctx.services.rules, t.brand)
    raw, message_id, subject, body = compose_staff_reply(
        ticket_id=t.id,
        ref=t.ref,
        ticket_subject=t.subject,
        person_name=person.name,
        to=to,
        text=text,
        parts=parts,
        in_reply_to=in_reply_to,
        references=references,
        from_address=me.from_address,
        from_name=me.from_name,
        signer=ctx.services.signer,
        hostname=settings.smtp.hostname,
        now=ctx.now,
        reply_domain=me.reply_domain,
        message_id_domain=me.message_id_domain,
        # In the ticket's language (common.<lang>.txt), like its other letters.
        footer=ticket_letter(settings, t, "common").phrase("staff_reply_footer", ref=t.ref),
    )
    refs = [*references, *([in_reply_to] if in_reply_to else [])]
    enqueue(
        ctx.session,
        ticket_id=t.id,
        kind="staff_reply",
        raw=raw,
        message_id=message_id,
        rcpt_tos=to,
        now=ctx.now,
        # A human reply: a real envelope sender so bounces come back to us (not <>).
        mail_from=me.from_address,
        from_address=me.from_address,
        subject=subject,
        text=body,
        in_reply_to=in_reply_to,
        references=" ".join(refs),
    )
    ctx.message.kind = "staff_reply"
    ctx.session.add(ctx.message)
    had_first = t.first_responded_at is not None
    on_staff_reply(t, ctx.received_at)
    files = f", {len(parts)} attachment(s)" if parts else ""
    _event(
        ctx,
        "staff-reply-relayed",
        f"reply of {person.name} relayed as {message_id} to {', '.join(to)}"
        f"{files}; in reply to {in_reply_to or '(no customer message)'}",
        {"to": to, "message_id": message_id},
    )
    _event(
        ctx,
        "sla",
        ("next response answered" if had_first else "first response given")
        + f" by {person.name} at {isoz(ctx.received_at)}",
    )
    return f"sent to {', '.join(to)}"


@dataclass
class _Desk:
    """What an email command may use (`gateway.pipeline.commands.Desk`): the context, the
    verified sender, the audit trail, and the letters commands send."""

    ctx: Context
    person: Person

    def event(self, type_: str, detail: str, data: object = None) -> None:
        _event(self.ctx, type_, detail, data)

    def hand_over(self, target: Person, previous: Person | None, reason: str) -> None:
        ctx, t = self.ctx, self.ctx.ticket
        assert t is not None
        compose_handover(
            ctx.session,
            t,
            target,
            previous,
            reason,
            rules=ctx.services.rules,
            settings=ctx.services.settings,
            signer=ctx.services.signer,
            now=ctx.now,
            subject=f"[{t.ref}] Assigned to you: {t.subject}",
            actor=self.person,
        )

    def tell_merged(self, into: Ticket) -> None:
        assert self.ctx.ticket is not None
        _merge_told(self.ctx, self.person, self.ctx.ticket, into)


def _merge_told(ctx: Context, actor: Person, merged: Ticket, into: Ticket) -> None:
    """docs/decisions.md D12: both owners are told of a merge (Zammad and OTRS fixed the silent
    merge as a bug); the target's owner gets the merged ticket's customer messages in full. From now
    on every reply to ``merged`` lands in ``into`` (``thread.decide``'s ``merged_into``)."""
    assert merged.id is not None
    assert into.id is not None
    s = ctx.session
    rules = ctx.services.rules
    texts = [
        f"----- {m.from_address or m.mail_from}, {isoz(m.at)}: {m.subject} -----\n"
        f"{(m.text or '').strip() or '(no text)'}"
        for m in s.exec(
            select(Message)
            .where(Message.ticket_id == merged.id, Message.direction == "in",
                   Message.kind == "customer")
            .order_by(col(Message.at), col(Message.id))
        ).all()
    ]  # fmt: skip
    closed_dupes = [
        lk
        for lk in s.exec(
            select(TicketLink).where(TicketLink.relation == "possible-duplicate")
        ).all()
        if {lk.ticket_id, lk.other_id} == {merged.id, into.id}
    ]
    if closed_dupes:
        add_event(s, into.id, "duplicate-resolved",
                  f"possible duplicate {merged.ref} merged into {into.ref} by {actor.name}",
                  ctx.now)  # fmt: skip
    told: set[str] = {actor.id}
    target_owner = rules.people.get(into.owner)
    if target_owner is not None and target_owner.id not in told:
        told.add(target_owner.id)
        notify_owner(
            s, ctx.services.settings, ctx.services.signer, ticket=into,
            email=target_owner.email, name=target_owner.name, person=target_owner.id,
            subject=f"[{into.ref}] {merged.ref} was merged into your ticket",
            body=(
                f"{actor.name} merged {merged.ref} ({merged.requester}: {merged.subject}) "
                f"into your ticket {into.ref}. {merged.ref} is closed; its participants were "
                f"added here, its messages show in {into.ref}'s history, and every reply to "
                f"{merged.ref} now lands in {into.ref}.\n\nIts customer messages:\n\n"
                + "\n\n".join(texts or ["(none)"]) + "\n"
            ),
            now=ctx.now,
        )  # fmt: skip
        add_event(s, into.id, "merge-notified",
                  f"{target_owner.name} told that {merged.ref} was merged in", ctx.now)  # fmt: skip
    source_owner = rules.people.get(merged.owner)
    if source_owner is not None and source_owner.id not in told:
        notify_owner(
            s, ctx.services.settings, ctx.services.signer, ticket=merged,
            email=source_owner.email, name=source_owner.name, person=source_owner.id,
            subject=f"[{merged.ref}] Merged into {into.ref}",
            body=(
                f"{actor.name} merged your ticket {merged.ref} into {into.ref} (owner "
                f"{target_owner.name if target_owner else into.owner}). {merged.ref} is "
                f"closed and will not reopen: replies to it land in {into.ref}.\n"
            ),
            now=ctx.now,
        )  # fmt: skip
        _event(ctx, "merge-notified", f"{source_owner.name} told that {merged.ref} was merged")


def _verified(ctx: Context, person: Person) -> None:
    assert ctx.ticket is not None
    assert ctx.parsed is not None
    assert ctx.message is not None
    t = ctx.ticket
    desk = _Desk(ctx, person)
    commands, rest, errors = parse_commands(ctx.parsed.text)
    if not errors:
        # Every check before any effect: all or nothing (module docstring).
        errors = [e for c in commands for e in COMMANDS[c.name].validate(desk, c)]
    if errors:
        _event(ctx, "staff-command-error", "; ".join(errors) + " (nothing applied, not relayed)")
        _tell(
            ctx,
            person,
            f"[{t.ref}] NOT done: command error",
            "Your reply was NOT sent to the customer and nothing was changed:\n\n"
            + "\n".join(f"  - {e}" for e in errors)
            + "\n\nIt is kept in the ticket as an internal note. Fix the command and reply "
            "again. The commands:\n\n" + "\n".join(f"  {line}" for line in help_lines()) + "\n",
        )
        return
    reply = strip_quoted(rest)
    # Nothing junk-related is ever sent to the sender (docs/decisions.md D18): text with #junk is a
    # note.
    is_note = any(COMMANDS[c.name].internal for c in commands)
    done: list[str] = []
    if is_note:
        _event(ctx, "staff-note", f"internal note from {person.name}; not sent to the customer")
        if any(c.name == "note" for c in commands) or reply.strip():
            done.append("#note: kept as an internal note, not sent to the customer")
    elif reply.strip():
        done.append("your reply was " + _relay(ctx, person, reply))
    elif not commands:
        _event(ctx, "staff-reply-empty", "nothing left after removing the quoted text")
        _tell(
            ctx,
            person,
            f"[{t.ref}] NOT sent: empty reply",
            "Your reply held nothing but the quoted notification, so nothing was sent to the "
            "customer. Write your answer above the quoted text.\n",
        )
        return
    for cmd in commands:
        apply = COMMANDS[cmd.name].apply
        if apply is not None:
            done.append(apply(desk, cmd))
    t.updated_at = ctx.now
    ctx.session.add(t)
    if commands:
        _confirm(ctx, person, commands, done, commands_only=not is_note and not reply.strip())


def _confirm(
    ctx: Context, person: Person, commands: list[Command], done: list[str], *, commands_only: bool
) -> None:
    """The staff-commands event, and the mail telling ``person`` what was done."""
    assert ctx.ticket is not None
    t = ctx.ticket
    if commands_only:
        done.append("nothing was sent to the customer (commands only)")
    _event(ctx, "staff-commands", ", ".join(c.describe() for c in commands) + f" by {person.name}")
    _tell(
        ctx,
        person,
        f"[{t.ref}] Done: " + " ".join(c.describe() for c in commands),
        f"Ticket {t.ref} ({t.subject}):\n\n"
        + "\n".join(f"  - {line}" for line in done)
        + f"\n\nStatus {t.status}, owner {t.owner}, priority {t.priority}.\n",
    )


# ---------------------------------------------------------------------------------- stage


def staff_stage(ctx: Context) -> None:
    """Authenticate a staff-token reply, apply its commands and relay it (module docstring)."""
    th = ctx.thread
    assert th is not None
    if th.claim is None or not th.claim.person:
        return  # a customer's reply token: customer mail
    if ctx.ticket is None or ctx.ticket.id is None or ctx.message is None or ctx.parsed is None:
        return
    if ctx.ticket.id != th.claim.ticket_id:
        return
    if ctx.kind != "note":
        # `record` marks human staff-token mail "note"; anything else here is a robot (an
        # out-of-office answering a notification): recorded, never acted on.
        return
    if judge(ctx, th.claim.person) == "wait":
        row = hold(ctx, "staff", {"person": th.claim.person})
        _event(
            ctx,
            "staff-reply-held",
            f"held, not relayed, nothing applied: {ctx.staff_hold_reason}; re-checked until "
            f"{row.deadline.isoformat()}",
        )


def judge(ctx: Context, person_id: str, *, waited_out: bool = False) -> str:
    """Decide and carry out what a reply on ``person_id``'s staff token may do.

    Returns ``"accept"`` (relayed or applied, or a colleague's note), ``"refuse"`` (kept as
    a note, owner told) or ``"wait"`` (nothing done; the caller holds it for a re-check and
    ``ctx.staff_hold_reason`` says why). ``waited_out``: the re-check window is over.
    """
    rules = ctx.services.rules
    issued_to = rules.people.get(person_id)
    why = _unverified_reason(ctx, issued_to, person_id)
    if why is not None or issued_to is None:
        _unverified(ctx, why or "unknown person")
        return "refuse"
    decision = staff_decision(
        ctx.auth,
        sender=ctx.sender or "(no sender)",
        token_only_domains=ctx.services.settings.security.staff_token_only_domains,
        waited_out=waited_out,
    )
    if decision.action == "wait":
        ctx.staff_hold_reason = decision.reason
        return "wait"
    if decision.action == "refuse":
        _unverified(ctx, decision.reason)
        return "refuse"
    _accepted(ctx, issued_to, decision.reason)
    return "accept"


def _accepted(ctx: Context, issued_to: Person, proof: str) -> None:
    rules = ctx.services.rules
    if ctx.sender.lower() != issued_to.email.lower():
        colleague = _person_by_email(rules, ctx.sender)
        assert colleague is not None
        _colleague(ctx, issued_to, colleague)
        return
    _event(
        ctx,
        "staff-verified",
        f"{issued_to.name}: token issued to {issued_to.id}, From {ctx.sender}, {proof}",
        {"person": issued_to.id},
    )
    _verified(ctx, issued_to)
