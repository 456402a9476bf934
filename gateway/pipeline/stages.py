"""The stages of the pipeline, each a small function `stage(ctx) -> None`, and their order.

Every message goes through `PREFIX`: parse, classify, authenticate, spam, thread. Threading
ends in one `Disposition` (gateway/pipeline/thread.py), and `CHAINS` gives each disposition
its list of stages, the way GNU Mailman 3's chains select a pipeline: a duplicate is only
recorded as one, a new ticket is routed, recorded, acknowledged and notified, a bounce is
recorded on its ticket and nothing else. So no stage asks whether the message is for it; a
stage that files the message as junk ends its chain (`JUNK` follows). `run_stages` is the
driver. How to add a disposition: docs/architecture.md.

The order is the flow of a message (docs/architecture.md) and matters:
- parse first: every later stage reads the parsed message;
- classify before thread: a bounce is matched by the message it reports on, never by its
  sender, and never opens a ticket (docs/design.md §3 rule 7);
- authenticate before route: rules may match on `authenticated`;
- thread before route: only a new ticket is routed, a reply keeps its ticket's owner;
- staff replies are judged after record: the message is stored whatever the verdict;
- record, then respond: the ticket, the message, the audit trail and any acknowledgement
  (a transactional outbox row, docs/design.md §6) are written in the same transaction as
  everything decided above; the spool entry is released after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from gateway.letters.headers import LOOP_HEADER
from gateway.pipeline.bounce import parse_bounce
from gateway.pipeline.classify import classify
from gateway.pipeline.context import Context
from gateway.pipeline.conversation import known_customer_stage
from gateway.pipeline.junk import (
    after_route,
    blocked_stage,
    file_junk_stage,
    released_stage,
    spam_stage,
)
from gateway.pipeline.notify import notify_owner_stage
from gateway.pipeline.parse import parse
from gateway.pipeline.record import record, record_duplicate
from gateway.pipeline.respond import note_unanswered, respond
from gateway.pipeline.route import route
from gateway.pipeline.staff import staff_stage
from gateway.pipeline.thread import Disposition, decide, from_is_verified, robot_mail
from gateway.security.dns import BudgetResolver, OfflineResolver
from gateway.security.relay import effective_client_of
from gateway.security.sender_auth import authenticate as check_sender
from gateway.store.queries import SqlLookup, add_event, lock_message_id

log = logging.getLogger("gateway.pipeline")

Stage = Callable[[Context], None]


def parse_stage(ctx: Context) -> None:
    env = ctx.entry.envelope
    ctx.parsed = parse(
        ctx.entry.raw,
        max_size=ctx.services.settings.smtp.max_message_size,
        truncated_bytes=env.truncated_bytes,
    )
    ctx.sender = ctx.parsed.from_address or env.mail_from.lower()
    if ctx.parsed.defects:
        ctx.event("parsed-with-defects", "; ".join(sorted(set(ctx.parsed.defects))))
    for item in ctx.parsed.not_kept:
        ctx.event("not-kept", f"{item['what']} ({item['size']} bytes): {item['why']}", item)


def classify_stage(ctx: Context) -> None:
    assert ctx.parsed is not None
    settings = ctx.services.settings
    own = {settings.outbound.from_address.lower()}
    ctx.verdict = classify(
        ctx.parsed.msg,
        ctx.entry.envelope.mail_from,
        own_addresses=own,
        own_domains=(),
        loop_header=LOOP_HEADER,
        # Every node of the installation writes the key-derived installation id (docs/decisions.md
        # D13.7); the host name is what this software wrote before, still ours.
        loop_value={*ctx.services.signer.installation_ids(), settings.smtp.hostname},
        is_own_message_id=lambda mid: ctx.services.signer.verify_message_id(mid) is not None,
    )
    if not ctx.verdict.is_human:
        ctx.event("classified", f"{ctx.verdict.kind}: " + "; ".join(ctx.verdict.reasons))
    if ctx.verdict.kind in ("bounce", "report"):
        ctx.bounce = parse_bounce(ctx.parsed.msg, ctx.entry.envelope.mail_from)


def authenticate_stage(ctx: Context) -> None:
    security = ctx.services.settings.security
    resolver = ctx.services.resolver
    if resolver is None:
        if not security.trusted_authserv_ids:
            return
        # No DNS of our own, but a trusted front MTA's verdicts can still be read; anything
        # needing DNS is then temperror, never a guess (docs/security.md).
        resolver = OfflineResolver()
    # One shared time budget for all the questions of this message (docs/decisions.md D10): DNS
    # trouble makes the verdict "unknown" (decided later by the re-check worker), never the queue
    # wait.
    budget = BudgetResolver(resolver, security.dns_budget)
    env = ctx.entry.envelope
    # Behind a trusted front MTA, judge the client it saw (docs/decisions.md D14;
    # security/relay.py).
    client = effective_client_of(ctx.entry.raw, env, ctx.services.settings)
    try:
        ctx.auth = check_sender(
            ctx.entry.raw,
            envelope_sender=env.mail_from,
            client_ip=client.client_ip,
            helo=client.helo,
            resolver=budget,
            trusted_authserv_ids=client.trusted_authserv_ids,
        )
    except Exception as exc:  # authentication trouble never loses the message
        log.warning("sender authentication failed: %r", exc)
        ctx.event("authentication-error", repr(exc))
        return
    if budget.cut:
        ctx.event(
            "dns-budget-cut",
            f"the per-message DNS budget of {security.dns_budget:g}s ran out: "
            f"{budget.temp_errors} of {budget.questions} questions unanswered",
            {"budget": security.dns_budget, "questions": budget.questions},
        )
    elif budget.temp_errors:
        ctx.event(
            "dns-unavailable",
            f"{budget.temp_errors} of {budget.questions} DNS questions failed at once "
            f"(servers unreachable or failing): verdict deferred",
            {"questions": budget.questions},
        )
    ctx.event("authenticated", ctx.auth.header_value(ctx.services.settings.smtp.hostname))


def thread_stage(ctx: Context) -> None:
    assert ctx.parsed is not None
    assert ctx.verdict is not None
    settings = ctx.services.settings
    # Two nodes with the same message (a lease ran out, or one Message-ID sent to two MX
    # hosts): the second waits, then finds the first one's row and records a duplicate.
    lock_message_id(ctx.session, ctx.parsed.message_id or f"dedupe:{ctx.entry.dedupe_key}")
    lookup = SqlLookup(ctx.session)
    env = ctx.entry.envelope
    robot = robot_mail(ctx.verdict.kind, env.mail_from)
    # Participation proves the person (docs/decisions.md D10): a From that is neither authenticated
    # nor the envelope sender counts as nobody's. Robot mail never becomes a participant.
    if robot is None:
        verified, why = from_is_verified(
            ctx.parsed.from_address,
            env.mail_from,
            authenticated=ctx.auth is not None and ctx.auth.authenticated,
        )
        if not verified:
            ctx.sender_verified = False
            ctx.unverified_reason = why
            ctx.event(
                "sender-unverified",
                f"{why}: this mail does not count as {ctx.sender}'s; it joins no ticket "
                "of theirs and makes nobody a participant",
            )
    ctx.thread = decide(
        ctx.parsed,
        sender=ctx.sender,
        recipients=env.rcpt_tos,
        dedupe_key=ctx.entry.dedupe_key,
        signer=ctx.services.signer,
        lookup=lookup,
        ref_prefix=settings.tickets.ref_prefix,
        closed_followup=settings.tickets.closed_followup,
        sender_verified=ctx.sender_verified,
        robot=robot,
        bounced=ctx.bounce.original_message_ids if ctx.bounce is not None else (),
        merged_into=lookup.merged_into,
    )
    if robot is not None and ctx.thread.disposition is not Disposition.DUPLICATE:
        ctx.kind = robot.message_kind
    _note_redirect(ctx)


def _note_redirect(ctx: Context) -> None:
    """docs/decisions.md D12: mail for a merged ticket went to its target; the merged ticket says
    so."""
    th = ctx.thread
    if th is None or th.redirected_from is None or th.ticket is None:
        return
    add_event(
        ctx.session,
        th.redirected_from.id,
        "merge-redirected",
        f"mail from {ctx.sender or 'the sender'} for {th.redirected_from.ref} went to "
        f"{th.ticket.ref}, which it was merged into ({th.disposition})",
        ctx.now,
    )


#: Every message goes through these, in this order; `thread_stage` sets its disposition.
PREFIX: tuple[Stage, ...] = (
    parse_stage,
    classify_stage,
    authenticate_stage,
    spam_stage,  # the front filter's verdict, trusted only from security.trusted_relays
    thread_stage,
    released_stage,  # mail released from the junk folder says so on its audit trail
)

# A joined ticket's mail: a blocked sender's goes to junk; then record; the owner is
# notified of a customer's message (not of a robot's, a staff member's or a list's).
_REPLY: tuple[Stage, ...] = (blocked_stage, record, notify_owner_stage)
# Robot mail that reached no ticket: recorded ticketless, with why nobody answered it.
_UNMATCHED_ROBOT: tuple[Stage, ...] = (record, note_unanswered)

#: Then the stages of the message's disposition (like the chains of GNU Mailman 3 that
#: select a pipeline), in order; a stage is never asked whether the message is for it.
CHAINS: Mapping[Disposition, tuple[Stage, ...]] = MappingProxyType(
    {
        Disposition.DUPLICATE: (record_duplicate,),
        Disposition.NEW: (
            blocked_stage,  # `#junk sender` sent this sender's mail to the junk folder
            route,
            after_route,  # disposition = "junk": the junk folder, not the ticket queue
            known_customer_stage,  # docs/decisions.md D12: a known customer's new mail, by policy
            record,
            respond,
            notify_owner_stage,  # the owner gets the customer's full text
        ),
        # Staff-token mail: authenticate, apply commands, relay (docs/design.md §5), after
        # record (the message is stored whatever the verdict).
        Disposition.REPLY_TOKEN: (blocked_stage, record, staff_stage, notify_owner_stage),
        Disposition.OUR_MESSAGE_ID: _REPLY,
        Disposition.KNOWN_MESSAGE_ID: _REPLY,
        Disposition.SUBJECT_REF: _REPLY,
        # Bounces join their ticket silently: never answered, nobody paged (§3 rule 7).
        Disposition.BOUNCE: (record,),
        Disposition.UNMATCHED_BOUNCE: _UNMATCHED_ROBOT,
        Disposition.UNMATCHED_AUTO_REPLY: _UNMATCHED_ROBOT,
        Disposition.LOOP: _UNMATCHED_ROBOT,
    }
)

#: A stage that sent the message to the junk folder (`ctx.junk` set: a blocked sender, a
#: route's `disposition = "junk"`) ends its chain; this one follows instead (docs/decisions.md D18).
JUNK: tuple[Stage, ...] = (file_junk_stage,)


def run_stages(
    ctx: Context,
    prefix: tuple[Stage, ...] = PREFIX,
    chains: Mapping[Disposition, tuple[Stage, ...]] = CHAINS,
) -> None:
    """Run the prefix, then the chain of the message's disposition (or the junk chain)."""
    for stage in prefix:
        stage(ctx)
    assert ctx.thread is not None, "the prefix must end with the threading decision"
    for stage in chains[ctx.thread.disposition]:
        stage(ctx)
        if ctx.junk is not None:
            for junk_stage in JUNK:
                junk_stage(ctx)
            return


def summary(ctx: Context) -> dict[str, Any]:
    """The facts of one processed message for its log line (gateway/logs.py)."""
    t = ctx.ticket.ref if ctx.ticket is not None else "-"
    key = ctx.thread.disposition if ctx.thread else "?"
    # The stored message's kind is the final word: the staff stage turns a "note" into a
    # "staff_reply" once it is relayed (docs/decisions.md D14: relayed replies were logged as
    # notes).
    kind = ctx.message.kind if ctx.message is not None else ctx.kind
    return {
        "spool": ctx.entry.id,
        "message_id": ctx.parsed.message_id if ctx.parsed is not None else None,
        "ticket": t,
        "kind": kind,
        "thread": key,
    }
